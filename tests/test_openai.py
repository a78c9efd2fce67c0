"""OpenAI's completions semantics through the real `openai` client and raw httpx: stop strings left
out, logprobs (checked against the ONNX file stepped by hand), echo, include_usage, logit_bias,
/tokenize and /detokenize, unsupported fields refused, timeouts, readiness and latency histograms."""

import asyncio
import functools
import json
import time

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
import httpx  # noqa: E402
import openai  # noqa: E402
from conftest import HAS_TF, SHIPPED  # noqa: E402
from test_serve import serving, wait_until_idle  # noqa: E402

import charrnn_runtime  # noqa: E402
from charrnn_runtime import bundle  # noqa: E402
from charrnn_runtime.engine import Engine  # noqa: E402
from charrnn_runtime.engine_pool import EnginePool  # noqa: E402
from charrnn_runtime.engine_process import EngineProcess  # noqa: E402
from charrnn_runtime.stepper import Stepper  # noqa: E402


@pytest.fixture(scope="module")
def model_path(request):
    """The tiny GRU (fast) when TensorFlow can export it, else the shipped model."""
    return request.getfixturevalue("tiny_bundle") if HAS_TF else SHIPPED


@pytest.fixture(scope="module")
def model(model_path):
    return charrnn_runtime.load(model_path, provider="cpu")


@pytest.fixture(scope="module", params=[Engine, EngineProcess, functools.partial(EnginePool, engines=2)],
                ids=["in-process", "own-process", "pool"])
def server(model, request):
    """The server over each engine: the batch loop in its process, in one of its own (the default), or two."""
    with serving(model, request.param, max_length=1000) as running:
        yield running


@pytest.fixture(scope="module")
def complete(server, model):
    """client.completions.create for this server's model."""
    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0)
    return functools.partial(client.completions.create, model=model.path.name)


def reference_logprobs(model_path, text):
    """log p(text[i] | text[:i]) for every i, from the ONNX file stepped with plain session.run."""
    session = ort.InferenceSession(str(bundle.find(model_path).onnx), providers=["CPUExecutionProvider"])
    facts = bundle.read_facts(session, model_path)
    index = {ch: i for i, ch in enumerate(facts["vocab"])}
    spec = bundle.state_spec(facts)
    state = {t.input: np.zeros((1, t.size), np.float32) for t in spec}
    logits, rows = np.zeros(len(facts["vocab"])), []
    for char in text:
        z = logits.astype(np.float64)
        rows.append(z - z.max() - np.log(np.exp(z - z.max()).sum()))
        outputs = session.run(None, {facts["tensors"]["char"]: np.array([index[char]], np.int32), **state})
        named = dict(zip((o.name for o in session.get_outputs()), outputs))
        logits = named[facts["tensors"]["logits"]][0]
        state = {t.input: named[t.output] for t in spec}
    return rows, index


def stop_in_the_middle(model, seed):
    text = model.generate("", 200, seed=seed)
    return text, text[80:83]


def test_stop_strings_are_left_out_streamed_or_not(complete, model):
    text, stop = stop_in_the_middle(model, 3)
    expected = text[:text.index(stop)]
    answer = complete(prompt="", max_tokens=200, seed=3, stop=stop)
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (expected, "stop")
    assert answer.usage.completion_tokens == len(expected) + len(stop)  # generated, stop string included
    chunks = [c.choices[0].text for c in complete(
        prompt="", max_tokens=200, seed=3, stop=stop, stream=True) if c.choices]
    assert "".join(chunks) == expected and not any(stop in c for c in chunks)
    kept = complete(prompt="", max_tokens=200, seed=3, stop=stop,
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == expected + stop


def test_a_partial_stop_string_is_held_back_until_decided(model):
    """A stop string whose first characters come often: streamed pieces never show a prefix that
    then turns out to be the stop string, and show it once it turns out not to be."""
    text, _ = stop_in_the_middle(model, 4)
    stop = text[100] + "\x00"  # starts with a real character, never completes
    with charrnn_runtime.engine.Engine(model, flush_seconds=0) as engine:
        request = engine.submit("", 200, seed=4, stop=stop, include_stop=False)
        pieces = list(request)
    assert "".join(pieces) == text and request.finish_reason == "length"
    assert not any(piece.endswith(stop[0]) for piece in pieces[:-1])  # held until the next character came


def test_logprobs_equal_the_onnx_file_stepped_by_hand(complete, model, model_path):
    prompt = model.generate("", 30, seed=1)
    answer = complete(prompt=prompt, max_tokens=40, seed=5, temperature=0.8, logprobs=3)
    choice = answer.choices[0]
    logprobs = choice.logprobs
    reference, index = reference_logprobs(model_path, prompt + choice.text)
    assert logprobs.tokens == list(choice.text) and logprobs.text_offset == list(range(len(choice.text)))
    for i, char in enumerate(choice.text):
        row = reference[len(prompt) + i]
        assert logprobs.token_logprobs[i] == pytest.approx(row[index[char]], abs=1e-4)
        top = {model.vocab[j] for j in np.argsort(-row)[:3]}
        alternatives = logprobs.top_logprobs[i]
        assert top | {char} == set(alternatives) and len(alternatives) <= 4
        assert all(lp == pytest.approx(row[index[c]], abs=1e-4) for c, lp in alternatives.items())
    same = complete(prompt=prompt, max_tokens=40, seed=5, temperature=0.8)
    assert same.choices[0].text == choice.text and same.choices[0].logprobs is None  # recording changes nothing


def test_echo_with_max_tokens_0_scores_the_prompt(complete, model, model_path):
    prompt = model.generate("", 60, seed=2)
    answer = complete(prompt=prompt, max_tokens=0, echo=True, logprobs=len(model.vocab))
    choice = answer.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and answer.usage.completion_tokens == 0
    reference, index = reference_logprobs(model_path, prompt)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:],
                               [reference[i][index[c]] for i, c in enumerate(prompt) if i], atol=1e-4)
    assert len(choice.logprobs.top_logprobs[1]) == len(model.vocab)  # up to the vocabulary, an extension
    loss = -np.mean(choice.logprobs.token_logprobs[1:])
    assert loss == pytest.approx(model.score(prompt)["loss"], abs=1e-4)
    echoed = complete(prompt=prompt, max_tokens=10, echo=True, seed=1)
    assert echoed.choices[0].text == prompt + model.generate(prompt, 10, seed=1)


def test_streamed_logprobs_and_echo_equal_the_whole_answer(complete, model):
    prompt = model.generate("", 20, seed=6)
    options = dict(prompt=prompt, max_tokens=50, seed=7, logprobs=2, echo=True)
    whole = complete(**options).choices[0]
    text, tokens, offsets, logprobs = "", [], [], []
    for chunk in complete(stream=True, **options):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs:
                tokens += choice.logprobs.tokens
                offsets += choice.logprobs.text_offset
                logprobs += choice.logprobs.token_logprobs
    assert (text, tokens, offsets) == (whole.text, whole.logprobs.tokens, whole.logprobs.text_offset)
    assert logprobs == whole.logprobs.token_logprobs


def test_include_usage_sends_a_last_chunk_with_usage(complete):
    chunks = list(complete(prompt="", max_tokens=30, seed=1, n=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 60
    assert all(c.usage is None for c in chunks[:-1])


def test_logit_bias_forces_and_bans_characters(complete, model):
    answer = complete(prompt="", max_tokens=20, seed=1, logit_bias={"5": 100})
    assert answer.choices[0].text == model.vocab[5] * 20
    banned = {str(i): -100 for i in range(len(model.vocab) - 1)}
    answer = complete(prompt="", max_tokens=20, seed=1, logit_bias=banned)
    assert answer.choices[0].text == model.vocab[-1] * 20


def test_a_completion_id_is_its_request_id(server):
    response = httpx.post(f"{server[0]}/v1/completions", json={"prompt": "", "max_tokens": 3})
    request_id = response.headers["x-request-id"]
    assert request_id.startswith("req_") and response.json()["id"] == "cmpl-" + request_id.removeprefix("req_")


def test_tokenize_and_detokenize(server, model):
    url, _ = server
    text = model.generate("", 25, seed=3)
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": text}).json()
    assert tokens["count"] == 25 and tokens["tokens"] == model.encode(text).tolist()
    assert httpx.post(f"{url}/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": text}
    for path, body, param in [("/tokenize", {"prompt": "\x00"}, "prompt"), ("/detokenize", {"tokens": [10**6]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens"), ("/tokenize", {"prompt": "a", "model": "x"},
                                                                             "model")]:
        response = httpx.post(f"{url}{path}", json=body)
        assert response.status_code in (400, 404) and response.json()["error"]["param"] == param


@pytest.mark.parametrize("fields, param", [
    ({"best_of": 2}, "best_of"), ({"suffix": "x"}, "suffix"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1.0}, "frequency_penalty"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logit_bias": {"a": 1}}, "logit_bias"), ({"logit_bias": {"0": 101}}, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"), ({"logprobs": -1}, "logprobs"), ({"logprobs": 10**6}, "logprobs"),
    ({"echo": "yes"}, "echo"), ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
])
def test_what_is_not_supported_is_refused_by_name(server, fields, param):
    url, engine = server
    before = engine.metrics()["generated_chars_total"]
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "", "max_tokens": 5, **fields})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert engine.metrics()["generated_chars_total"] == before
    neutral = httpx.post(f"{url}/v1/completions", json={"prompt": "", "max_tokens": 5, "best_of": 1, "suffix": "",
                                                        "presence_penalty": 0, "frequency_penalty": 0})
    assert neutral.status_code == 200


def test_latency_histograms_in_prometheus(server, complete):
    url, _ = server
    complete(prompt="", max_tokens=5)
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    for name in ("charrnn_time_to_first_char_seconds", "charrnn_e2e_request_latency_seconds",
                 "charrnn_request_queue_time_seconds"):
        assert f"# TYPE {name} histogram" in lines
        buckets = [line for line in lines if line.startswith(f"{name}_bucket")]
        counts = [float(line.rsplit(" ", 1)[1]) for line in buckets]
        assert buckets[-1].startswith(f'{name}_bucket{{le="+Inf"}}') and counts == sorted(counts) and counts[-1] >= 1


def test_a_request_timeout_ends_with_the_text_so_far(model):
    with serving(model, max_length=100_000, request_timeout=0.3) as (url, engine):
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "", "max_tokens": 100_000, "seed": 1},
                            timeout=30).json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "timeout" and 0 < len(choice["text"]) < 100_000
    assert choice["text"] == model.generate("", len(choice["text"]), seed=1)


def test_a_queue_timeout_is_503_with_retry_after(model):
    with serving(model, max_batch=1, max_length=10**7, queue_timeout=0.2) as (url, engine):
        async def both():
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                long = asyncio.create_task(http.post("/v1/completions", json={"prompt": "", "max_tokens": 10**7}))
                while not engine.metrics()["active_rows"]:
                    await asyncio.sleep(0.01)
                for stream in (False, True):
                    queued = await http.post("/v1/completions", json={"prompt": "", "max_tokens": 5, "stream": stream})
                    assert queued.status_code == 503 and queued.headers["retry-after"] == "1"
                    assert "queue timeout" in queued.json()["error"]["message"]
                long.cancel()
        asyncio.run(both())
        assert wait_until_idle(engine)["active_rows"] == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the dying loop logs its error
def test_health_is_503_while_draining_and_when_the_loop_died(model, monkeypatch):
    with serving(model) as (url, engine):
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        with monkeypatch.context() as patched:  # a fault outside the model's step kills the loop
            patched.setattr(Stepper, "__init__", lambda *a: (_ for _ in ()).throw(RuntimeError("injected")))
            failed = httpx.post(f"{url}/v1/completions", json={"prompt": "", "max_tokens": 5}, timeout=10)
        assert failed.status_code == 503 and "engine stopped: injected" in failed.json()["error"]["message"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        started = time.monotonic()
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "", "max_tokens": 5}, timeout=10)
        assert refused.status_code == 503 and "engine stopped" in refused.json()["error"]["message"]
        assert time.monotonic() - started < 1  # at once, not after a hang
    with serving(model) as (url, engine):
        engine.drain(0)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"


def test_the_engine_records_what_http_returns(model):
    """The Python API has the same fields: logprobs recorded by the Sequence, the stop left out."""
    text, stop = stop_in_the_middle(model, 3)
    generator = model.generator("", seed=3, stop=stop, include_stop=False, logprobs=0, length=200)
    assert generator.run() == [text[:text.index(stop)]]
    sequence = generator.sequences[0]
    assert len(sequence.logprobs) == len(sequence.chars) and all(set(lp[1]) == {c} for lp, c in
                                                                  zip(sequence.logprobs, sequence.chars))
    assert json.dumps(sequence.logprobs)  # plain floats and strings


def test_merged_choices_keep_each_order_and_end_at_the_first_error():
    """Several choices stream as their rows produce: each choice's pieces in order, interleaved; an
    error in one ends the whole stream (the others are cancelled)."""
    from charrnn_serve.completions import merged

    async def pieces(name, count, fail=False):
        for i in range(count):
            await asyncio.sleep(0)
            yield f"{name}{i}"
        if fail:
            raise charrnn_runtime.CharrnnError("the engine stopped")

    async def read(streams):
        return [item async for item in merged(streams)]

    items = asyncio.run(read([pieces("a", 3), pieces("b", 5)]))
    assert sorted(items) == ["a0", "a1", "a2", "b0", "b1", "b2", "b3", "b4"]
    assert [i for i in items if i[0] == "b"] == ["b0", "b1", "b2", "b3", "b4"] and items[:2] == ["a0", "b0"]
    with pytest.raises(charrnn_runtime.CharrnnError, match="stopped"):
        asyncio.run(read([pieces("a", 1, fail=True), pieces("b", 1000)]))
