"""Trained run (or .keras model) → model bundle, validated before it is written.

A bundle is a directory:
    manifest.json     vocabulary, shapes, tensor names, training facts, validation, sha256 of every file
    model.onnx        the single-step cell (fp32); its metadata carries the manifest's facts
    model.int8.onnx   the same cell with int8 weights and a fixed activation scale (quantize.py)
    loop.int8.onnx    the int8 cell in an ONNX Loop that samples K characters per call (loop.py)
    prefill.onnx, prefill.int8.onnx   each cell in an ONNX Scan: a whole prompt per call (prefill.py)
    saved_model/      the cell as a TensorFlow SavedModel (serving signature = the step)
    training/         what it was trained with: config, vocabulary, history, loss plot, Keras model
It is built in a temporary directory and renamed into place only after validation passed.
"""

import dataclasses
import platform
import shutil
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx
from onnx.reference import ReferenceEvaluator

from charrnn_runtime import files
from charrnn_runtime.bundle import FORMAT, FORMAT_VERSION, VARIANTS
from charrnn_runtime.errors import CharrnnError

from . import checks, validate, writing
from .cell import TENSORS, Cell, cell_weights, state_spec, vocab_size
from .checks import check_out, encode_text, find_source
from .derive import derive
from .validate import cpu_session, named_step, onnx_step

OPSET = 18  # the newest tf2onnx 1.17 knows
TRAINING_FILES = ("config.json", "vocab.json", "history.json", "loss.png", "model.keras")


class Source:
    """What is exported: a Keras model, its vocabulary, and (for a run) its training facts."""

    def __init__(self, path, vocab_file=None):
        self.run, model_file, self.vocab = find_source(path, vocab_file)
        try:
            self.model = keras.models.load_model(model_file, compile=False)
        except Exception as e:  # Keras raises many types for damaged/foreign files
            raise CharrnnError(f"cannot load Keras model {model_file}: {e}") from None
        self.weights = cell_weights(self.model)
        if vocab_size(self.weights) != len(self.vocab):
            raise CharrnnError(f"model has {vocab_size(self.weights)} tokens, vocabulary {len(self.vocab)}")

    def validation_text(self, path=None):
        """(text, description): the given file, else the run's held-out tail, else its corpus' tail."""
        return checks.validation_text(self.run and dataclasses.asdict(self.run.config), path)

    def training_facts(self):
        """The run's config and the record of the epoch whose weights are exported ("final"): the best
        validation epoch when the run had a validation split, else the last."""
        if self.run is None:
            return None
        history, best = self.run.history, self.run.best_epoch
        exported = history[best - 1] if best else history[-1]
        return {"config": dataclasses.asdict(self.run.config), "epochs_trained": len(history),
                "model_epoch": exported["epoch"],
                "final": {k: v for k, v in exported.items() if k not in ("seconds", "cpu_seconds")}}

    def encode(self, text):
        return encode_text(text, self.vocab)


def to_onnx(cell):
    proto, _ = tf2onnx.convert.from_function(cell.step, input_signature=cell.step.input_signature, opset=OPSET)
    proto.producer_name = "charrnn (tf2onnx)"
    used = {node.domain for node in proto.graph.node} | {""}
    kept = [o for o in proto.opset_import if o.domain in used]  # tf2onnx also declares ai.onnx.ml
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto


def saved_model_step(path, spec):
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return named_step(lambda inputs: serve(**{k: tf.constant(v) for k, v in inputs.items()}), spec)


def reference_step(proto, spec):
    evaluator = ReferenceEvaluator(proto)
    names = [o.name for o in proto.graph.output]
    return named_step(lambda inputs: dict(zip(names, evaluator.run(names, inputs))), spec)


def versions():
    return {"charrnn": _charrnn_version(), "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "numpy": np.__version__}


def _charrnn_version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("charrnn")
    except PackageNotFoundError:
        return "unknown"


def network(weights):
    """What the cell computes, for people reading the manifest."""
    return {"layers": [{"cell": layer["cell"], "units": layer["recurrent_kernel"].shape[0]}
                       for layer in weights["layers"]], "embedding": "folded into the first layer's input table"}


def export(source, out, force=False, validation_text=None, tolerance=validate.TOLERANCE, runtime_only=False,
           log=print):
    """Write the bundle for `source` (a Source) to `out`; return the manifest.

    runtime_only: keep what the runtime and people need (manifest, ONNX variants, training config,
    history and plot); the SavedModel is still built and validated, then left out, as is the Keras model.
    """
    out = Path(out)
    check_out(out, force)
    text, text_facts = source.validation_text(validation_text)
    ids = source.encode(text)
    spec = state_spec(source.weights)

    with files.atomic_directory(out, replace=force) as tmp:
        cell = Cell(source.weights)
        tf.saved_model.save(cell, str(tmp / "saved_model"),
                            signatures={"serving_default": cell.step.get_concrete_function()})
        proto = to_onnx(cell)
        onnx.checker.check_model(proto, full_check=True)
        log(f"validating on {len(ids):,} characters ({text_facts['source']})")
        results = validate.compare(source.model, {
            "saved_model": saved_model_step(tmp / "saved_model", spec),
            "onnx": onnx_step(cpu_session(proto.SerializeToString()), spec),
            "onnx-reference": reference_step(proto, spec),
        }, ids, spec, tolerance=tolerance, log=log)

        facts = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "vocab": source.vocab, "vocab_size": len(source.vocab), "network": network(source.weights),
            "parameters": source.model.count_params(),
            "tensors": TENSORS, "state": [t._asdict() for t in spec], "initial_state": "zeros",
            "training": source.training_facts(), "versions": versions(),
            "validation": {"text": {**text_facts, "chars": len(ids)}, **results},
        }
        derived = derive(proto, ids, spec, text_facts["held_out"], tolerance, log)
        facts["validation"].update(derived.validation)
        writing.save_model(proto, tmp / VARIANTS["fp32"], {**facts, "variant": "fp32"})
        writing.save_derived(derived, tmp, facts)

        if runtime_only:
            shutil.rmtree(tmp / "saved_model")
        if source.run is not None:
            (tmp / "training").mkdir()
            for name in TRAINING_FILES:
                if (source.run.path / name).is_file() and not (runtime_only and name == "model.keras"):
                    shutil.copy2(source.run.path / name, tmp / "training" / name)

        manifest = writing.write_manifest(tmp, facts)
    log(f"wrote {out}")
    return manifest
