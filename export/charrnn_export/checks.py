"""What charrnn-export can check without TensorFlow, so bad arguments are reported at once."""

import json
from pathlib import Path

from charrnn_runtime.errors import CharrnnError
from charrnn_train.config import Run


def find_source(path, vocab_file=None):
    """(run or None, Keras model file, vocabulary) of a run directory, or of a .keras file and its vocab.json."""
    path = Path(path)
    run = None
    if path.is_dir():
        run = Run.open(path)
        if not run.model_file.is_file():
            raise CharrnnError(f"run {path} has no final model.keras yet ({len(run.history)}/"
                               f"{run.config.epochs} epochs): finish it with charrnn-train --resume")
        model_file, vocab = run.model_file, run.vocab
    elif path.is_file() and path.suffix == ".keras":
        model_file = path
        vocab_file = Path(vocab_file or path.with_name("vocab.json"))
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CharrnnError(f"no vocabulary for {path}: pass --vocab VOCAB.json") from None
    elif path.exists():
        raise CharrnnError(f"not a trained model or run: {path} (expected a run directory or a .keras file)")
    else:
        raise CharrnnError(f"no such run or model: {path}")
    if not (isinstance(vocab, list) and all(isinstance(c, str) and len(c) == 1 for c in vocab)):
        raise CharrnnError("vocabulary must be a JSON list of single characters")
    return run, model_file, vocab


def check_out(out, force):
    """An existing OUT is replaced only with --force, and only if it is a bundle."""
    out = Path(out)
    if out.exists() and not force:
        raise CharrnnError(f"output exists: {out} (use --force to replace it)")
    if out.exists() and not (out / "manifest.json").is_file():
        raise CharrnnError(f"refusing to replace {out}: it is not a charrnn bundle")
