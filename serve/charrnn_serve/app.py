"""The OpenAI-compatible completions API over one Engine (vLLM / llama.cpp server / TGI convention).

    app = create_app(Engine(charrnn_runtime.load()))     # then uvicorn, or Ray Serve (ray_app.py)

Routes: POST /v1/completions, GET /v1/models, GET /health, GET /metrics (Prometheus text).
Tokens are characters: `max_tokens` counts characters, and so does `usage`. Every error is
OpenAI's JSON error object naming the field (`param`): 400 for a bad request, 404 for an unknown
model, 503 with Retry-After while the engine is full or draining. The app owns the engine: it
drains and closes it at shutdown.
Every request first passes security.py's checks (API keys, Host, Origin, Content-Type, size).
"""

import asyncio
import json
import time
import uuid
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException

from charrnn_runtime.engine import EngineBusy
from charrnn_runtime.errors import CharrnnError
from charrnn_runtime.params import SamplingParams

from .security import Guard, SecurityOptions, openai_error

DEFAULT_MAX_TOKENS = 256  # characters; OpenAI's 16 would be a few words
MAX_CHOICES = 64
# The request field of each Python API name that a CharrnnError's .param can carry (others are the same).
HTTP_FIELDS = {"length": "max_tokens"}


class CompletionRequest(BaseModel):
    """The fields charrnn uses; others OpenAI clients send (user, logit_bias, ...) are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")  # strict: "1" is not a number, true not an int

    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    stream: bool = False

    @model_validator(mode="before")
    @classmethod
    def null_means_default(cls, data):
        """OpenAI's API allows null for every optional field."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def error(status, message, param=None, kind="invalid_request_error", headers=None):
    return JSONResponse(openai_error(message, kind, param), status_code=status, headers=headers)


def engine_error(e):
    if isinstance(e, EngineBusy):
        return error(503, str(e), kind="server_busy", headers={"Retry-After": "1"})
    return error(400, str(e), HTTP_FIELDS.get(e.param, e.param))


def validation_error(exc):
    """pydantic's complaint as a 400 naming the first bad field (with each of a union's complaints)."""
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        return error(400, errors[0]["msg"])  # "Invalid JSON: ..."
    if not errors[0]["loc"]:
        return error(400, "the request body must be a JSON object")
    field = errors[0]["loc"][0]
    return error(400, f"{field}: " + " or ".join(e["msg"] for e in errors if e["loc"][0] == field), field)


async def cancel_on_disconnect(request, awaitable):
    """Await `awaitable`, cancelling it if the client goes away first (its engine rows are freed)."""
    work = asyncio.ensure_future(awaitable)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_all([watcher, work])
    if not work.done() or work.cancelled():
        raise HTTPException(499, "client disconnected")  # nobody reads it
    return work.result()


async def gather_all_or_none(awaitables):
    """asyncio.gather that cancels the rest (freeing their rows) when one fails."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        await cancel_all(tasks)


async def cancel_all(tasks):
    """Cancel the unfinished tasks and wait until they are done (their errors retrieved)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def submit_all(submit, n):
    """[submit(0), …, submit(n - 1)]; if one is refused, the ones already submitted are cancelled."""
    requests = []
    try:
        for i in range(n):
            requests.append(submit(i))
    except CharrnnError:
        for request in requests:
            request.cancel()
        raise
    return requests


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


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine, replica=None, drain_seconds=30.0, security: SecurityOptions | None = None):
    """The FastAPI app serving `engine` under the model name of its bundle directory.

    `replica` (Ray Serve's replica id) is sent as the X-Replica header and in /health; `security`
    (default: no keys, loopback) sets the checks every request passes first (security.py)."""
    model = engine.model
    name = model.path.name if model.path.is_dir() else model.path.stem
    started = int(time.time())

    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.drain, drain_seconds)
        engine.close()

    app = FastAPI(title="charrnn", lifespan=lifespan)
    app.exception_handler(HTTPException)(lambda request, exc: error(exc.status_code, str(exc.detail)))
    app.exception_handler(CharrnnError)(lambda request, exc: engine_error(exc))
    app.add_middleware(Guard, options=security or SecurityOptions(), public_paths={"/health"})  # also answers a 500
    if replica is not None:
        app.add_middleware(ReplicaHeader, replica=replica)

    @app.get("/health")
    async def health():
        metrics = engine.metrics()
        return {"status": "ok", "model": name, "replica": replica, "active_rows": metrics["active_rows"],
                "waiting_requests": metrics["waiting_requests"]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "charrnn",
                                            "variant": model.variant, "provider": model.provider,
                                            "sha256": model.sha256, "max_model_len": engine.max_length}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(engine.metrics()), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:  # parsed here, not by FastAPI: JSON whatever the content-type (curl -d), and 400 instead of 422
            body = CompletionRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return validation_error(e)
        if body.model is not None and body.model != name:
            return error(404, f"model {body.model!r} not found: this server serves {name!r}", "model")
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                return error(400, f"prompt: one prompt per request, got a list of {len(prompt)}", "prompt")
            prompt = prompt[0]
        params = SamplingParams(body.temperature, body.top_k, body.top_p, body.seed, body.stop, body.max_tokens)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        if body.stream:  # submitted (or refused with a 4xx/503) before the response starts
            requests = submit_all(lambda i: engine.stream(prompt, params=params.row(i)), body.n)
            return StreamingResponse(stream_events(head, requests), media_type="text/event-stream")
        done = await cancel_on_disconnect(request, gather_all_or_none(
            engine.generate(prompt, params=params.row(i)) for i in range(body.n)))
        generated = sum(c.generated_chars for c in done)
        return {**head, "seed": params.seed,
                "choices": [{"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                            for i, c in enumerate(done)],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": generated,
                          "total_tokens": len(prompt) + generated}}

    return app


async def stream_events(head, requests):
    """Server-sent events merging the choices' engine requests, ending with [DONE].

    Each event carries what a choice's row produced since its last event (the engine coalesces
    characters), and a final event per choice its finish_reason. Leaving early (the client went
    away) cancels the requests, which frees their rows."""
    queue = asyncio.Queue()

    async def pump(index, request):
        try:
            async for chunk in request:
                queue.put_nowait((index, chunk, None))
            queue.put_nowait((index, "", request.finish_reason))
        except Exception as e:  # noqa: BLE001 - sent to the client as the stream's last event
            queue.put_nowait((index, None, e))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
    try:
        remaining = len(tasks)
        while remaining:
            index, chunk, end = await queue.get()
            if chunk is None:
                yield sse({"error": {"message": str(end), "type": "server_error", "param": None, "code": None}})
                return
            remaining -= end is not None
            yield sse({**head, "choices": [{"text": chunk, "index": index, "logprobs": None, "finish_reason": end}]})
        yield "data: [DONE]\n\n"
    finally:
        for request in requests:
            request.cancel()
        await cancel_all(tasks)


PROMETHEUS = [  # (name, type, help, engine metric)
    ("charrnn_requests_total", "counter", "Finished requests by finish reason.", "requests_total"),
    ("charrnn_requests_rejected_total", "counter", "Requests refused (queue full or draining).",
     "requests_rejected_total"),
    ("charrnn_prompt_chars_total", "counter", "Prompt characters fed.", "prompt_chars_total"),
    ("charrnn_generated_chars_total", "counter", "Characters generated.", "generated_chars_total"),
    ("charrnn_active_rows", "gauge", "Requests in the batch now.", "active_rows"),
    ("charrnn_waiting_requests", "gauge", "Requests waiting for a row.", "waiting_requests"),
    ("charrnn_max_batch", "gauge", "Rows the batch can hold.", "max_batch"),
    ("charrnn_step_seconds", "summary", "Time per batched step.", "step_seconds_sum"),
    ("charrnn_batch_rows", "summary", "Rows per batched step (the batch size).", "batch_rows_sum"),
]


def prometheus(metrics):
    """The engine's metrics in Prometheus' text format (summaries count steps)."""
    lines = []
    for name, kind, help, key in PROMETHEUS:
        lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        value = metrics[key]
        if kind == "summary":
            lines += [f"{name}_sum {value}", f"{name}_count {metrics['steps_total']}"]
        elif isinstance(value, dict):
            lines += [f'{name}{{finish_reason="{reason}"}} {count}' for reason, count in sorted(value.items())]
        else:
            lines.append(f"{name} {value}")
    return "\n".join(lines) + "\n"
