"""The engine behind charrnn-serve and each of its Ray replicas: the model loaded as asked, then one
Engine in this process, one EngineProcess, or an EnginePool of them."""

from charrnn_runtime import load
from charrnn_runtime.engine import Engine
from charrnn_runtime.engine_pool import EnginePool, cores
from charrnn_runtime.engine_process import EngineProcess
from charrnn_runtime.errors import CharrnnError


def start_engine(model_path, load_options: dict, engine_options: dict, engines: int | None = None,
                 engine_process: bool = True):
    """`engines` > 1: an EnginePool (each engine with an even share of the cores, unless load_options
    sets threads, and of the batch); 1: one engine, in its own process or this one.
    None: two on a CPU of two cores or more (in their own processes), else one."""
    if engines is not None and engines > 1 and not engine_process:
        raise CharrnnError("more than one engine needs --engine-process (in one process they take turns at the GIL)",
                           "engines")
    model = load(model_path, **load_options)
    if engines is None:
        engines = 2 if engine_process and model.provider == "cpu" and cores() >= 2 else 1
    if engines > 1:
        return EnginePool(model, engines, **engine_options)
    return (EngineProcess if engine_process else Engine)(model, **engine_options)
