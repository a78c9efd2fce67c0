"""What a bundle derives from its fp32 ONNX cell, without TensorFlow, each graph validated: the int8
cell and its sampling loop (quantize.py, loop.py) and a prefill graph per variant (prefill.py).
`upgrade` derives them again in an existing bundle, so bundles exported by an older charrnn gain
what this one adds."""

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import onnx

from charrnn_runtime import files
from charrnn_runtime.bundle import VARIANTS, state_spec
from charrnn_runtime.errors import CharrnnError

from . import loop, prefill, quantize, validate, writing
from .checks import encode_text, validation_text


class Derived(NamedTuple):
    models: dict  # file name → (ONNX model, the facts its metadata adds to the bundle's)
    validation: dict  # records for the manifest's "validation"


def derive(fp32_cell, ids, spec, held_out, tolerance=validate.TOLERANCE, log=print):
    """The derived graphs of `fp32_cell`, validated on the text `ids` (ValidationFailed if one is off)."""
    int8 = quantize.int8_variant(fp32_cell, ids, spec, held_out, tolerance, log)
    models = {VARIANTS["int8"]: (int8.cell, {"variant": "int8"}),
              loop.LOOP_VARIANTS["int8"]: (int8.loop, {"variant": "int8", "sampling_loop": True})}
    validation = {**int8.validation, "prefill": {}}
    for variant, cell in (("fp32", fp32_cell), ("int8", int8.cell)):
        wrapped = prefill.wrap(cell, spec, validate.TENSORS)
        step = validate.onnx_step(validate.cpu_session(cell.SerializeToString()), spec)
        validation["prefill"][variant] = prefill.compare(validate.cpu_session(wrapped.SerializeToString()), step,
                                                         ids, spec, tolerance=tolerance, log=log, variant=variant)
        models[prefill.PREFILL_VARIANTS[variant]] = (wrapped, {"variant": variant, "prefill": True})
    return Derived(models, validation)


def upgrade(bundle, text_file=None, tolerance=validate.TOLERANCE, log=print):
    """Derive an existing bundle's graphs again from its fp32 ONNX cell and validate them as an export
    does; the rest of the bundle is kept (the fp32 file too: its metadata keeps the export's record).
    Atomic: the new bundle is built beside the old one and swapped in. Returns the new manifest."""
    bundle = Path(bundle)
    try:
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        fp32_file = bundle / manifest["variants"]["fp32"]
        expected = manifest["files"][manifest["variants"]["fp32"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise CharrnnError(f"not a charrnn model bundle (no readable manifest.json): {bundle}") from None
    if files.sha256_file(fp32_file) != expected:
        raise CharrnnError(f"{fp32_file} does not match its manifest sha256; re-export the bundle")
    text, text_facts = validation_text((manifest.get("training") or {}).get("config"), text_file)
    ids = encode_text(text, manifest["vocab"])
    log(f"upgrading {bundle} on {len(ids):,} characters ({text_facts['source']})")
    derived = derive(onnx.load_model(str(fp32_file)), ids, state_spec(manifest), text_facts["held_out"],
                     tolerance, log)
    facts = {key: value for key, value in manifest.items() if key not in writing.MODEL_ENTRIES}
    facts["validation"] = {**facts["validation"], **derived.validation}
    with files.atomic_directory(bundle, replace=True) as tmp:
        shutil.copytree(bundle, tmp, dirs_exist_ok=True)
        writing.save_derived(derived, tmp, facts)
        # the files it listed and the derived ones: files added by hand since stay unlisted
        manifest = writing.write_manifest(tmp, facts, names=[*manifest["files"], *derived.models])
    log(f"wrote {bundle}")
    return manifest
