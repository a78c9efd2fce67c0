"""Several engines, each in a process of its own with its share of the batch (vLLM's data-parallel
engines), behind Engine's caller API.

    engine = EnginePool(charrnn_runtime.load(variant="int8"), engines=2, max_batch=256)

One Engine's step alternates between onnxruntime, on every core it was given, and its own Python
(sampling, accepting, regrouping the batch), on one core while the others wait; and whatever else
runs on one of its cores (an HTTP server's event loop) stalls its whole step. Engines on a share
of the cores each overlap one's Python with another's model step, and a core taken from one holds
back only that one. Each submission goes to the live engine with the fewest requests in flight,
its choices together (their prompt is fed once); but each engine has its own prefix cache, so a
prompt whose first PREFIX characters were sent before goes where they went (their state is cached
there) unless that engine has a quarter of its rows more in flight than the least busy. A
continuation may go to any engine (its state is in the token). max_batch and the prefix cache's
bytes are the pool's, split evenly; max_waiting bounds the requests waiting in all engines, as one
engine's (so n choices that one engine would queue, the pool queues too).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Sequence as Listing
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .engine import EngineBusy, Submitting
from .engine_process import EngineProcess
from .errors import CharrnnError
from .params import SamplingParams
from .prefill import PrefixCache
from .request import Request
from .state import Continuation

PREFIX = PrefixCache.INTERVAL  # the first state a prompt's prefill caches on the way (shorter prompts cost little)
HOMES = 4096  # prompt beginnings remembered (least recently used out first)


class EnginePool(Submitting):
    """Engine's API (submit, submit_all, stream, generate, metrics, drain, close, status) over
    `engines` EngineProcesses of `model`; `options` are Engine's, for the whole pool. Each engine
    loads the model as `model` was loaded, with `threads` onnxruntime threads (default: the
    threads `model` was loaded with, if it was given any, else the cores shared evenly)."""

    def __init__(self, model, engines: int = 2, max_batch: int = 64, max_waiting: int = 256,
                 max_length: int = 4096, prefix_cache_bytes: int = 64 << 20, threads: int | None = None,
                 **options: Any) -> None:
        if engines < 1:
            raise CharrnnError(f"engines must be >= 1, got {engines}", "engines")
        if max_batch < engines:
            raise CharrnnError(f"max_batch must be >= engines ({engines}): each engine takes a share, got {max_batch}",
                               "max_batch")
        self.model, self.max_waiting, self.max_length = model, max_waiting, max_length
        self.identity = model.sha256, model.variant
        totals = dict(max_batch=max_batch, prefix_cache_bytes=prefix_cache_bytes)
        shares = [{name: total // engines + (i < total % engines) for name, total in totals.items()}
                  for i in range(engines)]  # exact: 3 rows over 2 engines are 2 and 1
        threads = threads or model.arguments["threads"] or max(1, cores() // engines)
        with ThreadPoolExecutor(engines) as starting:  # each loads the model: at once
            started = [starting.submit(EngineProcess, model, max_waiting=max_waiting, max_length=max_length,
                                       threads=threads, **share, **options) for share in shares]
        self.engines = [future.result() for future in started if future.exception() is None]
        failed = next((future.exception() for future in started if future.exception() is not None), None)
        if failed is not None:
            self.close()
            raise failed
        self.slack = max(1, max_batch // engines // 4)  # a quarter of an engine's rows
        self.homes: collections.OrderedDict[str, EngineProcess] = collections.OrderedDict()  # prompt head → engine
        self.rejected = 0  # refused here (each engine counts its own)
        self.lock = threading.Lock()  # routing and the queue's bound, one submission at a time

    @property
    def accepting(self) -> bool:  # Submitting's: drain and close stop every engine at once (a dead one stops alone)
        return all(engine.accepting for engine in self.engines if engine.failure is None)

    @property
    def failure(self) -> str | None:  # Submitting's, for refusals: only once no engine is left to serve
        failures = [engine.failure for engine in self.engines]
        return failures[0] if None not in failures else None

    @property
    def status(self) -> str:
        """"failed" if an engine failed (its requests did; the others serve on), else the engines' status."""
        statuses = {engine.status for engine in self.engines}
        return "failed" if "failed" in statuses else "draining" if "draining" in statuses else "ok"

    def submit_all(self, prompt: str, params: Listing[SamplingParams],
                   continuation: Continuation | None = None) -> list[Request]:
        self._checked(prompt, params, continuation)  # a bad request is refused as such, even when busy
        with self.lock:
            refusal = self._refusal(sum(engine.waiting() for engine in self.engines), len(params))
            if refusal:
                self.rejected += len(params)
                raise EngineBusy(refusal)
            return self._route(prompt).submit_all(prompt, params, continuation)

    def _route(self, prompt: str) -> EngineProcess:
        """The engine for `prompt` (with the lock held)."""
        live = [engine for engine in self.engines if engine.failure is None] or self.engines  # (then it refuses)
        engine = min(live, key=EngineProcess.in_flight)
        if len(prompt) < PREFIX:
            return engine
        home = self.homes.get(prompt[:PREFIX])
        if home in live and home.in_flight() <= engine.in_flight() + self.slack:
            engine = home
        self.homes[prompt[:PREFIX]] = engine
        self.homes.move_to_end(prompt[:PREFIX])
        if len(self.homes) > HOMES:
            self.homes.popitem(last=False)
        return engine

    def metrics(self) -> dict[str, Any]:
        """The engines' metrics added up (counters, gauges, histograms), with the refusals counted here."""
        total = add_metrics([engine.metrics() for engine in self.engines])
        return {**total, "requests_rejected_total": total["requests_rejected_total"] + self.rejected}

    def drain(self, timeout: float) -> bool:
        """Every engine drains at once; True when all finished in time."""
        return all(self._each(lambda engine: engine.drain(timeout)))

    def close(self) -> None:
        self._each(EngineProcess.close)

    def _each(self, call) -> list:
        with ThreadPoolExecutor(max(1, len(self.engines))) as pool:
            return list(pool.map(call, self.engines))


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_metrics(each: list[dict[str, Any]]) -> dict[str, Any]:
    """Engine.metrics of several engines as one: counts and gauges summed, histograms bucket by bucket."""
    total: dict[str, Any] = {}
    for name, first in each[0].items():
        values = [metrics[name] for metrics in each]
        if isinstance(first, dict) and "buckets" in first:
            by_bound = zip(*(v["buckets"] for v in values))  # each bound's (bound, count) of every engine
            total[name] = {"buckets": [(group[0][0], sum(count for _, count in group)) for group in by_bound],
                           "sum": sum(v["sum"] for v in values), "count": sum(v["count"] for v in values)}
        elif isinstance(first, dict):
            total[name] = dict(sum((collections.Counter(v) for v in values), collections.Counter()))
        else:
            total[name] = sum(values)
    return total
