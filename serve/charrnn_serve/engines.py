"""The engine behind charrnn-serve and each of its Ray replicas: the model loaded as asked, then one
Engine in this process, one EngineProcess, or an EnginePool of them."""

import os

from charrnn_runtime import load
from charrnn_runtime.engine import Engine
from charrnn_runtime.engine_pool import EnginePool
from charrnn_runtime.engine_process import EngineProcess
from charrnn_runtime.errors import CharrnnError


def start_engine(model_path, load_options: dict, engine_options: dict, engines: int = 1, engine_process: bool = True):
    """`engines` > 1: a pool, each engine in its own process with an even share of the cores (unless
    load_options sets threads), the batch and the queue; else one engine, in its own process or this one."""
    if engines > 1 and not engine_process:
        raise CharrnnError("more than one engine needs --engine-process (in one process they take turns at the GIL)",
                           "engines")
    if engines > 1 and load_options.get("threads") is None:
        load_options = {**load_options, "threads": max(1, len(os.sched_getaffinity(0)) // engines)}
    model = load(model_path, **load_options)
    if engines > 1:
        return EnginePool(model, engines, **engine_options)
    return (EngineProcess if engine_process else Engine)(model, **engine_options)
