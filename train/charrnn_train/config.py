"""A run's config and directory, and the checks of a new run: no TensorFlow, so the CLIs can check
their arguments before importing it (which takes seconds)."""

import dataclasses
import json
import math
from pathlib import Path

from charrnn_runtime.errors import CharrnnError

from . import data

CELLS = ("gru", "lstm")  # the keys of model.CELLS, named here without importing Keras
AVERAGES = ("none", "ema", "swa")


@dataclasses.dataclass
class Config:
    """Defaults are the report's setup."""

    corpus: str = str(data.DEFAULT_CORPUS)
    epochs: int = 10
    batch_size: int = 64
    seq_length: int = 100
    buffer_size: int = 10_000
    embedding_dim: int = 256
    units: int = 1024
    learning_rate: float = 0.001
    seed: int = 42
    validation_fraction: float = 0.0
    layers: int = 1
    cell: str = "gru"
    dropout: float = 0.0
    early_stopping: int = 0  # patience in epochs; 0 = off
    lr_schedule: str = "constant"
    min_learning_rate: float = 0.0  # where the cosine schedule ends
    clip_norm: float | None = None  # global gradient-norm clipping
    # AWD-LSTM's regularisers (Merity et al., 2017) and weight averaging; the defaults leave them off
    locked_dropout: bool = False  # the dropout masks drawn once per sequence (variational), not per step
    embedding_dropout: float = 0.0  # whole characters dropped from the embedding, one mask per batch
    weight_drop: float = 0.0  # DropConnect on the recurrent kernels, one mask per batch
    weight_decay: float = 0.0  # decoupled weight decay (AdamW)
    average: str = "none"  # ema or swa: the averaged weights are validated, saved and exported
    average_start: int = 1  # the first epoch whose steps are averaged
    ema_decay: float = 0.999  # per step

    def check(self):
        for name in ("epochs", "batch_size", "seq_length", "buffer_size", "embedding_dim", "units", "layers"):
            if getattr(self, name) < 1:
                raise CharrnnError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise CharrnnError(f"learning-rate must be positive (a finite number), got {self.learning_rate}")
        if not 0 <= self.validation_fraction < 1:
            raise CharrnnError(f"validation-fraction must be in [0, 1), got {self.validation_fraction}")
        if self.cell not in CELLS:
            raise CharrnnError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if not 0 <= self.dropout < 1:
            raise CharrnnError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.early_stopping < 0:
            raise CharrnnError(f"early-stopping patience must be >= 0, got {self.early_stopping}")
        if self.early_stopping and not self.validation_fraction:
            raise CharrnnError("early-stopping needs a validation split: set --validation-fraction")
        if self.lr_schedule not in ("constant", "cosine"):
            raise CharrnnError(f"lr-schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.lr_schedule == "cosine" and not 0 <= self.min_learning_rate <= self.learning_rate:
            raise CharrnnError(f"min-learning-rate must be in [0, learning-rate], got {self.min_learning_rate}")
        if self.clip_norm is not None and not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise CharrnnError(f"clip-norm must be a positive number, got {self.clip_norm}")
        for name in ("embedding_dropout", "weight_drop"):
            if not 0 <= getattr(self, name) < 1:
                raise CharrnnError(f"{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise CharrnnError(f"weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if self.average not in AVERAGES:
            raise CharrnnError(f"average must be one of {', '.join(AVERAGES)}, got {self.average!r}")
        if not 1 <= self.average_start <= self.epochs:
            raise CharrnnError(f"average-start must be an epoch in [1, epochs], got {self.average_start}")
        if not 0 < self.ema_decay < 1:
            raise CharrnnError(f"ema-decay must be in (0, 1), got {self.ema_decay}")

    def build(self, vocab_size, regularised=True):
        """The untrained network of this config (no optimizer); regularised=False: with plain layers
        only, the network a run saves."""
        from .model import build_model  # Keras: imported only when a network is built

        return build_model(vocab_size, self.embedding_dim, self.units, self.layers, self.cell, self.dropout,
                           self.locked_dropout, self.embedding_dropout, self.weight_drop, regularised)


class Run:
    """The files of one run directory."""

    def __init__(self, path):
        self.path = Path(path)
        self.config_file = self.path / "config.json"
        self.vocab_file = self.path / "vocab.json"
        self.history_file = self.path / "history.json"
        self.checkpoints = self.path / "checkpoints"
        self.model_file = self.path / "model.keras"
        self.plot_file = self.path / "loss.png"

    @classmethod
    def open(cls, path):
        run = cls(path)
        if not (run.config_file.is_file() and run.vocab_file.is_file() and run.history_file.is_file()):
            raise CharrnnError(f"not a charrnn training run (no config.json/vocab.json/history.json): {path}")
        try:
            meta = json.loads(run.config_file.read_text())
            run.config, run.corpus_sha256 = Config(**meta["config"]), meta["corpus_sha256"]
            run.keras_backend = meta.get("keras_backend")  # what trained it (runs before the field: TensorFlow)
            run.vocab = json.loads(run.vocab_file.read_text())
            run.history = json.loads(run.history_file.read_text())
        except (ValueError, TypeError, KeyError) as e:
            raise CharrnnError(f"run directory is damaged ({e}): {path}") from None
        return run

    def checkpoint(self, epoch):
        return self.checkpoints / f"epoch-{epoch:04d}.keras"

    def average_file(self, epoch):
        return self.checkpoints / f"epoch-{epoch:04d}.average.npz"

    def best_checkpoint(self, epoch):
        return self.checkpoints / f"best-{epoch:04d}.keras"

    @property
    def best_epoch(self):
        """The completed epoch with the lowest validation loss (None without validation)."""
        scored = [r for r in self.history if "val_loss" in r]
        return min(scored, key=lambda r: r["val_loss"])["epoch"] if scored else None

    @property
    def stopped_early(self):
        patience = self.config.early_stopping
        return bool(patience and self.history and self.history[-1]["epoch"] - self.best_epoch >= patience)

    @property
    def finished(self):
        """Training is over: every epoch ran, or validation stopped improving for `patience` epochs."""
        return len(self.history) >= self.config.epochs or self.stopped_early

def check_new_run(config, run_dir):
    """Everything that can be wrong with a new run before training starts; returns the corpus text."""
    config.check()
    run = Run(run_dir)
    if run.path.exists():  # even an empty directory: --out always names a new run
        raise CharrnnError(f"output directory exists: {run.path} (use --resume to continue a run)")
    text = data.read_corpus(config.corpus)
    data.check_length(len(text), config.seq_length, config.batch_size, config.validation_fraction)
    return text
