import json
import math
import gc
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import charrnn_runtime
from charrnn_runtime import CharrnnError, SamplingParams, State
from charrnn_runtime.cli import main as run_cli
from charrnn_runtime.install import pip_install
from charrnn_runtime.sampling import GumbelNoise, allowed_mask, sample
from conftest import HAS_TF, SONNETS, assert_one_line_error, fake_run, run_python


@pytest.fixture(scope="module")
def model(model_path):
    return charrnn_runtime.load(model_path, provider="cpu")


@pytest.fixture(scope="module")
def prime(model):
    return "".join(ch for ch in "ROMEO: " if ch in model.index) or model.vocab[1]


def assert_same_state(a, b, atol):
    assert list(a.arrays) == list(b.arrays)
    for name in a.arrays:
        np.testing.assert_allclose(a.arrays[name], b.arrays[name], atol=atol, err_msg=name)
    np.testing.assert_allclose(a.logits, b.logits, atol=10 * atol)


# -- sampling ---------------------------------------------------------------------------------------

logits_rows = st.lists(st.floats(-30, 30, allow_nan=False), min_size=2, max_size=40).map(
    lambda row: np.array([row], np.float32))


@settings(max_examples=200, deadline=None)
@given(logits=logits_rows, k=st.integers(1, 40), seed=st.integers(0, 2**31), temperature=st.floats(0.05, 3))
def test_top_k_only_emits_the_k_most_likely(logits, k, seed, temperature):
    choice = sample(logits, SamplingParams(temperature, top_k=k), GumbelNoise([seed], logits.shape[1]).next())[0]
    # allowed: at most k-1 characters are strictly more likely than the one chosen
    assert (logits[0] > logits[0, choice]).sum() < k


@settings(max_examples=200, deadline=None)
@given(logits=logits_rows, p=st.floats(0.01, 1.0), seed=st.integers(0, 2**31), temperature=st.floats(0.05, 3))
def test_top_p_only_emits_the_nucleus(logits, p, seed, temperature):
    choice = sample(logits, SamplingParams(temperature, top_p=p), GumbelNoise([seed], logits.shape[1]).next())[0]
    probs = np.exp((logits[0] - logits[0].max()).astype(np.float64) / temperature)
    probs /= probs.sum()
    # allowed: the characters more likely than the chosen one hold less than p of the mass
    assert probs[probs > probs[choice]].sum() < p + 1e-9


def test_top_k_and_top_p_masks_combine():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    assert allowed_mask(logits, SamplingParams(1.0, top_k=3)).tolist() == [[True, True, True, False]]
    assert allowed_mask(logits, SamplingParams(1.0, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert allowed_mask(logits, SamplingParams(1.0, top_k=1, top_p=0.9)).tolist() == [[True, False, False, False]]
    assert allowed_mask(logits, SamplingParams(1.0)) is None


def test_sampling_follows_the_temperature_scaled_distribution():
    logits = np.log(np.array([[0.6, 0.3, 0.1]], np.float32))
    noise = GumbelNoise([0], 3)
    counts = np.bincount([sample(logits, SamplingParams(0.5), noise.next())[0] for _ in range(20000)], minlength=3)
    expected = np.array([0.6, 0.3, 0.1]) ** 2
    np.testing.assert_allclose(counts / 20000, expected / expected.sum(), atol=0.01)


def test_greedy_and_non_finite_logits():
    assert sample(np.array([[0.1, 3.0, 2.0]], np.float32), SamplingParams(0), np.zeros((1, 3)))[0] == 1
    with pytest.raises(CharrnnError, match="non-finite"):
        sample(np.array([[0.1, np.nan, 2.0]], np.float32), SamplingParams(), np.zeros((1, 3)))


@pytest.mark.parametrize("params", [dict(temperature=-1), dict(temperature=math.nan), dict(temperature=math.inf),
                                    dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_params(params):
    with pytest.raises(CharrnnError):
        SamplingParams(**params)


def test_noise_block_size_does_not_change_the_stream():
    a = GumbelNoise([5], 7)
    first = [a.next().copy() for _ in range(300)]
    b = GumbelNoise([5], 7)
    b.BLOCK = 7
    np.testing.assert_array_equal(first, [b.next().copy() for _ in range(300)])


# -- generation -------------------------------------------------------------------------------------

def test_seeded_generation_is_deterministic(model, prime):
    a = model.generate(prime, 120, temperature=0.8, seed=11)
    assert a == model.generate(prime, 120, temperature=0.8, seed=11)
    assert a != model.generate(prime, 120, temperature=0.8, seed=12)
    assert len(a) == 120 and set(a) <= set(model.vocab)


def test_stream_yields_the_generated_text(model, prime):
    streamed = list(model.stream(prime, 50, seed=3, top_k=5))
    assert all(len(ch) == 1 for ch in streamed)
    assert "".join(streamed) == model.generate(prime, 50, seed=3, top_k=5)


def test_continue_in_later_calls_equals_one_long_run(model, prime):
    generator = model.generator(prime, seed=21, temperature=0.9)
    pieces = generator.run(40) + generator.run(60)
    assert "".join(pieces) == model.generate(prime, 100, seed=21, temperature=0.9)


def test_fast_loop_equals_a_naive_step_by_step_loop(model, prime):
    """The bound-buffer Stepper (feed, generators) against plain session.run steps."""
    text = prime + model.generate(prime, 40, seed=8)
    fed = model.feed(model.initial_state(2), text)
    gc.collect()  # the feeding Stepper's buffers are freed and reused: the snapshot must not point into them
    naive = model.initial_state(2)
    for char in model.encode(text):
        naive = model.step(naive, [char, char])
    assert_same_state(fed, naive, atol=1e-5)
    np.testing.assert_allclose(fed.logits, naive.logits, atol=1e-4)
    generator = model.generator(text, seed=1)
    ids = generator.next_ids()
    snapshot = generator.state
    assert_same_state(snapshot, model.step(fed.select([0]), ids), atol=1e-5)
    # OrtValue.numpy() views memory the OrtValue frees: a snapshot must own its arrays
    assert all(a.flags.owndata for s in (fed, snapshot) for a in (s.logits, *s.arrays.values()))


@pytest.fixture(scope="module")
def int8_model(model_path):
    model = charrnn_runtime.load(model_path, provider="cpu", variant="int8")
    assert model.loop_session is not None  # int8 bundles carry the sampling loop
    return model


@pytest.fixture(scope="module")
def int8_stepped(model_path):
    """The same model without the sampling loop: one session run and one numpy draw per character."""
    model = charrnn_runtime.load(model_path, provider="cpu", variant="int8", sampling_loop=False)
    assert model.loop_session is None
    return model


@pytest.mark.parametrize("options", [dict(seed=1), dict(seed=2, temperature=0.5), dict(seed=3, temperature=0)])
def test_sampling_loop_draws_what_the_step_loop_draws(int8_model, int8_stepped, prime, options):
    """The in-graph loop (64 characters per call) against the step-by-step loop, and the state after it."""
    looped = int8_model.generator(prime, **options)
    stepped = int8_stepped.generator(prime, **options)
    assert looped.block_size == 64
    assert "".join(looped.stream(150)) == "".join(stepped.stream(150))
    assert_same_state(looped.state, stepped.state, atol=0)


def test_sampling_loop_stops_where_the_step_loop_stops(int8_model, int8_stepped, prime):
    """A stop string or a closed stream mid-block leaves the state just after the last character used."""
    text = int8_model.generate(prime, 200, seed=5)
    stop = text[70:72]
    looped, stepped = int8_model.generator(prime, seed=5), int8_stepped.generator(prime, seed=5)
    assert "".join(looped.stream(200, stop)) == "".join(stepped.stream(200, stop))
    assert_same_state(looped.state, stepped.state, atol=0)
    assert "".join(looped.stream(100)) == "".join(stepped.stream(100))  # the noise continues in step too
    streams = looped.stream(200), stepped.stream(200)
    assert [next(streams[0]) for _ in range(10)] == [next(streams[1]) for _ in range(10)]
    for stream in streams:
        stream.close()
    assert_same_state(looped.state, stepped.state, atol=0)
    looped, stepped = int8_model.generator(prime, seed=6), int8_stepped.generator(prime, seed=6)
    assert looped.run(200, stop=[stop, "\n"]) == stepped.run(200, stop=[stop, "\n"])  # run(): one row here
    assert_same_state(looped.state, stepped.state, atol=0)


def test_top_k_top_p_and_batches_sample_step_by_step(int8_model, prime):
    """Where the step loop measured faster (batches) or the graph cannot sample (top-k/top-p)."""
    assert int8_model.generator(prime, top_k=5).loop is None
    assert int8_model.generator(prime, top_p=0.9).loop is None
    assert int8_model.generator(prime, num_samples=3).loop is None


def test_a_damaged_sampling_loop_is_refused(model_path, tmp_path, prime):
    copy = tmp_path / "bundle"
    shutil.copytree(model_path, copy)
    loop = copy / json.loads((copy / "manifest.json").read_text())["sampling_loops"]["int8"]
    loop.write_bytes(loop.read_bytes()[:-10])
    model = charrnn_runtime.load(copy, provider="cpu", variant="int8")  # the cell is fine
    with pytest.raises(CharrnnError, match="corrupted"):
        model.generate(prime, 10)
    assert model.generate(prime, 10, top_k=3)  # top-k never needs the loop


def test_feeding_in_pieces_equals_feeding_at_once(model, prime):
    text = model.generate(prime, 30, seed=1)
    whole = model.feed(model.initial_state(), prime + text)
    pieces = model.feed(model.feed(model.initial_state(), prime), text)
    assert_same_state(whole, pieces, atol=1e-5)


def test_fork_fans_out_to_the_same_texts_as_separate_runs(model, prime):
    primed = model.feed(model.initial_state(), prime)  # prime once
    forked = charrnn_runtime.Generator(model, primed.fork(3), SamplingParams(0.7), seed=100).run(60)
    singles = [model.generate(prime, 60, temperature=0.7, seed=100 + i) for i in range(3)]
    assert forked == singles
    assert len(set(singles)) > 1


def test_batch_rows_equal_single_runs(model, prime):
    batch = model.generate_batch(prime, 80, num_samples=5, seed=40, top_p=0.95)
    assert batch == [model.generate(prime, 80, seed=40 + i, top_p=0.95) for i in range(5)]


def test_generation_continues_from_a_saved_state(model, prime, tmp_path):
    state = model.feed(model.initial_state(), prime)
    state.save(tmp_path / "state.npz")
    loaded = State.load(tmp_path / "state.npz")
    assert_same_state(loaded, state, atol=0)
    copy = state.copy()
    for array in copy.arrays.values():
        array[:] = 0
    assert all(array.any() for array in state.arrays.values())  # a copy is independent
    assert (model.generate("", 50, seed=2, state=loaded) == model.generate(prime, 50, seed=2))
    wider = {name: np.zeros((1, array.shape[1] + 1), np.float32) for name, array in loaded.arrays.items()}
    State(wider, loaded.logits).save(tmp_path / "other.npz")
    with pytest.raises(CharrnnError, match="state does not fit this model"):
        model.generate("", 5, state=State.load(tmp_path / "other.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(CharrnnError, match="not a saved charrnn state"):
        State.load(tmp_path / "junk.npz")


def test_stop_strings_end_generation(model, prime):
    text = model.generate(prime, 300, seed=9)
    stop = text[100:102]
    stopped = model.generate(prime, 300, seed=9, stop=stop)
    assert stopped.endswith(stop) and text.startswith(stopped) and len(stopped) <= 102
    rows = model.generate_batch(prime, 300, num_samples=3, seed=9, stop=[stop])
    assert rows[0] == stopped


def test_eight_threads_share_one_model(model, prime):
    expected = [model.generate(prime, 100, seed=s, temperature=0.8) for s in range(8)]
    results = [None] * 8

    def work(i):
        results[i] = model.generate(prime, 100, seed=i, temperature=0.8)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def test_empty_prime_starts_from_a_uniform_first_character(model):
    state = model.initial_state(2)
    assert [a.shape for a in state.arrays.values()] == [(2, t.size) for t in model.state_spec]
    assert not state.logits.any()
    assert len(model.generate("", 20, seed=1)) == 20


def test_score_matches_stepping_by_hand(model, prime):
    text = prime + model.generate(prime, 60, seed=4)
    result = model.score(text)
    ids = model.encode(text)
    state, nll = model.initial_state(), 0.0
    for current, target in zip(ids[:-1], ids[1:]):
        state = model.step(state, [current])
        z = state.logits[0].astype(np.float64)
        nll -= z[target] - z.max() - np.log(np.exp(z - z.max()).sum())
    assert result["loss"] == pytest.approx(nll / (len(ids) - 1))
    assert result["bits_per_char"] == pytest.approx(result["loss"] / math.log(2))


def test_windowed_score_is_the_mean_over_windows_scored_from_the_start(model, prime):
    text = prime + model.generate(prime, 100, seed=4)
    windows = [text[i * 20: i * 20 + 21] for i in range((len(text) - 1) // 20)]
    expected = np.mean([model.score(w)["loss"] for w in windows])
    result = model.score(text, window=20)
    assert result["chars"] == 20 * len(windows) and result["loss"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(CharrnnError, match="window 500 needs at least 501"):
        model.score(text, window=500)


def test_unknown_characters_are_named_with_positions(model):
    with pytest.raises(CharrnnError, match=r"'€' at 2.*'\\t' at 4"):
        model.encode("ab€c\t")


# -- CLI ----------------------------------------------------------------------------------------------

def _run(*args):
    return CliRunner().invoke(run_cli, [str(a) for a in args])




def test_cli_streams_prime_and_text(model_path, model, prime):
    command = ["--model", model_path, "--prime", prime, "--length", 40, "--seed", 3, "--provider", "cpu"]
    result = subprocess.run([sys.executable, "-m", "charrnn_runtime", *map(str, command)], capture_output=True,
                            text=True)  # real stdout and stderr: click < 8.2's CliRunner mixes them
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prime + model.generate(prime, 40, seed=3))
    assert "chars/s" in result.stderr and "seed 3" in result.stderr


def test_cli_json(model_path, model, prime):
    result = _run("--model", model_path, "--prime", prime, "--length", 30, "--seed", 5, "--num-samples", 2,
                  "--temperature", 0.5, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["provider"] in ("cpu", "cuda") and out["sha256"] == model.sha256
    assert [s["seed"] for s in out["samples"]] == [5, 6]
    assert out["samples"][1]["text"] == model.generate(prime, 30, seed=6, temperature=0.5)
    assert out["settings"]["temperature"] == 0.5 and out["chars_per_second"] > 0


def test_cli_num_samples_prints_each(model_path, prime):
    result = _run("--model", model_path, "--prime", prime, "--length", 10, "--num-samples", 3, "--seed", 1)
    assert result.exit_code == 0 and result.stdout.count("=== sample") == 3


def test_cli_help_explains_every_option():
    result = _run("--help")
    for option in ("--model", "--prime", "--length", "--temperature", "--top-k", "--top-p", "--seed",
                   "--num-samples", "--stop", "--provider", "--json", "default"):
        assert option in result.output


@pytest.mark.parametrize("args, fragment", [
    (["--prime", "ROMEO€"], "'€' at 5"),
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--top-k", "0"], "top-k"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--length", "-1"], "--length"),
    (["--length", "ten"], "--length"),
    (["--num-samples", "0"], "--num-samples"),
])
def test_cli_bad_input(model_path, args, fragment):
    assert_one_line_error(_run("--model", model_path, *args), fragment)


def test_cli_missing_and_foreign_files(tmp_path):
    assert_one_line_error(_run("--model", tmp_path / "nope"), "model not found")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01junk")
    assert_one_line_error(_run("--model", tmp_path / "junk.onnx"), "cannot load ONNX model")
    (tmp_path / "dir").mkdir()
    assert_one_line_error(_run("--model", tmp_path / "dir"), "not a charrnn model bundle")


def test_model_lookup_is_path_then_environment_then_packaged_model(model_path, tmp_path, monkeypatch):
    from charrnn_runtime import bundle

    monkeypatch.setenv("CHARRNN_MODEL", str(model_path))
    assert charrnn_runtime.load(provider="cpu").path == model_path
    with pytest.raises(CharrnnError, match="^model not found: "):  # a given path is never swapped for another
        charrnn_runtime.load(tmp_path / "nope")
    monkeypatch.setenv("CHARRNN_MODEL", str(tmp_path / "nope"))
    assert_one_line_error(_run("--length", 1), "tried: model path (none given), $CHARRNN_MODEL=", "model not found")
    monkeypatch.delenv("CHARRNN_MODEL")
    monkeypatch.setattr(bundle, "DEFAULT_MODEL", tmp_path / "gone")
    with pytest.raises(CharrnnError, match=r"model path \(none given\), \$CHARRNN_MODEL \(not set\), the packaged "
                                           r"model \(model not found: .*gone\)"):
        charrnn_runtime.load()


def test_cli_corrupted_bundle(model_path, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(model_path, bundle, ignore=shutil.ignore_patterns("saved_model", "training"))
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    assert_one_line_error(_run("--model", bundle), "corrupted")


@pytest.mark.skipif(not HAS_TF, reason="building foreign ONNX files needs onnx")
def test_cli_onnx_without_or_with_wrong_metadata(model_path, tmp_path):
    import onnx

    model = onnx.load(str(model_path / "model.onnx"))
    meta = json.loads(model.metadata_props[0].value)
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "plain.onnx"))
    assert_one_line_error(_run("--model", tmp_path / "plain.onnx"), "not a charrnn model")
    entry = model.metadata_props.add()
    wider = [{**meta["state"][0], "size": meta["state"][0]["size"] + 1}, *meta["state"][1:]]
    fewer = meta["state"][:-1] or [{**meta["state"][0], "input": "h"}]
    for name, state in (("wider", wider), ("fewer", fewer)):
        entry.key, entry.value = "charrnn", json.dumps({**meta, "state": state})
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        assert_one_line_error(_run("--model", tmp_path / f"{name}.onnx"), "metadata does not match")


@pytest.mark.skipif(not HAS_TF, reason="rewriting ONNX metadata needs onnx")
def test_format_1_bundles_still_load(tiny_bundle, tmp_path):
    """Bundles exported before the state list (format 1: one GRU, `hidden` of `units`, no sampling loop)."""
    import onnx

    from charrnn_runtime.files import sha256_file

    old = tmp_path / "old"
    old.mkdir()
    model = onnx.load(str(tiny_bundle / "model.onnx"))
    facts = json.loads(model.metadata_props[0].value)
    facts = {"format": "charrnn", "format_version": 1, "vocab": facts["vocab"], "vocab_size": facts["vocab_size"],
             "units": facts["state"][0]["size"], "initial_state": "zeros",
             "tensors": {"char": "char", "hidden": "hidden", "logits": "logits", "next_hidden": "next_hidden"}}
    model.metadata_props[0].value = json.dumps(facts)
    onnx.save(model, str(old / "model.onnx"))
    shutil.copy2(tiny_bundle / "model.int8.onnx", old / "model.int8.onnx")
    files = {name: sha256_file(old / name) for name in ("model.onnx", "model.int8.onnx")}
    (old / "manifest.json").write_text(json.dumps({**facts, "variants": {"fp32": "model.onnx", "int8": "model.int8.onnx"},
                                                   "files": files}))
    for variant in ("fp32", "int8"):
        loaded, current = (charrnn_runtime.load(path, provider="cpu", variant=variant) for path in (old, tiny_bundle))
        assert [t.input for t in loaded.state_spec] == ["hidden"] and loaded.loop_session is None
        assert loaded.generate("", 80, seed=3) == current.generate("", 80, seed=3)


def test_cli_cuda_requested_but_unavailable(model_path):
    from charrnn_runtime.providers import cuda_unavailable_reason

    if cuda_unavailable_reason() is None:
        pytest.skip("this machine may really have CUDA")
    assert_one_line_error(_run("--model", model_path, "--provider", "cuda"), "CUDA requested but unavailable")


# -- what the runtime imports -------------------------------------------------------------------------

def test_runtime_never_imports_tensorflow(model_path):
    code = f"""
import sys
from click.testing import CliRunner
import charrnn_runtime
from charrnn_runtime.cli import main
model = charrnn_runtime.load({str(model_path)!r}, provider="cpu")
model.generate("", 5, seed=0)
result = CliRunner().invoke(main, ["--model", {str(model_path)!r}, "--prime", "", "--length", "5"])
assert result.exit_code == 0, result.output
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx", "onnx", "jax", "torch"))
print(heavy)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


# -- CUDA (runs only where a session really lands on CUDA) ---------------------------------------------

@pytest.fixture(scope="module")
def cuda_model(model_path):
    try:
        return charrnn_runtime.load(model_path, provider="cuda")
    except CharrnnError as e:
        pytest.skip(f"no CUDA here: {e}")


@pytest.mark.cuda
def test_cuda_keeps_the_state_on_the_gpu_and_matches_cpu(cuda_model, model, prime):
    assert cuda_model.provider == "cuda" and "CUDAExecutionProvider" in cuda_model.session.get_providers()
    generator = cuda_model.generator(prime, seed=1)
    assert all(b.device_name().lower() == "cuda" for pair in generator.stepper.buffers.values() for b in pair)
    assert_same_state(generator.state, model.feed(model.initial_state(), prime), atol=1e-4)
    assert cuda_model.generate(prime, 200, temperature=0) == model.generate(prime, 200, temperature=0)


@pytest.mark.cuda
def test_cuda_batch_and_seeds(cuda_model, prime):
    batch = cuda_model.generate_batch(prime, 50, num_samples=4, seed=3)
    assert batch == [cuda_model.generate(prime, 50, seed=3 + i) for i in range(4)]


@pytest.mark.skipif(HAS_TF, reason="checks an install without the [train] extra")
def test_training_commands_name_the_extra_they_need(tmp_path):
    train_args = ["--corpus", SONNETS, "--batch-size", 1, "--out", tmp_path / "run"]
    for module, args in (("charrnn_train", train_args), ("charrnn_export", [fake_run(tmp_path / "done")])):
        result = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        command = module.replace("_", "-")
        assert result.stderr.strip() == f"Error: {command} needs the [train] extra: {pip_install('train')}"


def test_cli_stops_quietly_when_the_reader_goes_away(model_path):
    command = f"{sys.executable} -m charrnn_runtime --model {model_path} --length 5000 | head -c 10"
    result = subprocess.run(["bash", "-c", f"{command}; exit ${{PIPESTATUS[0]}}"], capture_output=True, text=True)
    assert len(result.stdout) == 10 and result.stderr == "" and result.returncode == 1
