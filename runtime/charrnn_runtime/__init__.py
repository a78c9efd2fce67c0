"""charrnn runtime: generate text from an exported charrnn model with numpy and onnxruntime only.

    import charrnn_runtime
    model = charrnn_runtime.load(provider="auto")          # the shipped Shakespeare model
    print(model.generate("ROMEO: ", length=200, seed=1))

The API is imported lazily, so `charrnn_runtime.files`/`.errors` (shared with training and export)
do not need onnxruntime.
"""

import importlib

_API = {"load": "model", "Model": "model", "State": "model", "Generator": "model",
        "SamplingParams": "sampling", "CharrnnError": "errors", "DEFAULT_MODEL": "bundle",
        "Engine": "engine", "EngineBusy": "engine", "Completion": "engine"}
__all__ = list(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'charrnn_runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
