"""charrnn runtime: generate text from an exported charrnn model with numpy and onnxruntime only.

    import charrnn_runtime
    model = charrnn_runtime.load(provider="auto")          # the shipped Shakespeare model
    print(model.generate("ROMEO: ", length=200, seed=1))

The API is imported lazily, so `charrnn_runtime.files`/`.errors` (shared with training and export)
do not need onnxruntime.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_API = {"load": "model", "Model": "model", "State": "state", "Generator": "generator",
        "SamplingParams": "params", "Sequence": "sequence", "Continuation": "state", "CharrnnError": "errors", "DEFAULT_MODEL": "bundle",
        "Engine": "engine", "EngineBusy": "engine", "Completion": "engine", "EngineProcess": "engine_process",
        "EnginePool": "engine_pool"}
__all__ = list(_API)

if TYPE_CHECKING:  # what type checkers and IDEs see of the lazy API
    from .bundle import DEFAULT_MODEL
    from .engine import Completion, Engine, EngineBusy
    from .engine_pool import EnginePool
    from .engine_process import EngineProcess
    from .errors import CharrnnError
    from .generator import Generator
    from .model import Model, load
    from .params import SamplingParams
    from .sequence import Sequence
    from .state import Continuation, State


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'charrnn_runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
