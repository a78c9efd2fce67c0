"""What charrnn-export can check without TensorFlow, so bad arguments are reported at once."""

import json
from pathlib import Path

from charrnn_runtime.errors import CharrnnError
from charrnn_train.config import Run
from charrnn_train.data import encode, held_out_start, read_corpus

VALIDATION_TAIL_CHARS = 4000


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


def validation_text(config, path=None):
    """(text, description) to validate an export on: the file at `path`, else the held-out split of the
    training corpus, else its tail (seen in training). `config`: the run's config as a dict, or None."""
    if path:
        return read_corpus(path), {"source": str(path), "held_out": True}
    if config is None:
        raise CharrnnError("no training run to take validation text from: pass --validation-text FILE")
    text = read_corpus(config["corpus"])
    if config["validation_fraction"] > 0:
        tail = text[held_out_start(len(text), config["validation_fraction"]):]
        return tail, {"source": f"validation split of {config['corpus']}", "held_out": True}
    return text[-VALIDATION_TAIL_CHARS:], {"source": f"last {VALIDATION_TAIL_CHARS} characters of "
                                           f"{config['corpus']} (seen in training)", "held_out": False}


def encode_text(text, vocab):
    """Ids of the validation text, or a clear error for characters the model does not know."""
    unknown = sorted(set(text) - set(vocab))
    if unknown:
        raise CharrnnError(f"validation text has characters outside the vocabulary: {unknown!r}")
    return encode(text, vocab)
