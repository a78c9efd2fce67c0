"""Writing a bundle's files: each model with the bundle's facts as its metadata, then the manifest."""

import json

import onnx

from charrnn_runtime import files
from charrnn_runtime.bundle import METADATA_KEY, VARIANTS

from . import loop

MODEL_ENTRIES = ("variants", "sampling_loops", "files")  # the manifest's entries beyond the models' facts


def save_model(model, path, facts):
    """Write `model` (ONNX) to `path` with `facts` as its charrnn metadata."""
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(facts, ensure_ascii=False)
    onnx.save_model(model, str(path))


def save_int8(int8, directory, facts):
    """The int8 cell and its sampling loop (a quantize.Int8) into the bundle directory."""
    save_model(int8.cell, directory / VARIANTS["int8"], {**facts, "variant": "int8"})
    save_model(int8.loop, directory / loop.LOOP_VARIANTS["int8"], {**facts, "variant": "int8", "sampling_loop": True})


def write_manifest(directory, facts, names=None):
    """manifest.json: the facts, the variants and sampling loops, and the sha256 of the files `names`
    (default: every other file of the directory)."""
    if names is None:
        names = [str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()]
    manifest = {**facts, "variants": VARIANTS, "sampling_loops": loop.LOOP_VARIANTS, "files": {
        name: files.sha256_file(directory / name) for name in sorted(names) if name != "manifest.json"}}
    files.write_json(directory / "manifest.json", manifest)
    return manifest
