"""Training runs: config → run directory with vocabulary, history, per-epoch checkpoints, final model.

A run directory holds
    config.json       what was trained (with the corpus' sha256)
    vocab.json        the characters, index = token id
    history.json      one record per completed epoch (losses, learning rate, wall and CPU seconds);
                      the commit record of the run
    checkpoints/      epoch-NNNN.keras: weights + optimizer state of the last completed epoch;
                      with weight averaging, epoch-NNNN.average.npz: the averaged weights then;
                      with validation, best-NNNN.keras: the model of the best validation epoch so far
    model.keras       the final model (no optimizer state), written when training ends: the best
                      validation epoch's model when there is a validation split, else the last epoch's
With weight averaging (--average ema/swa) the averaged weights are the run's model: validation
measures them (once averaging has begun) and the model files hold them.
    loss.png          loss curve
Every file is written atomically, and a checkpoint counts only once history.json names its epoch,
so `kill -9` at any moment loses at most the epoch in progress.
"""

import dataclasses
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import keras
import numpy as np

from charrnn_runtime import files
from charrnn_runtime.errors import CharrnnError

from . import data
from .config import Config, Run, check_new_run  # noqa: F401 - Config re-exported: train.Config
from .model import compile_model, learning_rate

LN2 = math.log(2)


class Progress(keras.callbacks.Callback):
    """A progress bar per epoch with the running loss (redrawn in place on a terminal)."""

    def __init__(self, epoch, epochs, steps, stream=sys.stderr):
        super().__init__()
        self.epoch, self.epochs, self.steps, self.stream = epoch, epochs, steps, stream
        self.tty = stream.isatty()
        self.last_draw = 0.0

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        done = batch + 1
        if done < self.steps and now - self.last_draw < (0.2 if self.tty else 30):
            return
        self.last_draw = now
        filled = int(30 * done / self.steps)
        line = (f"epoch {self.epoch}/{self.epochs} [{'=' * filled}{' ' * (30 - filled)}] "
                f"{done}/{self.steps} loss {logs['loss']:.4f}")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def on_train_end(self, logs=None):
        if self.tty:
            self.stream.write("\r\033[K")


class WeightAverage(keras.callbacks.Callback):
    """The average of the weights after every training step it sees: exponential (ema, with `decay`
    per step, starting from the first weights seen) or uniform (swa: each step's weights equally)."""

    def __init__(self, kind, decay, weights=None, steps=0):
        super().__init__()
        self.kind, self.decay = kind, decay
        self.weights, self.steps = weights, steps

    def on_train_batch_end(self, batch, logs=None):
        self.update(self.model.get_weights())

    def update(self, weights):
        self.steps += 1
        if self.weights is None:
            self.weights = [np.array(w, copy=True) for w in weights]
            return
        rate = 1 / self.steps if self.kind == "swa" else 1 - self.decay
        for average, w in zip(self.weights, weights, strict=True):
            average += (w - average) * np.float32(rate)

    def save(self, path):
        with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, *(self.weights or []), steps=self.steps)

    @classmethod
    def load(cls, path, kind, decay):
        with np.load(path) as saved:
            steps = int(saved["steps"])
            weights = [saved[f"arr_{i}"] for i in range(len(saved.files) - 1)] if steps else None
        return cls(kind, decay, weights, steps)


class StopOnInterrupt(keras.callbacks.Callback):
    """Ctrl-C stops training at the next step boundary.

    Python raises KeyboardInterrupt wherever the main thread happens to be, and inside an object
    finalizer (TensorFlow runs many) it is only printed and dropped. So SIGINT sets a flag and the
    interrupt is raised from here; a second Ctrl-C interrupts at once.
    """

    def __init__(self):
        super().__init__()
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._request)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def _request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def on_train_batch_end(self, batch, logs=None):
        if self.requested:
            raise KeyboardInterrupt


def start(config, run_dir):
    """Create a new run directory for `config`."""
    text = check_new_run(config, run_dir)
    run = Run(run_dir)
    vocab = data.build_vocab(text)
    config.corpus = str(Path(config.corpus).resolve())
    with files.atomic_directory(run.path) as tmp:  # a run directory is complete or absent
        staged = Run(tmp)
        files.write_json(staged.vocab_file, vocab)
        files.write_json(staged.config_file, {"config": dataclasses.asdict(config),
                                              "corpus_sha256": data.fingerprint(text),
                                              "corpus_chars": len(text),
                                              "keras_backend": keras.backend.backend()})
        files.write_json(staged.history_file, [])
    return Run.open(run.path)


def train(run, log=print, callbacks=()):
    """Train `run` from its last completed epoch to config.epochs; return the history."""
    config = run.config
    text = data.read_corpus(config.corpus)
    if data.fingerprint(text) != run.corpus_sha256:
        raise CharrnnError(f"corpus {config.corpus} changed since the run started (sha256 differs)")
    train_set, validation = data.split(data.encode(text, run.vocab), config.seq_length, config.batch_size,
                                       config.buffer_size, config.seed, config.validation_fraction)
    for stale in run.path.rglob(".*.tmp*"):  # left by a kill during an atomic write
        stale.unlink()
    done = len(run.history)
    average = None
    if done:
        model = keras.models.load_model(run.checkpoint(done))
        if config.average != "none":
            average = WeightAverage.load(run.average_file(done), config.average, config.ema_decay)
        log(f"resuming {run.path} after epoch {done}/{config.epochs}")
    else:
        keras.utils.set_random_seed(config.seed)
        model = compile_model(config.build(len(run.vocab)), learning_rate(config, train_set.steps_per_epoch),
                              config.clip_norm, config.weight_decay)
        if config.average != "none":
            average = WeightAverage(config.average, config.ema_decay)
        log(f"training {run.path}: {model.count_params():,} parameters, "
            f"{train_set.steps_per_epoch} steps/epoch, {config.epochs} epochs")

    trained = False
    for epoch in range(done + 1, config.epochs + 1):
        if run.stopped_early:
            break
        trained = True
        inputs, targets = train_set.epoch(epoch)
        seed_masks(model, config.seed, epoch)
        averaging = [average] if average and epoch >= config.average_start else []
        started, cpu_started = time.perf_counter(), time.process_time()
        fit = model.fit(inputs, targets, batch_size=config.batch_size, epochs=1, shuffle=False, verbose=0,
                        callbacks=[Progress(epoch, config.epochs, train_set.steps_per_epoch), *averaging,
                                   *callbacks])
        record = {"epoch": epoch, "loss": fit.history["loss"][-1]}
        record["bits_per_char"] = record["loss"] / LN2
        if average:
            record["averaged_steps"] = average.steps  # validation measures the average once it is > 0
        weights = run_weights(model, average)
        if validation is not None:
            if average and average.steps:  # the trained weights too: what the averaging buys
                record["trained_val_loss"] = float(model.evaluate(*validation, batch_size=config.batch_size, verbose=0))
            trained_weights = model.get_weights()
            model.set_weights(weights)
            record["val_loss"] = float(model.evaluate(*validation, batch_size=config.batch_size, verbose=0))
            record["val_bits_per_char"] = record["val_loss"] / LN2
            model.set_weights(trained_weights)
        record["learning_rate"] = float(model.optimizer.learning_rate)
        record["seconds"] = time.perf_counter() - started
        record["cpu_seconds"] = time.process_time() - cpu_started  # all threads; fair where cores are shared

        with files.atomic_path(run.checkpoint(epoch)) as tmp:
            model.save(tmp)
        if average:
            average.save(run.average_file(epoch))
        if validation is not None and all(record["val_loss"] < r["val_loss"] for r in run.history):
            save_inference_model(config, run.vocab, weights, run.best_checkpoint(epoch))
        run.history.append(record)
        files.write_json(run.history_file, run.history)  # the epoch now counts
        keep = {run.checkpoint(epoch), run.average_file(epoch), run.best_checkpoint(run.best_epoch or 0)}
        for old in run.checkpoints.iterdir():
            if old not in keep:
                old.unlink()
        log(summary(record, best=run.best_epoch == epoch))

    if trained or not run.model_file.exists():
        if run.best_epoch is not None:
            with files.atomic_path(run.model_file) as tmp:
                shutil.copyfile(run.best_checkpoint(run.best_epoch), tmp)
            log(f"model.keras: epoch {run.best_epoch}, the best validation loss "
                f"({run.history[run.best_epoch - 1]['val_loss']:.4f})"
                + (f"; stopped early after {config.early_stopping} epochs without improvement"
                   if run.stopped_early else ""))
        else:
            save_inference_model(config, run.vocab, run_weights(model, average), run.model_file)
        plot_history(run.history, run.plot_file)
    return run.history


def seed_masks(model, seed, epoch):
    """Dropout, embedding-dropout and weight-drop masks drawn from (seed, layer, epoch), like the
    shuffle, so a resumed run draws the same."""
    for i, layer in enumerate(model.layers):
        if hasattr(layer, "seed_generator"):
            state = layer.seed_generator.state
            state.assign(np.array([seed + i, epoch << 20], dtype=state.dtype))


def run_weights(model, average):
    """The run's model weights now: the average once averaging has begun, else the trained weights."""
    return average.weights if average and average.steps else model.get_weights()


def save_inference_model(config, vocab, weights, path):
    """The network with plain layers, `weights` and no optimizer state (what export and users load)."""
    final = config.build(len(vocab), regularised=False)
    final.set_weights(weights)
    with files.atomic_path(path) as tmp:
        final.save(tmp)


def summary(record, best=False):
    line = f"epoch {record['epoch']}: loss {record['loss']:.4f} ({record['bits_per_char']:.3f} bits/char)"
    if "val_loss" in record:
        line += f", val loss {record['val_loss']:.4f} ({record['val_bits_per_char']:.3f} bits/char)"
        line += " (best)" if best else ""
    return line + f", {record['seconds']:.1f} s"


def plot_history(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["loss"] for r in history], marker="o", label="training loss")
    if history and "val_loss" in history[0]:
        ax.plot(epochs, [r["val_loss"] for r in history], marker="o", label="validation loss")
    trained = [(r["epoch"], r["trained_val_loss"]) for r in history if "trained_val_loss" in r]
    if trained:
        ax.plot(*zip(*trained), linestyle="--", label="validation loss, weights not averaged")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_xticks(epochs)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
