"""The OpenAI-compatible HTTP API over one Engine or EngineProcess (vLLM / llama.cpp server / TGI convention).

    app = create_app(EngineProcess(charrnn_runtime.load()))   # then uvicorn, or Ray Serve (ray_app.py)

Routes: POST /v1/completions (completions.py), POST /tokenize and /detokenize (vLLM's), GET
/v1/models, GET /health (503 while draining or if the engine's loop died), GET /metrics
(Prometheus, metrics.py); the playground's page at / and POST /v1/states (playground.py). Every
error is OpenAI's JSON error object naming the field (`param`, from CharrnnError.param): 400 for a
bad request, 404 for an unknown model, 503 with Retry-After while the engine is full or draining.
The app owns the engine: it drains and closes it at shutdown. Every request first passes
security.py's checks (API keys, Host, Origin, Content-Type, size).
"""

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from charrnn_runtime.engine import EngineBusy
from charrnn_runtime.errors import CharrnnError

from .completions import CompletionRequest, prompt_of, sampling_params, stream_events
from .completions import response as completion_response
from .metrics import prometheus
from .playground import PUBLIC_PATHS, add_playground
from . import tokens
from .security import Guard, SecurityOptions, openai_error

# The request field of each Python API name that a CharrnnError's .param can carry (others are the same).
HTTP_FIELDS = {"length": "max_tokens"}


def error(status, message, param=None, kind="invalid_request_error", headers=None):
    return JSONResponse(openai_error(message, kind, param), status_code=status, headers=headers)


class ModelNotFound(CharrnnError):
    """A request names a model this server does not serve (404)."""


def charrnn_error(e):
    """A CharrnnError as OpenAI's error: 503 with Retry-After when busy, 404 for another model, else
    400 naming the request field (from .param, never from the message)."""
    if isinstance(e, EngineBusy):
        return error(503, str(e), kind="server_busy", headers={"Retry-After": "1"})
    return error(404 if isinstance(e, ModelNotFound) else 400, str(e), HTTP_FIELDS.get(e.param, e.param))


def parse(schema, raw):
    """The request body as `schema`; pydantic's complaint as a CharrnnError naming the first bad field
    (with each of a union's complaints). Parsed here, not by FastAPI: 400 instead of 422."""
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        if errors[0]["type"] == "json_invalid":
            raise CharrnnError(errors[0]["msg"]) from None  # "Invalid JSON: ..."
        if not errors[0]["loc"]:
            raise CharrnnError("the request body must be a JSON object") from None
        field = errors[0]["loc"][0]
        message = f"{field}: " + " or ".join(e["msg"] for e in errors if e["loc"][0] == field)
        raise CharrnnError(message, field) from None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[int]


class ClientWatch:
    """The one task per completion that listens for its client leaving, and then cancels its engine
    requests: their rows are freed at the engine's next step, which also ends whoever awaits them
    (the admission or the result, or the stream being sent). One task for both phases, where a wait
    beside the disconnect (asyncio.wait, gather) and StreamingResponse's listener (a task group) took
    five per completion."""

    def __init__(self, receive, requests):
        self.requests, self.left = requests, False
        self.task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive):
        while (await receive())["type"] != "http.disconnect":
            pass
        self.left = True
        self.cancel()

    def cancel(self):
        """Free the completion's rows (the client left, or the completion failed)."""
        for request in self.requests:
            request.cancel()

    def close(self):
        self.task.cancel()


class EventStream(StreamingResponse):
    """Server-sent events as they come, without StreamingResponse's own disconnect listener: the
    completion's ClientWatch listens (and ends the events), and is closed with the stream."""

    def __init__(self, events, watch):
        super().__init__(events, media_type="text/event-stream")
        self.watch = watch

    async def __call__(self, scope, receive, send):
        try:
            await self.stream_response(send)
        finally:
            self.watch.close()


class ReplicaHeader:
    """X-Replica on every response (plain ASGI: Starlette's BaseHTTPMiddleware would re-buffer streams)."""

    def __init__(self, app, replica):
        self.app, self.header = app, (b"x-replica", replica.encode())

    async def __call__(self, scope, receive, send):
        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)
        await self.app(scope, receive, send_with_header)


def create_app(engine, replica=None, drain_seconds=30.0, security: SecurityOptions | None = None):
    """The FastAPI app serving `engine` under the model name of its bundle directory.

    `replica` (Ray Serve's replica id) is sent as the X-Replica header and in /health; `security`
    (default: no keys, loopback) sets the checks every request passes first (security.py)."""
    model = engine.model
    name = model.path.name if model.path.is_dir() else model.path.stem
    security = security or SecurityOptions()
    secret = security.state_secret or tokens.random_secret()

    def state_token(continuation):
        return tokens.encode(continuation, secret)
    started = int(time.time())

    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.drain, drain_seconds)
        engine.close()

    app = FastAPI(title="charrnn", lifespan=lifespan)
    app.exception_handler(HTTPException)(lambda request, exc: error(exc.status_code, str(exc.detail)))
    app.exception_handler(CharrnnError)(lambda request, exc: charrnn_error(exc))
    app.add_middleware(Guard, options=security,  # also answers a 500
                       public_paths={"/health", *PUBLIC_PATHS})
    if replica is not None:
        app.add_middleware(ReplicaHeader, replica=replica)

    def check_model(requested):
        if requested is not None and requested != name:
            raise ModelNotFound(f"model {requested!r} not found: this server serves {name!r}", "model")

    @app.get("/health")
    async def health():
        """200 while serving; 503 while draining or if the engine's loop died (a balancer routes elsewhere)."""
        metrics, status = await asyncio.to_thread(lambda: (engine.metrics(), engine.status))  # EngineProcess asks
        # its process (a round trip), which must not hold up the event loop
        return JSONResponse({"status": status, "model": name, "replica": replica,
                             "active_rows": metrics["active_rows"], "waiting_requests": metrics["waiting_requests"]},
                            status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "charrnn",
                                            "variant": model.variant, "provider": model.provider,
                                            "sha256": model.sha256, "max_model_len": engine.max_length}]}

    @app.get("/metrics")
    async def metrics():
        metrics = await asyncio.to_thread(engine.metrics)  # as /health
        return PlainTextResponse(prometheus(metrics), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def create_completion(request: Request):
        body = parse(CompletionRequest, await request.body())
        check_model(body.model)
        prompt, params = prompt_of(body), sampling_params(body)
        continuation = None if body.state is None else tokens.decode(body.state, secret, model)
        requests = engine.submit_all(prompt, [params.row(i) for i in range(body.n)], continuation)
        head = {"id": request.state.request_id.replace("req_", "cmpl-", 1), "object": "text_completion",
                "created": int(time.time()), "model": name}
        watch = ClientWatch(request.receive, requests)
        try:
            for r in requests:  # streamed: the rows are taken (or refused with a 503) before the response starts
                await (r.admitted() if body.stream else r.wait())
            if watch.left:
                raise HTTPException(499, "client disconnected")  # nobody reads it
        except BaseException:
            watch.close()
            watch.cancel()
            raise
        if not body.stream:
            watch.close()  # a JSONResponse, not a dict: FastAPI would walk a dict with jsonable_encoder first
            return JSONResponse(completion_response(head, body, prompt, requests, params.seed, state_token))
        for r in requests:
            r.streaming = True
        return EventStream(stream_events(head, body, prompt, requests, state_token), watch)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's: the prompt's character ids."""
        body = parse(TokenizeRequest, await request.body())
        check_model(body.model)
        ids = model.encode(body.prompt).tolist()
        return {"count": len(ids), "max_model_len": engine.max_length, "tokens": ids, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        """vLLM's: the text of character ids."""
        body = parse(DetokenizeRequest, await request.body())
        check_model(body.model)
        if not all(0 <= i < len(model.vocab) for i in body.tokens):
            raise CharrnnError(f"tokens must be character ids in [0, {len(model.vocab)})", "tokens")
        return {"prompt": "".join(model.vocab[i] for i in body.tokens)}

    add_playground(app, model, parse, check_model)  # the page at / and POST /v1/states

    return app
