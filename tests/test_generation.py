"""One design for every generation driver: SamplingParams validated once, a Sequence per generation
(where length and stop rules live), Generator and Engine as thin drivers over it."""

import asyncio
import math
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SHIPPED, assert_one_line_error, run_python

import charrnn_runtime
from charrnn_runtime import CharrnnError, SamplingParams, Sequence
from charrnn_runtime.cli import main as run_cli
from charrnn_runtime.engine import LOOP_WINDOW, WINDOW, Engine
from charrnn_runtime.sequence import Status

VOCAB = list("abc\n")


@pytest.fixture(scope="module")
def model(model_path):
    return charrnn_runtime.load(model_path, provider="cpu")


# -- SamplingParams: every field validated in one place, each refusal naming its field ------------------

@pytest.mark.parametrize("field, value", [
    ("temperature", -1), ("temperature", float("nan")), ("temperature", "1"), ("temperature", True),
    ("top_k", 0), ("top_k", 2.5), ("top_k", True), ("top_p", 0), ("top_p", 1.5), ("top_p", "0.5"),
    ("seed", -3), ("seed", 2**64), ("seed", 1.0), ("seed", True), ("stop", [""]), ("stop", [1]), ("stop", ["a", None]),
    ("length", -1), ("length", 2.5), ("length", True), ("length", "10"),
])
def test_each_refusal_names_its_field(field, value):
    with pytest.raises(CharrnnError) as refused:
        SamplingParams(**{field: value})
    assert refused.value.param == field


def test_the_seed_is_drawn_once_and_stop_strings_normalised():
    params = SamplingParams(stop="\n")
    assert params.stop == ("\n",) and 0 <= params.seed < 2**31
    assert params.replace(length=5).seed == params.seed  # a copy keeps the drawn seed
    assert [params.row(i).seed for i in range(3)] == [params.seed, params.seed + 1, params.seed + 2]
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b") and SamplingParams(stop=None).stop == ()
    assert SamplingParams(0.5, 3, 0.9, seed=1, logit_bias={2: 1.5}).sampler == (0.5, 3, 0.9, ((2, 1.5),))


# -- Sequence: the one place where a generated character can end a generation ---------------------------

def test_a_sequence_goes_through_its_states():
    sequence = Sequence([0, 1], SamplingParams(seed=0, length=3), VOCAB)
    assert sequence.status is Status.WAITING
    sequence.start_prefill()
    assert sequence.status is Status.PREFILL
    sequence.prefilled(cached=2)
    assert sequence.status is Status.GENERATING and sequence.cached == 2
    assert [sequence.accept(2), sequence.accept(0), sequence.accept(1)] == [False, False, True]
    assert (sequence.status, sequence.finish_reason, sequence.text) == (Status.FINISHED, "length", "cab")


def test_a_stop_string_ends_a_sequence_where_it_completes():
    sequence = Sequence([], SamplingParams(seed=0, stop=["ca", "\n"], length=100), VOCAB)
    sequence.prefilled()
    assert [sequence.accept(i) for i in (0, 1, 2, 0)] == [False, False, False, True]
    assert (sequence.finish_reason, sequence.text) == ("stop", "abca")


def test_a_whole_stop_string_not_yet_judged_is_never_readable():
    """Another thread may read between a character joining the text and `accept` ending the sequence."""
    sequence = Sequence([], SamplingParams(seed=0, stop=["ca", "\n"], length=100, include_stop=False), VOCAB)
    sequence.prefilled()
    sequence.chars += ["a", "b", "c", "a"]  # the moment before accept's judgement
    assert sequence.readable() == 2


def test_zero_length_finishes_once_its_prompt_is_fed_with_its_logprobs():
    sequence = Sequence([0, 2], SamplingParams(seed=0, length=0, prompt_logprobs=1), VOCAB)
    sequence.prefilled(np.log([[0.25] * 4, [0.1, 0.2, 0.3, 0.4]]))
    assert (sequence.status, sequence.finish_reason) == (Status.FINISHED, "length")
    assert sequence.prompt_logprobs[0] is None
    assert sequence.prompt_logprobs[1] == (pytest.approx(np.log(0.3)), {"\n": pytest.approx(np.log(0.4)),
                                                                        "c": pytest.approx(np.log(0.3))})


@pytest.mark.parametrize("stop", [(), ("ab",)])
def test_accepting_many_equals_accepting_each(stop):
    ids = np.random.default_rng(0).integers(0, len(VOCAB), 300)
    one, many = (Sequence([], SamplingParams(seed=0, stop=stop, length=250), VOCAB) for _ in range(2))
    for sequence in (one, many):
        sequence.prefilled()
    used = 0
    while not one.finished:
        one.accept(ids[used])
        used += 1
    assert many.accept_many(ids) == used and (many.text, many.finish_reason) == (one.text, one.finish_reason)


# -- the drivers: model.generate, the Engine (threaded or stepped by hand), the CLI ---------------------

def test_bad_values_are_charrnn_errors_everywhere(model):
    for call in (lambda: model.generate("", 5, seed=-3), lambda: model.generate("", True),
                 lambda: model.generate_batch("", 5, num_samples=0)):
        with pytest.raises(CharrnnError):
            call()
    assert_one_line_error(CliRunner().invoke(run_cli, ["--seed", "-3"]), "--seed")


def test_params_or_fields_give_the_same_text(model):
    params = SamplingParams(0.8, top_k=5, seed=4, stop="\n", length=60)
    expected = model.generate("", 60, temperature=0.8, top_k=5, seed=4, stop="\n")
    assert model.generator("", params=params).run() == [expected]
    with Engine(model) as engine:
        assert engine.submit("", params=params).result(timeout=30).text == expected


def test_an_engine_without_a_thread_is_stepped_by_its_caller(model):
    engine = Engine(model, max_batch=2, background=False)
    requests = [engine.submit("", 30 + i, seed=i, temperature=0.7) for i in range(3)]
    steps = 0
    while engine.step():
        steps += 1
    assert [r.result(timeout=0).text for r in requests] == [model.generate("", 30 + i, seed=i, temperature=0.7)
                                                             for i in range(3)]
    # A freed row is taken at the end of the engine's window of steps, or at once when no row is left
    # generating: the first row frees after step 30, the second after step 31.
    joins = min(math.ceil(30 / WINDOW) * WINDOW, 31) + 1
    assert steps == joins - 1 + 32
    assert engine.step() == 0
    engine.close()


def test_rows_that_end_anywhere_in_a_window_continue_exactly(model):
    """Rows end mid-window (length, stop string, cancelled) while others join: each one's continuation
    (state and noise position) goes on as one longer solo run."""
    engine = Engine(model, max_batch=4, background=False)
    settings = [dict(length=WINDOW + 3), dict(length=2 * WINDOW, stop="e"), dict(length=WINDOW - 3),
                dict(length=3 * WINDOW + 1, stop=" "), dict(length=40)]
    requests = [engine.submit("", seed=i, temperature=0.9, **options) for i, options in enumerate(settings)]
    for _ in range(WINDOW + 3):  # the last one takes the row of the third at the first window's end
        engine.step()
    assert requests[4].admitted_at is not None and engine.window_step not in (0, WINDOW)
    requests[4].cancel()  # it has a row by now, in the middle of a window
    while engine.step():
        pass
    assert requests[4].finish_reason == "cancelled" and 0 < len(requests[4].sequence.chars) < 40
    for i, request in enumerate(requests):
        done = request.result(timeout=0)
        more = model.generate("", 20, seed=i, temperature=0.9, continuation=done.continuation)
        assert done.text + more == model.generate("", len(done.text) + 20, seed=i, temperature=0.9)
    engine.close()


def test_a_row_that_accepts_at_the_windows_end_is_cancelled_there_and_continues_exactly(model):
    """A row only its length can end takes its characters at the window's end: cancelled mid-window,
    it stops there, with the text and the state of those steps."""
    engine = Engine(model, max_batch=2, background=False)
    long, short = (engine.submit("", length, seed=i, temperature=0.9) for i, length in ((5, 40), (6, 2 * WINDOW)))
    for _ in range(WINDOW + 1):  # into the second window: both have begun, only the first is far from its end
        engine.step()
    assert engine.deferred == [0] and engine.judged == [1] and engine.window_step == 1
    assert len(long.sequence.chars) == WINDOW and len(short.sequence.chars) == WINDOW + 1
    long.cancel()
    while engine.step():
        pass
    done = long.result(timeout=0)
    assert done.finish_reason == "cancelled" and len(done.text) == 2 * WINDOW
    more = model.generate("", 20, seed=5, temperature=0.9, continuation=done.continuation)
    assert done.text + more == model.generate("", 2 * WINDOW + 20, seed=5, temperature=0.9)
    assert short.result(timeout=0).text == model.generate("", 2 * WINDOW, seed=6, temperature=0.9)
    engine.close()


def test_a_lone_plain_row_runs_its_window_in_the_sampling_loop(model_path):
    """One row of plain sampling takes LOOP_WINDOW steps per call of the int8 bundle's sampling loop (as
    model.generate does); a newcomer joins at the window's end, and both texts and the continuation
    equal their solo runs."""
    int8 = charrnn_runtime.load(model_path, provider="cpu", variant="int8")
    engine = Engine(int8, background=False)
    first = engine.submit("", 2 * LOOP_WINDOW + 5, seed=3, temperature=0.8)
    assert engine.step() == 1 and engine.metrics()["steps_total"] == LOOP_WINDOW
    second = engine.submit("", 30, seed=4, temperature=0.8, stop="\n\n")
    while engine.step():
        pass
    assert first.result(timeout=0).text == int8.generate("", 2 * LOOP_WINDOW + 5, seed=3, temperature=0.8)
    assert second.result(timeout=0).text == int8.generate("", 30, seed=4, temperature=0.8, stop="\n\n")
    more = int8.generate("", 20, seed=3, temperature=0.8, continuation=first.result(timeout=0).continuation)
    assert first.result(timeout=0).text + more == int8.generate("", 2 * LOOP_WINDOW + 25, seed=3, temperature=0.8)
    engine.close()


def test_one_handle_serves_threads_and_asyncio(model):
    with Engine(model) as engine:
        request = engine.submit("", 50, seed=9)
        from_thread = {}
        reader = threading.Thread(target=lambda: from_thread.setdefault("text", request.result(timeout=30).text))
        reader.start()
        from_asyncio = asyncio.run(request.wait()).text
        reader.join()
        streamed = engine.submit("", 50, seed=9)
        assert "".join(streamed) == from_thread["text"] == from_asyncio == model.generate("", 50, seed=9)


def test_old_names_still_work_with_a_deprecation_warning(model):
    with pytest.warns(DeprecationWarning, match="prompt="):
        assert model.generate(prime="a" if "a" in model.index else "", length=20, seed=1) == \
            model.generate("a" if "a" in model.index else "", 20, seed=1)
    with pytest.warns(DeprecationWarning, match="max_length"), Engine(model, max_chars=50) as engine:
        assert engine.max_length == engine.max_chars == 50
        with pytest.warns(DeprecationWarning, match="length="):
            assert engine.submit("", max_chars=10, seed=2).result(timeout=30).text == model.generate("", 10, seed=2)


def test_importing_the_runtime_and_its_engine_loads_no_cli_web_or_tensorflow_module():
    code = f"""
import sys
import charrnn_runtime
from charrnn_runtime.engine import LOOP_WINDOW, WINDOW, Engine
from charrnn_runtime.engine_pool import EnginePool
from charrnn_runtime.engine_process import EngineProcess
for kind in (Engine, EngineProcess, EnginePool):
    with kind(charrnn_runtime.load({str(SHIPPED)!r}, provider="cpu")) as engine:
        engine.submit("", 5, seed=0).result()
heavy = ("click", "fastapi", "starlette", "uvicorn", "ray", "charrnn_serve", "tensorflow", "keras", "tf2onnx", "onnx")
print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
