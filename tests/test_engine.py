"""The continuous-batching engine: identity with solo runs, limits, cancellation, drain, errors.

Each test that needs no patching of the engine's insides runs for both engines: Engine in the
caller's process and EngineProcess (the same Engine in a process of its own)."""

import asyncio
import functools
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import charrnn_runtime
from charrnn_runtime import CharrnnError, SamplingParams
from charrnn_runtime.engine import Completion, Engine, EngineBusy
from charrnn_runtime.engine_pool import EnginePool
from charrnn_runtime.engine_process import EngineProcess
from charrnn_runtime.stepper import Stepper
from conftest import run_python


@pytest.fixture(scope="module")
def model(model_path):
    return charrnn_runtime.load(model_path, provider="cpu")


POOL = functools.partial(EnginePool, engines=2)


@pytest.fixture(params=[Engine, EngineProcess, POOL], ids=["in-process", "own-process", "pool"])
def engine_type(request):
    return request.param


@pytest.fixture(params=[Engine, EngineProcess], ids=["in-process", "own-process"])
def one_engine_type(request):
    """For tests of one row (a pool has one per engine at least)."""
    return request.param


@pytest.fixture
def engine(model, engine_type):
    with engine_type(model, max_batch=64, max_waiting=256, max_length=1000) as engine:
        yield engine


def random_requests(model, count, seed=0):
    """(prompt, length, settings) triples: different prompts, lengths, temperatures, top-k/top-p, stops."""
    rng = np.random.default_rng(seed)
    letters = [ch for ch in "ROMEO: JULIET\nabcdefg" if ch in model.index] or model.vocab[:5]
    requests = []
    for i in range(count):
        prompt = "".join(rng.choice(letters, int(rng.integers(0, 15))))
        settings = dict(temperature=float(rng.choice([0.0, 0.5, 1.0, 1.5])), seed=1000 + i,
                        top_k=[None, 3, 10][i % 3], top_p=[None, 0.9][i % 2],
                        stop=[model.vocab[int(rng.integers(len(model.vocab)))]] if i % 5 == 0 else ())
        requests.append((prompt, int(rng.integers(0, 250)), settings))
    return requests


def assert_concurrent_requests_equal_their_solo_runs(engine, model, requests):
    async def all_at_once():
        return await asyncio.gather(*(engine.generate(p, n, **s) for p, n, s in requests))
    completions = asyncio.run(all_at_once())
    for completion, (prompt, length, settings) in zip(completions, requests, strict=True):
        assert completion.text == model.generate(prompt, length, **settings)
        assert completion.seed == settings["seed"] and completion.prompt_chars == len(prompt)
        expected = "length" if len(completion.text) == length else "stop"
        assert completion.finish_reason == expected
    return completions


def test_64_concurrent_requests_each_equal_their_solo_run(engine, model):
    completions = assert_concurrent_requests_equal_their_solo_runs(engine, model, random_requests(model, 64))
    metrics = engine.metrics()
    assert metrics["active_rows"] == 0 and metrics["waiting_requests"] == 0
    assert metrics["generated_chars_total"] == sum(len(c.text) for c in completions)
    assert metrics["batch_rows_sum"] / metrics["steps_total"] > 8  # they really shared steps


def test_int8_concurrent_requests_each_equal_their_solo_run(model_path, engine_type):
    """int8 rows share no quantization scale, so batching never changes a request's text; solo plain
    temperature sampling even runs through the sampling loop, which the engine never uses."""
    int8 = charrnn_runtime.load(model_path, provider="cpu", variant="int8")
    with engine_type(int8, max_batch=32, max_waiting=64, max_length=1000) as engine:
        assert_concurrent_requests_equal_their_solo_runs(engine, int8, random_requests(int8, 32, seed=8))


def test_requests_arriving_while_others_generate_join_the_batch(engine, model):
    requests = random_requests(model, 12, seed=1)

    async def staggered():
        tasks = []
        for prompt, length, settings in requests:
            tasks.append(asyncio.create_task(engine.generate(prompt, length, **settings)))
            await asyncio.sleep(0.002)
        return await asyncio.gather(*tasks)
    for completion, (prompt, length, settings) in zip(asyncio.run(staggered()), requests, strict=True):
        assert completion.text == model.generate(prompt, length, **settings)


def test_max_batch_bounds_the_rows_and_the_rest_wait_their_turn(model, engine_type):
    requests = random_requests(model, 10, seed=2)
    with engine_type(model, max_batch=3) as engine:
        handles = [engine.submit(p, n, **s) for p, n, s in requests]
        texts = [h.result(timeout=60).text for h in handles]
        metrics = engine.metrics()
    assert texts == [model.generate(p, n, **s) for p, n, s in requests]
    assert metrics["batch_rows_sum"] <= 3 * metrics["steps_total"]


def test_streaming_sends_chunks_not_characters(model, engine_type):
    with engine_type(model, flush_seconds=0.05) as engine:
        async def collect():
            request = engine.stream("", 1000, seed=5)
            return [chunk async for chunk in request], request.finish_reason
        chunks, finish_reason = asyncio.run(collect())
    assert "".join(chunks) == model.generate("", 1000, seed=5) and finish_reason == "length"
    assert len(chunks) < 100


def test_a_streams_first_text_comes_at_once_whatever_its_interval(model, monkeypatch):
    """Many streams space their wake-ups out (here every 30 s), but not a stream's first text: a
    reader that waits from its admission (as the server does) gets it after the first step."""
    sample = Engine._sample_and_accept
    monkeypatch.setattr(Engine, "_sample_and_accept", lambda self: (time.sleep(0.05), sample(self))[1])  # slow steps
    with Engine(model, flush_seconds=30, max_length=10**6) as engine:
        async def first_chunk(seed):
            request = engine.stream("", 10**6, seed=seed, stop=["never"])  # one step at a time; ended by the reader
            await request.admitted()
            admitted = time.monotonic()
            async for chunk in request:
                return chunk, time.monotonic() - admitted

        async def two_streams():
            return await asyncio.gather(first_chunk(1), first_chunk(2))
        firsts = asyncio.run(two_streams())
    for seed, (chunk, waited) in zip((1, 2), firsts):
        assert chunk and waited < 5 and model.generate("", len(chunk), seed=seed) == chunk


def test_a_stream_is_refused_before_it_is_read(engine):
    async def submit_only():
        with pytest.raises(CharrnnError, match="top-k"):
            engine.stream("", 10, top_k=0)
    asyncio.run(submit_only())


def test_threads_use_the_blocking_api(engine, model):
    results = {}

    def work(i):
        results[i] = "".join(engine.submit("", 80, seed=i, temperature=0.8))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: model.generate("", 80, seed=i, temperature=0.8) for i in range(8)}


def test_zero_length_and_a_random_seed_is_reported(engine, model):
    prompt = model.vocab[1] * 3
    assert engine.submit(prompt, 0, seed=3).result(timeout=10) == Completion("", "length", 3, 3, 0, cached_chars=0)
    completion = engine.submit("", 40).result(timeout=10)
    assert completion.text == model.generate("", 40, seed=completion.seed)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt="\x00"), "not in the model's vocabulary"),
    (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0), "top-p"),
    (dict(top_k=0), "top-k"),
    (dict(length=1001), "length must be an integer in [0, 1000]"),
    (dict(length=-1), "length"),
    (dict(length=2.5), "length"),
    (dict(length=True), "length"),
    (dict(stop=[""]), "stop strings"),
    (dict(seed=-4), "seed"),
    (dict(seed=2**64), "seed"),
])
def test_bad_requests_are_refused_at_once(engine, kwargs, message):
    call = dict(prompt="", length=10) | kwargs
    with pytest.raises(CharrnnError, match=message.replace("[", r"\[").replace("]", r"\]")) as refused:
        engine.submit(call.pop("prompt"), call.pop("length"), **call)
    assert refused.value.param == next(iter(kwargs))  # the field, for the HTTP layer to map
    assert engine.metrics()["waiting_requests"] == 0


def test_a_full_queue_refuses_with_busy(model, one_engine_type):
    with one_engine_type(model, max_batch=1, max_waiting=2, max_length=100_000) as engine:
        running = engine.submit("", 100_000)
        while engine.metrics()["active_rows"] == 0:
            time.sleep(0.001)
        queued = [engine.submit("", 5), engine.submit("", 5)]
        with pytest.raises(EngineBusy, match="busy"):
            engine.submit("", 5)
        assert engine.metrics()["requests_rejected_total"] == 1
        running.cancel()
        assert running.result(timeout=10).finish_reason == "cancelled"
        assert [q.result(timeout=10).finish_reason for q in queued] == ["length", "length"]


def test_closing_a_stream_frees_its_row(engine):
    async def read_a_little():
        chunks = aiter(engine.stream("", 1000, seed=1))
        await anext(chunks)
        await chunks.aclose()
    asyncio.run(read_a_little())
    assert_cancelled_once(engine)


def test_a_cancelled_task_cancels_its_request(engine):
    async def cancel_soon():
        task = asyncio.create_task(engine.generate("", 1000))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(cancel_soon())
    assert_cancelled_once(engine)


def assert_cancelled_once(engine):
    """The engine frees the row (or drops the queued request) at its next step."""
    deadline = time.monotonic() + 10
    while engine.metrics()["requests_total"] != {"cancelled": 1} and time.monotonic() < deadline:
        time.sleep(0.001)
    metrics = engine.metrics()
    assert metrics["requests_total"] == {"cancelled": 1}
    assert metrics["active_rows"] == metrics["waiting_requests"] == 0


def test_drain_finishes_what_runs_and_refuses_new_requests(model, engine_type):
    with engine_type(model, max_length=100_000) as engine:
        running = engine.submit("", 300, seed=2)
        assert engine.drain(timeout=60)
        assert running.result(timeout=1).text == model.generate("", 300, seed=2)
        with pytest.raises(EngineBusy, match="shutting down"):
            engine.submit("", 5)
    with engine_type(model, max_length=10_000_000) as engine:
        endless = engine.submit("", 10_000_000)
        assert not engine.drain(timeout=0.2)  # too long to finish: cancelled at the deadline
        assert endless.result(timeout=10).finish_reason == "cancelled"


def test_drain_waits_for_a_prompt_being_fed(model, monkeypatch):
    """A request whose prompt is being fed is in no queue and in no row: drain still waits for it."""
    import charrnn_runtime.engine as engine_module
    feed = engine_module.prefill
    monkeypatch.setattr(engine_module, "prefill", lambda *args: (time.sleep(0.5), feed(*args))[1])
    with Engine(model) as engine:
        running = engine.submit("ROMEO: ", 20, seed=2)
        time.sleep(0.1)  # being fed now
        assert engine.metrics()["waiting_requests"] == 1
        assert engine.drain(timeout=60)
        assert running.done and running.result().text == model.generate("ROMEO: ", 20, seed=2)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(model, monkeypatch):
    with Engine(model) as engine:
        with monkeypatch.context() as patched:  # a fault injected into the model's step
            patched.setattr(Stepper, "step", lambda *a: (_ for _ in ()).throw(RuntimeError("broken model")))
            with pytest.raises(CharrnnError, match="generation failed: broken model"):
                engine.submit("", 10).result(timeout=10)
        assert engine.submit("", 10, seed=1).result(timeout=10).text == model.generate("", 10, seed=1)
        assert engine.metrics()["requests_total"]["error"] == 1


def test_closing_the_engine_cancels_everything(model, one_engine_type):
    engine = one_engine_type(model, max_batch=1, max_length=10_000_000)
    running, queued = engine.submit("", 10_000_000), engine.submit("", 10)
    engine.close()
    assert running.result(timeout=10).finish_reason == queued.result(timeout=10).finish_reason == "cancelled"
    with pytest.raises(EngineBusy):
        engine.submit("", 1)


def test_an_engine_process_that_dies_fails_what_it_runs_at_once_and_says_so(model):
    engine = EngineProcess(model, max_length=10_000_000)
    running = engine.submit("", 10_000_000)
    while engine.metrics()["active_rows"] == 0:
        time.sleep(0.001)
    engine.process.kill()
    with pytest.raises(EngineBusy, match="the engine stopped: its process exited"):
        running.result(timeout=10)
    assert engine.status == "failed"
    with pytest.raises(EngineBusy, match="the engine stopped"):
        engine.submit("", 5)
    engine.close()


def test_an_engine_process_outlives_a_ctrl_c_and_ends_with_its_caller(model):
    """Ctrl-C reaches the whole process group: the caller drains and closes its engine, which must not
    die first. If the caller dies without closing it, the engine's process ends with the pipe."""
    with EngineProcess(model) as engine:
        os.kill(engine.process.pid, signal.SIGINT)
        assert engine.submit("", 20, seed=1).result(timeout=10).text == model.generate("", 20, seed=1)
    assert engine.process.returncode == 0
    code = f"""
import charrnn_runtime, os
from charrnn_runtime.engine_process import EngineProcess
engine = EngineProcess(charrnn_runtime.load({str(model.arguments["path"])!r}, provider="cpu"))
print(engine.process.pid, flush=True)
os._exit(0)
"""
    result = run_python(code)
    pid = int(result.stdout.split()[0])
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)


def pid_alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_an_engine_process_refuses_bad_options_at_once(model):
    with pytest.raises(CharrnnError, match="max_batch must be >= 1"):
        EngineProcess(model, max_batch=0)


def test_a_pool_spreads_requests_over_its_engines_and_adds_up_their_metrics(model):
    requests = random_requests(model, 16, seed=3)
    with EnginePool(model, engines=2, max_batch=16) as pool:
        handles = [pool.submit(p, n, **s) for p, n, s in requests]
        assert [h.result(timeout=60).text for h in handles] == [model.generate(p, n, **s) for p, n, s in requests]
        each, total = [engine.metrics() for engine in pool.engines], pool.metrics()
    assert [m["max_batch"] for m in each] == [8, 8] and total["max_batch"] == 16 and total["engines"] == 2
    assert all(sum(m["requests_total"].values()) >= 4 for m in each)  # 8 each, unless one ended while submitting
    for name in ("generated_chars_total", "steps_total", "batch_rows_sum"):
        assert total[name] == sum(m[name] for m in each) > 0
    assert sum(total["requests_total"].values()) == 16
    latency = total["e2e_request_latency_seconds"]
    assert latency["count"] == 16 and latency["buckets"][-1][1] == 16


def test_a_pool_sends_a_long_prompt_where_its_beginning_is_cached(model):
    """Each engine has its own prefix cache: a prompt whose first 256 characters went to one engine
    goes there again (while it is not much busier than the other), and its prefill starts from them."""
    preamble = "".join(model.vocab[i % len(model.vocab)] for i in range(300))
    with EnginePool(model, engines=2, max_batch=8, max_length=10_000_000) as pool:
        first = pool.submit(preamble + "A", 5, seed=1)
        home = next(engine for engine in pool.engines if engine.in_flight())
        assert first.result(timeout=60).cached_chars == 0
        busy = home.submit("", 10_000_000, seed=1)  # its home one request busier than the other engine
        again = pool.submit(preamble + "B", 5, seed=2)
        assert home.in_flight() == 2 and again.result(timeout=60).cached_chars == 256
        busy.cancel()


def test_a_pool_serves_on_when_one_engine_dies(model):
    with EnginePool(model, engines=2, max_length=10_000_000) as pool:
        running = [pool.submit("", 10_000_000, seed=i) for i in range(2)]  # one on each
        pool.engines[0].process.kill()
        with pytest.raises(EngineBusy, match="its process exited"):
            running[0].result(timeout=10)
        assert pool.status == "failed"  # a balancer routes elsewhere; meanwhile the other engine serves
        assert pool.submit("", 20, seed=1).result(timeout=10).text == model.generate("", 20, seed=1)
        running[1].cancel()


def test_a_pool_bounds_the_requests_waiting_in_all_its_engines(model):
    """max_waiting is the pool's, as one engine's: n choices that fit it are queued (on one engine),
    one more request is refused and counted."""
    with EnginePool(model, engines=2, max_batch=2, max_waiting=4, max_length=100_000) as pool:
        running = [pool.submit("", 100_000, seed=i) for i in range(2)]  # a row of each engine
        while pool.metrics()["active_rows"] < 2:
            time.sleep(0.001)
        queued = pool.submit_all("", [SamplingParams(length=5, seed=i) for i in range(4)])
        with pytest.raises(EngineBusy, match="busy: 4 requests already waiting"):
            pool.submit("", 5)
        with pytest.raises(CharrnnError, match="length must be") as bad:  # a bad request is refused as such
            pool.submit("", 10**9)
        assert not isinstance(bad.value, EngineBusy) and pool.metrics()["requests_rejected_total"] == 1
        for request in running:
            request.cancel()
        assert [q.result(timeout=30).text for q in queued] == [model.generate("", 5, seed=i) for i in range(4)]


def test_a_pool_refuses_bad_options_at_once(model):
    with pytest.raises(CharrnnError, match="engines must be >= 1"):
        EnginePool(model, engines=0)
    with pytest.raises(CharrnnError, match="max_batch must be >= engines") as refused:
        EnginePool(model, engines=4, max_batch=3)
    assert refused.value.param == "max_batch"
    with pytest.raises(CharrnnError, match="max_length must be >= 1"):
        EnginePool(model, engines=2, max_length=0)
