"""Writing a bundle's files: each model with the bundle's facts as its metadata, then the manifest."""

import json

import onnx

from charrnn_runtime import files
from charrnn_runtime.bundle import METADATA_KEY, VARIANTS

from . import loop, prefill

MODEL_ENTRIES = ("variants", "sampling_loops", "prefill", "files")  # the manifest's entries beyond the models' facts


def save_model(model, path, facts):
    """Write `model` (ONNX) to `path` with `facts` as its charrnn metadata."""
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(facts, ensure_ascii=False)
    onnx.save_model(model, str(path))


def save_derived(derived, directory, facts):
    """The derived graphs (a derive.Derived) into the bundle directory."""
    for name, (model, own_facts) in derived.models.items():
        save_model(model, directory / name, {**facts, **own_facts})


def write_manifest(directory, facts, names=None):
    """manifest.json: the facts, the variants, sampling loops and prefill graphs, and the sha256 of the
    files `names` (default: every other file of the directory)."""
    if names is None:
        names = [str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()]
    listed = {name: files.sha256_file(directory / name) for name in sorted(names) if name != "manifest.json"}
    manifest = {**facts, "variants": VARIANTS, "sampling_loops": loop.LOOP_VARIANTS,
                "prefill": {variant: name for variant, name in prefill.PREFILL_VARIANTS.items() if name in listed},
                "files": listed}
    files.write_json(directory / "manifest.json", manifest)
    return manifest
