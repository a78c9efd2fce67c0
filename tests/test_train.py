import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CORPUS, TINY, assert_one_line_error, needs_tf

pytestmark = needs_tf


def test_default_architecture_has_the_reports_parameter_counts():
    from charrnn_train.model import build_model

    model = build_model(65)
    assert [layer.count_params() for layer in model.layers] == [16_640, 3_938_304, 66_625]
    assert model.count_params() == 4_021_569


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_training_layers_give_the_keras_layers_outputs_and_gradients(cell):
    """Training's recurrent layers (inputs projected before the loop) against Keras' own, step by step."""
    import numpy as np
    import tensorflow as tf

    from charrnn_train.model import build_model

    fast = build_model(11, embedding_dim=6, units=9, layers=2, cell=cell)
    keras_layers = build_model(11, embedding_dim=6, units=9, layers=2, cell=cell, regularised=False)
    assert {type(layer).__name__ for layer in fast.layers} - {type(layer).__name__ for layer in keras_layers.layers} \
        == {f"Projected{cell.upper()}"}
    keras_layers.set_weights(fast.get_weights())
    chars = np.random.default_rng(0).integers(0, 11, (3, 17)).astype("int32")
    targets = np.roll(chars, -1, axis=1)
    results = []
    for model in (fast, keras_layers):
        with tf.GradientTape() as tape:
            logits = model(chars, training=True)
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        results.append((logits.numpy(), [tf.convert_to_tensor(g).numpy() for g in gradients]))  # the embedding's: sparse
    (fast_logits, fast_gradients), (logits, gradients) = results
    np.testing.assert_allclose(fast_logits, logits, atol=1e-6)
    for fast_gradient, gradient in zip(fast_gradients, gradients, strict=True):
        np.testing.assert_allclose(fast_gradient, gradient, atol=1e-6)


def test_the_import_light_config_names_the_cells_the_model_builds():
    from charrnn_train import config, model

    assert config.CELLS == tuple(model.CELLS)


def test_stacked_lstm_with_dropout_has_the_expected_layers():
    from charrnn_train.model import build_model

    model = build_model(65, embedding_dim=16, units=32, layers=2, cell="lstm", dropout=0.2)
    assert [layer.name for layer in model.layers] == [
        "embedding", "dropout_0", "lstm_1", "dropout_1", "lstm_2", "dropout_2", "logits"]
    lstm = 4 * 32 * (16 + 32 + 1), 4 * 32 * (32 + 32 + 1)
    assert model.count_params() == 65 * 16 + sum(lstm) + 32 * 65 + 65


def test_vocabulary_mapping_and_steps_per_epoch_on_the_real_corpus():
    from charrnn_train import data

    text = data.read_corpus(CORPUS)
    vocab = data.build_vocab(text)
    assert len(text) == 1_115_394 and len(vocab) == 65
    ids = data.encode(text, vocab)
    assert ids[:13].tolist() == [18, 47, 56, 57, 58, 1, 15, 47, 58, 47, 64, 43, 52]
    train_set, validation = data.split(ids, 100, 64, 10_000, seed=0)
    assert validation is None
    assert len(train_set.inputs) == 11_043 and train_set.steps_per_epoch == 172
    inputs, targets = train_set.epoch(1)
    assert inputs.shape == targets.shape == (172 * 64, 100)
    assert (inputs[:, 1:] == targets[:, :-1]).all()  # target = input shifted by one


def test_shuffle_buffer_emits_a_permutation_and_is_local_for_small_buffers():
    from charrnn_train.data import shuffle_buffer_order

    rng = np.random.default_rng(0)
    order = shuffle_buffer_order(1000, 10, rng)
    assert sorted(order) == list(range(1000))
    # with a buffer of 10, element i cannot come out before position i - 9
    assert all(position >= element - 9 for position, element in enumerate(order))
    assert shuffle_buffer_order(5, 1, rng).tolist() == [0, 1, 2, 3, 4]


def test_epoch_order_depends_only_on_seed_and_epoch():
    from charrnn_train import data

    ids = np.arange(5000, dtype=np.int32) % 50
    a, _ = data.split(ids, 24, 8, 100, seed=3)
    b, _ = data.split(ids, 24, 8, 100, seed=3)
    assert (a.epoch(2)[0] == b.epoch(2)[0]).all()
    assert not (a.epoch(1)[0] == a.epoch(2)[0]).all()


def test_loss_falls_on_a_tiny_corpus(tiny_run):
    history = tiny_run.history
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[0]["loss"] < math.log(len(tiny_run.vocab))  # below uniform guessing after one epoch
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_bits_per_char"] == pytest.approx(history[-1]["val_loss"] / math.log(2))
    for name in ("config.json", "vocab.json", "history.json", "model.keras", "loss.png"):
        assert (tiny_run.path / name).is_file()
    best = tiny_run.best_epoch
    assert sorted(p.name for p in tiny_run.checkpoints.iterdir()) == sorted({f"best-{best:04d}.keras",
                                                                             "epoch-0002.keras"})


def _interrupt_after(batches, in_epoch=1):
    import keras

    class Interrupt(keras.callbacks.Callback):
        epoch = 0

        def on_train_begin(self, logs=None):
            self.epoch += 1  # train() fits one epoch at a time

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == in_epoch and batch + 1 == batches:
                raise KeyboardInterrupt
    return Interrupt()


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, tiny_corpus):
    import keras

    from charrnn_train import train

    config = dict(TINY, epochs=3)
    whole = train.start(train.Config(corpus=str(tiny_corpus), **config), tmp_path / "whole")
    train.train(whole, log=lambda line: None)

    run = train.start(train.Config(corpus=str(tiny_corpus), **config), tmp_path / "resumed")
    run.config.epochs = 1
    train.train(run, log=lambda line: None)  # epoch 1 completes
    run = train.Run.open(run.path)
    with pytest.raises(KeyboardInterrupt):
        train.train(run, log=lambda line: None, callbacks=[_interrupt_after(3)])  # dies inside epoch 2
    run = train.Run.open(run.path)
    assert [r["epoch"] for r in run.history] == [1]
    assert keras.models.load_model(run.checkpoint(1)).optimizer.iterations.numpy() > 0

    history = train.train(train.Run.open(run.path), log=lambda line: None)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert json.loads((run.path / "history.json").read_text()) == history
    np.testing.assert_allclose([r["loss"] for r in history], [r["loss"] for r in whole.history], rtol=1e-4)


BEYOND_THE_REPORT = dict(layers=2, cell="lstm", dropout=0.1, lr_schedule="cosine", min_learning_rate=1e-4,
                         clip_norm=1.0, validation_fraction=0.2)


def test_every_option_resumes_to_the_same_run(tmp_path, tiny_corpus):
    """Stacked LSTM, dropout, cosine schedule, clipping, validation: a resumed run equals a whole one."""
    from charrnn_train import train

    config = dict(TINY, epochs=3, **BEYOND_THE_REPORT)
    whole = train.start(train.Config(corpus=str(tiny_corpus), **config), tmp_path / "whole")
    train.train(whole, log=lambda line: None)
    run = train.start(train.Config(corpus=str(tiny_corpus), **config), tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        train.train(run, log=lambda line: None, callbacks=[_interrupt_after(5, in_epoch=2)])
    run = train.Run.open(run.path)
    assert [r["epoch"] for r in run.history] == [1]
    history = train.train(train.Run.open(run.path), log=lambda line: None)
    for key in ("loss", "val_loss", "learning_rate"):
        np.testing.assert_allclose([r[key] for r in history], [r[key] for r in whole.history], rtol=1e-4)
    assert history[-1]["learning_rate"] < history[0]["learning_rate"]  # the cosine schedule decays


def test_the_best_validation_epoch_is_the_runs_model_and_early_stopping_ends_the_run(tmp_path, tiny_corpus):
    import keras

    from charrnn_train import train

    config = train.Config(corpus=str(tiny_corpus), **dict(TINY, epochs=40, learning_rate=0.05, early_stopping=2,
                                                          validation_fraction=0.2))
    run = train.start(config, tmp_path / "run")
    lines = []
    history = train.train(run, log=lines.append)
    val = [r["val_loss"] for r in history]
    best = int(np.argmin(val)) + 1
    assert len(history) == best + 2 < 40, val  # stopped two epochs after the best one
    assert run.best_epoch == best and run.stopped_early and run.finished
    assert f"model.keras: epoch {best}" in lines[-1] and "stopped early" in lines[-1]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [f"best-{best:04d}.keras",
                                                                  f"epoch-{best + 2:04d}.keras"]
    final, best_model = (keras.models.load_model(p) for p in (run.model_file, run.best_checkpoint(best)))
    for a, b in zip(final.get_weights(), best_model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert train.train(train.Run.open(run.path), log=lambda line: None) == history  # resuming: nothing to do
    result = _cli(["--resume", str(run.path)])
    assert result.exit_code == 0 and "already complete" in result.output


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill -9", "ctrl-c"])
def test_a_stopped_run_loses_at_most_the_epoch_in_progress(tmp_path, tiny_corpus, stop):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "charrnn_train", "--corpus", str(tiny_corpus), "--out", str(out),
               "--epochs", "200", "--batch-size", "8", "--seq-length", "24", "--units", "32",
               "--embedding-dim", "8"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            history = out / "history.json"
            if history.is_file() and len(json.loads(history.read_text())) >= 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail("training did not complete two epochs in time")
        time.sleep(0.3)  # land somewhere inside a later epoch (or inside a checkpoint write)
    finally:
        process.send_signal(stop)
        stderr = process.communicate(timeout=60)[1]
    if stop == signal.SIGINT:
        assert process.returncode == 130
        assert stderr.strip().splitlines()[-1].endswith(f"continue with: charrnn-train --resume {out}")

    from charrnn_train import train

    run = train.Run.open(out)
    done = len(run.history)
    assert [r["epoch"] for r in run.history] == list(range(1, done + 1))
    assert run.checkpoint(done).is_file()
    run.config.epochs = done + 1
    assert [r["epoch"] for r in train.train(run, log=lambda line: None)] == list(range(1, done + 2))
    assert not list(out.rglob("*.tmp*"))  # a checkpoint write cut short is cleaned up on resume


def _cli(args):
    from charrnn_train.cli import main

    return CliRunner().invoke(main, args)




def test_cli_bad_corpus(tmp_path):
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("")
    binary.write_bytes(b"abc\xff\xfe")
    assert_one_line_error(_cli(["--corpus", str(tmp_path / "missing.txt")]), "not found")
    assert_one_line_error(_cli(["--corpus", str(empty)]), "empty")
    assert_one_line_error(_cli(["--corpus", str(binary)]), "UTF-8")


def test_cli_corpus_too_short_says_how_many_characters_are_needed(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("hello world " * 100)
    result = _cli(["--corpus", str(short), "--out", str(tmp_path / "run")])
    assert_one_line_error(result, "1,200 characters", f"{64 * 101:,}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", ["--epochs", "--batch-size", "--seq-length", "--units", "--embedding-dim",
                                    "--learning-rate"])
def test_cli_non_positive_sizes(tmp_path, option):
    assert_one_line_error(_cli([option, "0", "--out", str(tmp_path / "run")]), "must be positive")


def test_cli_bad_values_are_one_line(tmp_path):
    assert_one_line_error(_cli(["--epochs", "many"]), "--epochs")
    assert_one_line_error(_cli(["--cell", "rnn"]), "--cell")
    assert_one_line_error(_cli(["--average", "mean"]), "--average")
    for args, message in [(["--validation-fraction", "1.5"], "validation-fraction"),
                          (["--layers", "0"], "layers must be positive"),
                          (["--dropout", "1"], "dropout must be in [0, 1)"),
                          (["--early-stopping", "3"], "early-stopping needs a validation split"),
                          (["--early-stopping", "-1"], "patience must be >= 0"),
                          (["--lr-schedule", "cosine", "--min-learning-rate", "0.1"], "min-learning-rate"),
                          (["--clip-norm", "0"], "clip-norm must be a positive number"),
                          (["--weight-drop", "1"], "weight-drop must be in [0, 1)"),
                          (["--embedding-dropout", "-0.1"], "embedding-dropout must be in [0, 1)"),
                          (["--weight-decay", "-1"], "weight-decay must be a finite number >= 0"),
                          (["--average", "ema", "--average-start", "11"], "average-start must be an epoch"),
                          (["--average", "ema", "--ema-decay", "1"], "ema-decay must be in (0, 1)")]:
        assert_one_line_error(_cli([*args, "--out", str(tmp_path / "r")]), message)
    assert not (tmp_path / "r").exists()


def test_cli_resume_on_a_directory_that_is_not_a_run(tmp_path):
    assert_one_line_error(_cli(["--resume", str(tmp_path)]), "not a charrnn training run")


def test_cli_refuses_to_overwrite_a_run(tiny_run):
    assert_one_line_error(_cli(["--out", str(tiny_run.path)]), "--resume")
    result = _cli(["--resume", str(tiny_run.path)])
    assert result.exit_code == 0 and "already complete" in result.output


def test_cli_trains_end_to_end(tmp_path, tiny_corpus):
    result = _cli(["--corpus", str(tiny_corpus), "--out", str(tmp_path / "run"), "--epochs", "1",
                   "--batch-size", "8", "--seq-length", "24", "--units", "16", "--embedding-dim", "4"])
    assert result.exit_code == 0, result.output
    assert "epoch 1: loss" in result.output
    assert (tmp_path / "run" / "model.keras").is_file()


def test_cli_prints_no_tensorflow_log_lines_without_verbose(tmp_path, tiny_corpus):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user runs it
    result = subprocess.run([sys.executable, "-m", "charrnn_train", "--corpus", str(tiny_corpus), "--out",
                             str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8", "--seq-length", "24",
                             "--units", "16", "--embedding-dim", "4"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert all(line.startswith(("training ", "epoch ")) for line in result.stderr.splitlines()), result.stderr


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_keras_backends_train_and_export_under_tensorflow(backend, tmp_path, tiny_corpus):
    """Training's own layers (projected loop, weight drop) and the EMA under JAX (`make test` installs it:
    [jax]) and torch (where installed); the run still loads in TensorFlow for export."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    from charrnn_export.export import Source, export

    command = [sys.executable, "-m", "charrnn_train", "--corpus", str(tiny_corpus), "--out", str(tmp_path / "run"),
               "--epochs", "1", "--batch-size", "8", "--seq-length", "24", "--units", "16", "--embedding-dim", "4",
               "--layers", "2", "--dropout", "0.2", "--weight-drop", "0.3", "--weight-decay", "0.1", "--average", "ema"]
    result = subprocess.run(command, env={**os.environ, "KERAS_BACKEND": backend}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["keras_backend"] == backend
    export(Source(tmp_path / "run"), tmp_path / "bundle", log=lambda line: None)  # loads in TensorFlow


def test_a_keras_backend_not_installed_is_one_line_naming_it(tmp_path, tiny_corpus):
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed")
    command = [sys.executable, "-m", "charrnn_train", "--corpus", str(tiny_corpus), "--out", str(tmp_path / "run"),
               "--batch-size", "8", "--seq-length", "24"]
    result = subprocess.run(command, env={**os.environ, "KERAS_BACKEND": "torch"}, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "Error: charrnn-train under KERAS_BACKEND=torch needs torch installed"
    assert not (tmp_path / "run").exists()


def test_a_validation_split_must_hold_a_whole_sequence():
    from charrnn_train.data import CorpusError, check_length

    check_length(64 * 101, 100, 64)
    with pytest.raises(CorpusError, match="need at least 101,000"):
        check_length(10_000, 100, 64, validation_fraction=0.001)  # the tail would be 10 characters
