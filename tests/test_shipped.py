"""The shipped Shakespeare bundle: intact, still equal to its SavedModel, and what the report trained.

From an installed wheel, SHIPPED is the packaged runtime part: manifest and ONNX variants only.
"""

import json

import numpy as np
import pytest

import charrnn_runtime
from charrnn_runtime.files import sha256_file
from conftest import FULL_BUNDLE, ROOT, SHIPPED, SONNETS, needs_tf

pytestmark = pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="no shipped model")


@pytest.fixture(scope="module")
def manifest():
    return json.loads((SHIPPED / "manifest.json").read_text())


@pytest.fixture(scope="module")
def model():
    return charrnn_runtime.load(SHIPPED, provider="cpu")


def test_manifest_hashes_match_the_files(manifest):
    present = {name for name in manifest["files"] if (SHIPPED / name).is_file()}
    packaged = {*manifest["variants"].values(), *manifest["sampling_loops"].values(), *manifest["prefill"].values()}
    assert present == (set(manifest["files"]) if FULL_BUNDLE else packaged)
    for name in present:
        assert sha256_file(SHIPPED / name) == manifest["files"][name], name


def test_load_without_a_path_loads_the_shipped_model(manifest, monkeypatch):
    monkeypatch.delenv("CHARRNN_MODEL", raising=False)
    assert charrnn_runtime.load(provider="cpu").sha256 == manifest["files"]["model.onnx"]


def test_it_is_the_reports_model_trained_to_the_reports_loss(manifest, model):
    assert manifest["vocab_size"] == 65 and manifest["network"]["layers"] == [{"cell": "gru", "units": 1024}]
    assert manifest["parameters"] == 4_021_569
    config = manifest["training"]["config"]
    assert (config["epochs"], config["batch_size"], config["seq_length"], config["embedding_dim"]) == (10, 64, 100, 256)
    assert manifest["training"]["final"]["loss"] <= 1.30
    for fmt in ("saved_model", "onnx", "onnx-reference"):
        assert manifest["validation"][fmt]["max_abs_logit_diff"] <= 1e-4
    assert model.vocab == manifest["vocab"]


@pytest.mark.skipif(not FULL_BUNDLE, reason="the packaged model has the runtime part only")
def test_the_bundle_keeps_its_training_run():
    for name in ("history.json", "loss.png", "model.keras"):
        assert (SHIPPED / "training" / name).is_file()
    assert (SHIPPED / "sample.txt").read_text().startswith("ROMEO: ")


@pytest.fixture(scope="module")
def saved_model_step():
    pytest.importorskip("tensorflow")
    from charrnn_export.export import saved_model_step

    return saved_model_step(SHIPPED / "saved_model", charrnn_runtime.load(SHIPPED).state_spec)


@needs_tf
def test_onnx_logits_match_the_saved_model_on_a_few_hundred_characters(model, saved_model_step):
    from charrnn_export.export import onnx_step
    from charrnn_export.validate import step_through

    text = SONNETS.read_text()[:300]
    ids = model.encode(text)[None, :]
    onnx_logits = step_through(onnx_step(model.session, model.state_spec), ids, model.state_spec)
    saved_logits = step_through(saved_model_step, ids, model.state_spec)
    assert np.abs(onnx_logits - saved_logits).max() < 1e-4


@needs_tf
def test_greedy_runtime_equals_greedy_saved_model_for_200_characters(model, saved_model_step):
    prime = "ROMEO: "
    state, chars = model.initial_state().arrays, model.encode(prime)
    for char in chars:
        logits, state = saved_model_step(np.array([char], np.int32), state)
    out = []
    for _ in range(200):
        char = int(np.argmax(logits[0]))
        out.append(model.vocab[char])
        logits, state = saved_model_step(np.array([char], np.int32), state)
    assert model.generate(prime, 200, temperature=0) == "".join(out)


def test_score_of_held_out_sonnets_is_far_below_uniform(model):
    text = SONNETS.read_text()[:500]
    assert model.score(text)["bits_per_char"] < 3.0 < np.log2(65)


STACKED = ROOT / "models" / "shakespeare-gru2x512"


@pytest.mark.skipif(not (STACKED / "manifest.json").is_file(), reason="not in a source checkout")
def test_the_stacked_gru_bundle_is_intact_and_held_its_validation_text_out():
    manifest = json.loads((STACKED / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert sha256_file(STACKED / name) == digest, name
    assert manifest["network"]["layers"] == [{"cell": "gru", "units": 512}] * 2
    config = manifest["training"]["config"]
    assert config["validation_fraction"] == 0.1 and config["layers"] == 2 and config["dropout"] > 0
    history = json.loads((STACKED / "training" / "history.json").read_text())
    best = min(history, key=lambda r: r["val_loss"])
    assert manifest["training"]["model_epoch"] == manifest["training"]["final"]["epoch"] == best["epoch"]
    assert sum(r["seconds"] for r in history) <= 2 * 3600  # the budget: two hours of training
    model = charrnn_runtime.load(STACKED, provider="cpu")
    assert [t.input for t in model.state_spec] == ["hidden_0", "hidden_1"]
    assert model.score(SONNETS.read_text()[:500])["bits_per_char"] < 3.0
    assert (STACKED / "sample.txt").read_text().startswith("ROMEO: ")


@pytest.mark.skipif(not (STACKED / "manifest.json").is_file(), reason="not in a source checkout")
def test_the_stacked_gru_meets_the_held_out_target_under_nanogpts_protocol():
    """The README's figure, recomputed: the last 10% of Tiny Shakespeare in windows of 256, <= 1.45 nats."""
    from charrnn_train.data import DEFAULT_CORPUS, held_out_start, read_corpus

    text = read_corpus(DEFAULT_CORPUS)
    held_out = text[held_out_start(len(text), 0.1):]
    assert len(held_out) == 111_539
    loss = charrnn_runtime.load(STACKED, provider="cpu").score(held_out, window=256)["loss"]
    assert loss <= 1.45 and loss == pytest.approx(1.4417, abs=5e-5)
