"""A run's config and directory, and the checks of a new run: no TensorFlow, so the CLIs can check
their arguments before importing it (which takes seconds)."""

import dataclasses
import json
import math
from pathlib import Path

from charrnn_runtime.errors import CharrnnError

from . import data


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

    def check(self):
        for name in ("epochs", "batch_size", "seq_length", "buffer_size", "embedding_dim", "units"):
            if getattr(self, name) < 1:
                raise CharrnnError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise CharrnnError(f"learning-rate must be positive (a finite number), got {self.learning_rate}")
        if not 0 <= self.validation_fraction < 1:
            raise CharrnnError(f"validation-fraction must be in [0, 1), got {self.validation_fraction}")


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
            run.vocab = json.loads(run.vocab_file.read_text())
            run.history = json.loads(run.history_file.read_text())
        except (ValueError, TypeError, KeyError) as e:
            raise CharrnnError(f"run directory is damaged ({e}): {path}") from None
        return run

    def checkpoint(self, epoch):
        return self.checkpoints / f"epoch-{epoch:04d}.keras"


def check_new_run(config, run_dir):
    """Everything that can be wrong with a new run before training starts; returns the corpus text."""
    config.check()
    run = Run(run_dir)
    if run.path.exists() and any(run.path.iterdir()):
        raise CharrnnError(f"output directory exists and is not empty: {run.path} (use --resume to continue a run)")
    text = data.read_corpus(config.corpus)
    data.check_length(len(text), config.seq_length, config.batch_size, config.validation_fraction)
    return text
