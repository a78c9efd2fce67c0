"""The playground: a web page at / to generate, score and look inside the model, and the one
endpoint only it needs, POST /v1/states.

The page is three static files (static/: HTML, CSS, plain JavaScript; no build step) served by the
server itself, so its API requests are same-origin and pass the Guard's Origin check. The files are
public paths: loading the page needs no key; the page asks for one when the API answers 401 and
keeps it in memory. A Content-Security-Policy holds the page to this server: no script, style, font
or request goes anywhere else.

POST /v1/states {"text", "layer", "role"} answers the state of one recurrent layer after each
character of `text` (model.trace), for the page's Neurons view:

    {"object": "states", "layer": 0, "role": "hidden", "size": 512, "tokens": ["R", ...],
     "states": [[0.013, -0.871, ...], ...], "layers": [{"layer": 0, "role": "hidden", "size": 512}, ...]}

`text` is at most MAX_STATES_CHARS characters: the answer holds characters × units numbers (1,000 ×
1,024 units for the shipped model is ~7 MB of JSON), and each character is a step of its own,
outside the engine's batch, on the cores the batch uses; traces run one at a time. Values are
rounded to 3 decimals, finer than any shade. Keys, Host, Origin and size are checked as on every route.
"""

import asyncio
from pathlib import Path

import numpy as np
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from charrnn_runtime.errors import CharrnnError

STATIC = Path(__file__).parent / "static"
PAGES = {"/": ("index.html", "text/html"), "/playground.js": ("playground.js", "text/javascript"),
         "/playground.css": ("playground.css", "text/css")}
PUBLIC_PATHS = frozenset(PAGES)
HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                      "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                      "form-action 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
MAX_STATES_CHARS = 1000


class StatesRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    text: str = Field(min_length=1, max_length=MAX_STATES_CHARS)
    layer: int = 0
    role: str = "hidden"


def add_playground(app, model, parse, check_model):
    """The page's routes on `app`, for `model`: `parse` and `check_model` are the app's own, so the
    states endpoint refuses a bad request exactly as the others do."""
    for path, (name, media_type) in PAGES.items():
        app.add_api_route(path, page(STATIC / name, media_type), methods=["GET"], include_in_schema=False)
    layers = [{"layer": t.layer, "role": t.role, "size": t.size} for t in model.state_spec]
    one_at_a_time = asyncio.Lock()

    @app.post("/v1/states")
    async def states(request: Request):
        """The state of one layer after each character of a text (see the module's docstring)."""
        body = parse(StatesRequest, await request.body())
        check_model(body.model)
        tensor = next((t for t in model.state_spec if (t.layer, t.role) == (body.layer, body.role)), None)
        if tensor is None:
            raise CharrnnError(f"no state tensor for layer {body.layer}, role {body.role!r}: the model has "
                               + ", ".join(f"layer {t.layer} {t.role}" for t in model.state_spec), "layer")
        try:
            model.encode(body.text)  # a character outside the vocabulary: 400 before waiting for the lock
        except CharrnnError as e:
            raise CharrnnError(str(e), "text") from None

        def answer():
            values = np.round(model.trace(body.text)[tensor.input][0].astype(np.float64), 3)
            return JSONResponse({"object": "states", "layer": tensor.layer, "role": tensor.role,
                                 "size": tensor.size, "tokens": list(body.text), "states": values.tolist(),
                                 "layers": layers})

        async with one_at_a_time:
            return await asyncio.to_thread(answer)  # the JSON is rendered there too: ~1M numbers


def page(path, media_type):
    async def serve():
        return FileResponse(path, media_type=media_type, headers=HEADERS)
    return serve
