"""AWD-LSTM's regularisers and weight averaging in charrnn-train: each does what it claims in training,
leaves inference (and export) plain, and resumes exactly."""

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, needs_tf

pytestmark = needs_tf

AWD = dict(layers=2, dropout=0.2, locked_dropout=True, embedding_dropout=0.1, weight_drop=0.3, weight_decay=0.1,
           average="ema", average_start=2, ema_decay=0.9, validation_fraction=0.2)


def _quiet(line):
    pass


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_weight_drop_uses_one_dropped_recurrent_kernel_per_batch_and_the_full_kernel_in_inference(cell):
    import keras

    from charrnn_train.model import CELLS, WEIGHT_DROP_CELLS

    rate = 0.5
    dropped = WEIGHT_DROP_CELLS[cell](6, weight_drop=rate, return_sequences=True)
    plain = CELLS[cell](6, return_sequences=True)
    x = np.random.default_rng(0).normal(size=(3, 7, 4)).astype(np.float32)
    dropped(x), plain(x)
    plain.set_weights(dropped.get_weights())
    np.testing.assert_allclose(dropped(x, training=False), plain(x), atol=1e-6)

    state = dropped.seed_generator.state
    state.assign(np.array([1, 2], dtype=state.dtype))
    trained = np.asarray(dropped(x, training=True))
    state.assign(np.array([1, 2], dtype=state.dtype))  # draw the mask that call drew
    kernel = dropped.cell.recurrent_kernel.numpy()
    mask = np.asarray(keras.random.dropout(np.ones_like(kernel), rate, seed=dropped.seed_generator))
    assert set(np.unique(mask)) == {0.0, 1 / (1 - rate)}  # inverted dropout: kept weights scaled up
    weights = plain.get_weights()
    plain.set_weights([weights[0], kernel * mask, weights[2]])
    np.testing.assert_allclose(trained, plain(x), atol=1e-5)  # every step of every sequence: that one mask
    assert not np.allclose(dropped(x, training=True), trained)  # the next batch draws another mask
    np.testing.assert_array_equal(dropped.cell.recurrent_kernel.numpy(), kernel)  # the variable is untouched


def test_embedding_dropout_drops_whole_characters_per_batch():
    import keras

    from charrnn_train.model import EmbeddingDropout

    layer = EmbeddingDropout(20, 5, rate=0.5)
    ids = np.tile(np.arange(20, dtype=np.int32), (4, 3))  # every character 12 times in the batch
    full = np.asarray(layer(ids))
    np.testing.assert_array_equal(full, np.asarray(keras.layers.Embedding(20, 5, weights=layer.get_weights())(ids)))
    out = np.asarray(layer(ids, training=True))
    ratio = out / full
    for char in range(20):
        kept = np.unique(np.round(ratio[ids == char], 5))
        assert len(kept) == 1 and kept[0] in (0.0, 2.0)  # all of a character's occurrences dropped or kept
    assert 0 < (ratio[0, :20, 0] == 0).sum() < 20


def test_locked_dropout_keeps_one_mask_for_all_steps_of_a_sequence():
    from charrnn_train.model import build_model

    model = build_model(10, embedding_dim=64, units=8, dropout=0.5, locked_dropout=True)
    dropout = model.get_layer("dropout_0")
    x = np.ones((3, 9, 64), dtype=np.float32)
    out = np.asarray(dropout(x, training=True))
    assert (out == out[:, :1, :]).all()  # the same mask at every step
    assert not (out == out[:1]).all()  # each sequence its own
    unlocked = build_model(10, embedding_dim=64, units=8, dropout=0.5).get_layer("dropout_0")
    assert not (np.asarray(unlocked(x, training=True)) == out[:, :1, :]).all()


def test_adamw_decays_every_weight_apart_from_the_gradient_step():
    import keras

    from charrnn_train.model import build_model, compile_model

    x = np.random.default_rng(0).integers(0, 10, (4, 6)).astype(np.int32)
    after = {}
    for decay in (0.0, 0.5):
        keras.utils.set_random_seed(1)
        model = compile_model(build_model(10, embedding_dim=4, units=8), learning_rate=0.01, weight_decay=decay)
        before = model.get_weights()
        model.train_on_batch(x, x)
        after[decay] = model.get_weights()
    assert type(model.optimizer).__name__ == "AdamW"
    for w0, adam, adamw in zip(before, after[0.0], after[0.5], strict=True):
        np.testing.assert_allclose(adamw - adam, -0.01 * 0.5 * w0, atol=1e-6)


def test_defaults_build_the_plain_network_with_adam():
    """The report's network: it trains with a GRU whose loop projects the inputs first (the same
    weights and arithmetic), and saves plain Keras layers."""
    import keras

    from charrnn_train import train

    config = train.Config()
    model = config.build(65)
    assert [type(layer).__name__ for layer in model.layers] == ["Embedding", "ProjectedGRU", "Dense"]
    assert isinstance(model.layers[1], keras.layers.GRU)
    assert [type(layer).__name__ for layer in config.build(65, regularised=False).layers] == ["Embedding", "GRU", "Dense"]
    assert (config.weight_drop, config.embedding_dropout, config.weight_decay, config.average) == (0, 0, 0, "none")
    assert not config.locked_dropout


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_the_runs_model_is_the_average_of_the_weights_after_every_step(tmp_path, tiny_corpus, kind):
    import keras

    from charrnn_train import train

    class Record(keras.callbacks.Callback):
        weights = []

        def on_train_batch_end(self, batch, logs=None):
            self.weights.append(self.model.get_weights())

    config = train.Config(corpus=str(tiny_corpus), average=kind, average_start=2, ema_decay=0.8, **TINY)
    run = train.start(config, tmp_path / "run")
    record = Record()
    history = train.train(run, log=_quiet, callbacks=[record])
    steps = len(record.weights) // 2
    assert [r["averaged_steps"] for r in history] == [0, steps]
    averaged = record.weights[steps:]  # epoch 2's steps only
    if kind == "swa":
        expected = [np.mean(ws, axis=0) for ws in zip(*averaged)]
    else:
        expected = [np.array(w) for w in averaged[0]]
        for weights in averaged[1:]:
            expected = [e + 0.2 * (w - e) for e, w in zip(expected, weights)]
    model = keras.models.load_model(run.model_file)
    for got, want in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(model.get_weights()[1], record.weights[-1][1])  # not the last step's weights


def test_validation_measures_the_averaged_weights(tmp_path, tiny_corpus):
    import keras

    from charrnn_train import data, train

    config = train.Config(corpus=str(tiny_corpus), average="swa", validation_fraction=0.2, **TINY)
    run = train.start(config, tmp_path / "run")
    history = train.train(run, log=_quiet)
    model = keras.models.load_model(run.best_checkpoint(run.best_epoch))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    _, validation = data.split(data.encode(data.read_corpus(config.corpus), run.vocab), config.seq_length,
                               config.batch_size, config.buffer_size, config.seed, config.validation_fraction)
    loss = model.evaluate(*validation, batch_size=config.batch_size, verbose=0)
    assert loss == pytest.approx(history[run.best_epoch - 1]["val_loss"], rel=1e-5)
    trained = keras.models.load_model(run.checkpoint(len(history)))  # the last epoch's weights, not averaged
    loss = trained.evaluate(*validation, batch_size=config.batch_size, verbose=0)
    assert loss == pytest.approx(history[-1]["trained_val_loss"], rel=1e-5) != history[-1]["val_loss"]


def test_a_run_with_every_regulariser_saves_plain_layers_and_exports(tmp_path, tiny_corpus):
    import keras

    from charrnn_export.export import Source, export
    from charrnn_train import train

    run = train.start(train.Config(corpus=str(tiny_corpus), **dict(TINY, **AWD)), tmp_path / "run")
    history = train.train(run, log=_quiet)
    assert history[-1]["loss"] < history[0]["loss"]
    checkpoint = keras.models.load_model(run.checkpoint(2))  # the training network, custom layers included
    assert [type(layer).__name__ for layer in checkpoint.layers if "gru" in layer.name] == ["WeightDropGRU"] * 2
    assert type(checkpoint.get_layer("embedding")).__name__ == "EmbeddingDropout"
    model = keras.models.load_model(run.model_file)
    assert {type(layer).__name__ for layer in model.layers} == {"Embedding", "Dropout", "GRU", "Dense"}
    bundle = tmp_path / "bundle"
    export(Source(run.path), bundle, log=_quiet)  # validates the cell against the Keras model
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["training"]["config"]["weight_drop"] == 0.3


def test_every_regulariser_resumes_to_the_same_run(tmp_path, tiny_corpus):
    """Weight-drop, embedding-dropout and locked-dropout masks, AdamW and the EMA: a run interrupted
    inside epoch 3 (after averaging began) and resumed equals an uninterrupted one."""
    import keras

    from charrnn_train import train
    from test_train import _interrupt_after

    config = dict(TINY, epochs=4, **AWD)
    whole = train.start(train.Config(corpus=str(tiny_corpus), **config), tmp_path / "whole")
    train.train(whole, log=_quiet)
    run = train.start(train.Config(corpus=str(tiny_corpus), **config), tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        train.train(run, log=_quiet, callbacks=[_interrupt_after(5, in_epoch=3)])
    run = train.Run.open(run.path)
    assert [r["epoch"] for r in run.history] == [1, 2]
    history = train.train(train.Run.open(run.path), log=_quiet)
    for key in ("loss", "val_loss", "averaged_steps"):
        np.testing.assert_allclose([r[key] for r in history], [r[key] for r in whole.history], rtol=1e-4)
    for a, b in zip(*(keras.models.load_model(r.model_file).get_weights() for r in (run, whole)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_run_killed_with_every_regulariser_resumes_exactly(tmp_path, tiny_corpus):
    """kill -9 in a later epoch (the EMA under way), then --resume: the run an uninterrupted one gives."""
    import keras

    from charrnn_train import train

    options = dict(TINY, epochs=200, **AWD)
    out = tmp_path / "killed"
    flags = [f"--{key.replace('_', '-')}" + ("" if value is True else f"={value}") for key, value in options.items()]
    process = subprocess.Popen([sys.executable, "-m", "charrnn_train", "--corpus", str(tiny_corpus), "--out", str(out),
                                *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            history = out / "history.json"
            if history.is_file() and len(json.loads(history.read_text())) >= 3:
                break
            time.sleep(0.05)
        else:
            pytest.fail("training did not complete three epochs in time")
        time.sleep(0.3)  # land inside a later epoch (or inside a checkpoint write)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)

    killed = train.Run.open(out)
    assert killed.config == train.Config(corpus=str(tiny_corpus), **options)
    epochs = len(killed.history) + 1
    killed.config.epochs = epochs
    history = train.train(killed, log=_quiet)
    whole = train.start(train.Config(corpus=str(tiny_corpus), **options), tmp_path / "whole")
    whole.config.epochs = epochs
    train.train(whole, log=_quiet)
    for key in ("loss", "val_loss", "averaged_steps"):
        np.testing.assert_allclose([r[key] for r in history], [r[key] for r in whole.history], rtol=1e-4)
    for a, b in zip(*(keras.models.load_model(r.model_file).get_weights() for r in (killed, whole)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_each_ablation_in_the_makefile_changes_one_setting_of_the_recipe():
    """`make ablation-<name>` passes the round-2 recipe and then its override: click keeps an option's
    last value, so each ablation differs from the recipe in exactly the setting it names."""
    from charrnn_train.cli import main

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text().replace("\\\n", " ")
    recipe = shlex.split(re.search(r"^GRU2X512_AWD = (.*)$", makefile, re.M).group(1))
    ablations = dict(re.findall(r"^ABLATION_([\w-]+) = (.*)$", makefile, re.M))
    assert {"no-weight-drop", "no-locked-dropout", "no-weight-decay", "no-average", "seed-2"} <= set(ablations)

    def settings(args):
        return main.make_context("charrnn-train", [*args, "--out", "x"]).params

    base = settings(recipe)
    for name, override in ablations.items():
        changed = {k for k, v in settings(recipe + shlex.split(override)).items() if base[k] != v}
        assert len(changed) == 1, (name, changed)


def test_a_misspelt_ablation_is_refused_before_anything_runs():
    """`make ablation-<typo>` would otherwise train the recipe itself into runs/...-<typo>."""
    root = Path(__file__).resolve().parents[1]
    make = ["make", "--no-print-directory", "-n"]  # (under `make test`, make would name the directory)
    refused = subprocess.run([*make, "ablation-no-weight-dorp"], cwd=root, capture_output=True, text=True)
    assert refused.returncode != 0 and "no ablation-no-weight-dorp: one of" in refused.stderr
    assert "ablation-no-weight-drop" in refused.stderr and refused.stdout == ""
    planned = subprocess.run([*make, "ablation-no-weight-drop"], cwd=root, capture_output=True, text=True)
    assert planned.returncode == 0 and "--weight-drop 0" in planned.stdout
