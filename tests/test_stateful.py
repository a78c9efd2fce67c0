"""Stateful serving: prompts fed in one call beside the batch, a prefix cache, n choices fed once,
and continuation tokens that go on exactly where a generation stopped."""

import base64
import sys

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
import httpx  # noqa: E402
from test_openai import complete, model, model_path, server  # noqa: E402, F401 - the same tiny model and server
from test_serve import serving  # noqa: E402

import charrnn_runtime  # noqa: E402
from charrnn_runtime import Continuation, State  # noqa: E402
from charrnn_runtime.engine import Engine  # noqa: E402
from charrnn_runtime.prefill import PrefixCache  # noqa: E402
from charrnn_serve import tokens  # noqa: E402

SECRET = b"a test secret of 32 bytes......."


def text_of(model, length, seed):
    return model.generate("", length, seed=seed)


def counters(engine):
    metrics = engine.metrics()
    return {k: metrics[k] for k in ("prompt_chars_total", "prefix_cache_hits_total", "prefix_cache_chars_total")}


# -- the Python API -------------------------------------------------------------------------------------

def test_continuing_equals_one_longer_run(model):
    prompt = text_of(model, 20, 1)
    generator = model.generator(prompt, seed=4, temperature=0.9, length=30)
    first = generator.run()[0]
    second = model.generate("", 50, seed=4, temperature=0.9, continuation=generator.continuation())
    assert first + second == model.generate(prompt, 80, seed=4, temperature=0.9)
    with Engine(model) as engine:
        done = engine.submit(prompt, 30, seed=4, temperature=0.9).result(timeout=30)
        more = engine.submit("", 50, seed=4, temperature=0.9, continuation=done.continuation).result(timeout=30)
    assert (done.text, more.text) == (first, second)
    assert done.continuation.position == 30 and done.continuation.seed == 4


def test_a_continuation_with_a_prompt_feeds_it_after_the_state(model):
    with Engine(model) as engine:
        done = engine.submit("", 30, seed=2).result(timeout=30)
        added = text_of(model, 10, 9)
        more = engine.submit(added, 20, seed=7, continuation=done.continuation).result(timeout=30)
    assert more.text == model.generate(added, 20, seed=7, state=done.continuation.state)


def test_a_foreign_continuation_is_refused(model):
    other = Continuation(model.initial_state(), 1, 0, "0" * 64, model.variant)
    with Engine(model) as engine, pytest.raises(charrnn_runtime.CharrnnError, match="another model") as refused:
        engine.submit("", 5, continuation=other)
    assert refused.value.param == "state"


def test_the_prefix_cache_is_bounded_in_bytes_and_finds_the_longest_prefix(model):
    state = model.initial_state()
    size = sum(a.nbytes for a in state.arrays.values()) + state.logits.nbytes + sys.getsizeof("abcdefghij")
    cache = PrefixCache(max_bytes=3 * size, interval=4)  # room for three entries
    identity = ("sha", "fp32")
    for text in ("abcd", "abcdefgh", "abcdefghij"):
        cache.store(identity, text, state)
    assert cache.lookup(identity, "abcdefghij")[0] == 10  # a prompt's end, and every interval along it
    assert cache.lookup(identity, "abcdefghijXY")[0] == 8 and cache.lookup(identity, "abcdefgXY")[0] == 4
    assert cache.lookup(("other", "fp32"), "abcd") == (0, None)
    cache.store(identity, "zzzz", state)  # over the bound: the least recently used ("abcdefghij") goes
    assert cache.bytes <= cache.max_bytes and cache.lookup(identity, "abcdefghij")[0] == 8
    assert cache.checkpoints(0, 10) == [4, 8, 10] and cache.checkpoints(5, 7) == [7]


# -- over HTTP, through the openai client -----------------------------------------------------------------

def test_the_same_prompt_again_comes_from_the_cache_with_the_same_text(complete, server, model):
    _, engine = server
    prompt = text_of(model, 700, 3)
    before = counters(engine)
    cold = complete(prompt=prompt, max_tokens=40, seed=1)
    warm = complete(prompt=prompt, max_tokens=40, seed=1)
    after = counters(engine)
    assert warm.choices[0].text == cold.choices[0].text == model.generate(prompt, 40, seed=1)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.usage.prompt_tokens_details.cached_tokens == 700
    assert after["prompt_chars_total"] - before["prompt_chars_total"] == 700  # fed once
    assert after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"] == 1
    with serving(model, max_length=2000, prefix_cache_bytes=0) as (url, fresh):
        never = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 40, "seed": 1}).json()
    assert never["choices"][0]["text"] == warm.choices[0].text
    assert never["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_a_shared_preamble_feeds_only_the_new_part(complete, server, model):
    _, engine = server
    preamble = text_of(model, 600, 5)
    complete(prompt=preamble + "a", max_tokens=1, seed=1)
    before = counters(engine)
    question = text_of(model, 30, 6)
    answer = complete(prompt=preamble + question, max_tokens=20, seed=2)
    assert answer.usage.prompt_tokens_details.cached_tokens == 512  # checkpoints every 256 characters
    assert counters(engine)["prompt_chars_total"] - before["prompt_chars_total"] == 630 - 512
    assert answer.choices[0].text == model.generate(preamble + question, 20, seed=2)


def test_n_choices_feed_the_prompt_once(complete, server, model):
    _, engine = server
    prompt = text_of(model, 900, 8)
    before = counters(engine)
    answer = complete(prompt=prompt, max_tokens=15, seed=10, n=8, temperature=0.7)
    assert counters(engine)["prompt_chars_total"] - before["prompt_chars_total"] == 900
    assert [c.text for c in answer.choices] == model.generate_batch(prompt, 15, num_samples=8, seed=10,
                                                                    temperature=0.7)


@pytest.mark.parametrize("stream", [False, True])
def test_a_continuation_token_goes_on_as_one_longer_request(complete, model, stream):
    prompt = text_of(model, 30, 11)

    def ask(**fields):
        fields = dict(max_tokens=40, seed=12, temperature=0.8, **fields)
        if not stream:
            choice = complete(**fields).choices[0]
            return choice.text, choice.model_extra.get("state")
        text, state = "", None
        for chunk in complete(stream=True, **fields):
            for choice in chunk.choices:
                text += choice.text
                state = (choice.model_extra or {}).get("state") or state
        return text, state

    first, token = ask(prompt=prompt, extra_body={"return_state": True})
    second, again = ask(prompt="", extra_body={"state": token, "return_state": True})
    third, _ = ask(prompt="", extra_body={"state": again})
    assert first + second + third == model.generate(prompt, 120, seed=12, temperature=0.8)
    assert isinstance(token, str) and len(token) < 4 * (sum(t.size for t in model.state_spec) + 200)


def test_tampered_truncated_foreign_and_other_model_tokens_are_refused(complete, server, model):
    url, engine = server
    token = complete(prompt="", max_tokens=5, seed=1, extra_body={"return_state": True}).choices[0].model_extra["state"]
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[len(raw) // 2] ^= 1
    tampered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    foreign = tokens.encode(Continuation(model.initial_state(), 1, 0, model.sha256, model.variant), b"x" * 32)
    for bad in (tampered, token[:-7], token[:40], "not a token", "", foreign):
        before = engine.metrics()["generated_chars_total"]
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "", "max_tokens": 5, "state": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "state", response.text
        assert engine.metrics()["generated_chars_total"] == before


def test_even_a_signed_token_cannot_bring_bad_values_or_another_model(model):
    def signed(state, sha256=model.sha256, variant=model.variant):
        return tokens.encode(Continuation(state, 1, 0, sha256, variant), SECRET)

    poisoned = model.initial_state()
    next(iter(poisoned.arrays.values()))[0, 0] = np.nan
    huge = model.initial_state()
    huge.logits[0, 0] = 1e30
    wide = State({name: np.zeros((1, a.shape[1] + 1), np.float32) for name, a in model.initial_state().arrays.items()},
                 model.initial_state().logits)
    cases = [("non-finite", signed(poisoned)), ("out-of-range", signed(huge)), ("not fit", signed(wide)),
             ("another model", signed(model.initial_state(), sha256="f" * 64)),
             ("another model", signed(model.initial_state(), variant="int8"))]
    for message, token in cases:
        with pytest.raises(charrnn_runtime.CharrnnError, match=message) as refused:
            tokens.decode(token, SECRET, model)
        assert refused.value.param == "state"
    assert tokens.decode(signed(model.initial_state()), SECRET, model).position == 0
