"""Model bundles on disk: find the ONNX file, read its facts, check they fit the graph.

A bundle directory has manifest.json and one ONNX file per variant; a bare model.onnx works too,
because the exporter writes the same facts into the ONNX metadata under METADATA_KEY.

Format 2 declares the recurrent state as a list of tensors (input name, output name, size, layer,
role), so one runtime serves any stack of GRU/LSTM layers; format 1 (one GRU, `hidden` →
`next_hidden` of `units`) is read as a one-tensor list.
"""

import json
import os
from pathlib import Path
from typing import NamedTuple

from . import files
from .errors import CharrnnError

FORMAT = "charrnn"
FORMAT_VERSION = 2
METADATA_KEY = "charrnn"
VARIANTS = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
# The sampling loop (the cell in an ONNX Loop, K sampled characters per call): its inputs besides the
# state tensors, and outputs besides the next state. Bundles list theirs under "sampling_loops".
LOOP_INPUTS = {"steps": "steps", "logits": "logits", "noise": "noise", "inv_temperature": "inv_temperature"}
LOOP_OUTPUTS = {"chars": "chars", "logits": "next_logits"}
# The prefill graph (the cell in an ONNX Scan: a whole prompt per call): its input besides the state
# tensors, and output besides the next state. Bundles list theirs under "prefill".
PREFILL_INPUTS = {"chars": "chars"}
PREFILL_OUTPUTS = {"logits": "logits"}
MODEL_ENV = "CHARRNN_MODEL"
# Installed: the runtime part of the shipped bundle, packaged in the wheel. In a source checkout,
# charrnn_runtime/models links to the repository's models/.
DEFAULT_MODEL = (Path(__file__).parent / "models" / "shakespeare").resolve()


class Located(NamedTuple):
    """A model's files: the ONNX cell of a variant and, where the bundle has them, its sampling loop
    and prefill graph, each with the sha256 the manifest expects (None for a bare .onnx file)."""

    path: Path
    onnx: Path
    sha256: str | None
    loop: tuple[Path, str] | None = None
    prefill: tuple[Path, str] | None = None


def find(path: str | os.PathLike[str] | None = None, variant: str = "fp32") -> Located:
    """The model at `path`, else $CHARRNN_MODEL, else DEFAULT_MODEL.

    The first one given is used: a wrong path is an error, never a silent switch to another model.
    """
    if path is not None:
        return locate(path, variant)
    tried = ["model path (none given)"]
    env = os.environ.get(MODEL_ENV)
    source = env or DEFAULT_MODEL
    if not env:
        tried.append(f"${MODEL_ENV} (not set)")
    try:
        return locate(source, variant)
    except CharrnnError as e:
        tried.append(f"${MODEL_ENV}={env} ({e})" if env else f"the packaged model ({e})")
        raise CharrnnError(f"no model to load; tried: {', '.join(tried)}") from None


def locate(path, variant="fp32"):
    """The files of a bundle directory or a bare .onnx file."""
    if variant not in VARIANTS:
        raise CharrnnError(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")
    path = Path(path)
    if path.is_file():
        return Located(path, path, None)
    if not path.exists():
        raise CharrnnError(f"model not found: {path}")
    manifest_file = path / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        name = manifest["variants"][variant]
        expected = manifest["files"][name]
    except FileNotFoundError:
        raise CharrnnError(f"not a charrnn model bundle (no manifest.json): {path}") from None
    except (ValueError, KeyError, TypeError):
        raise CharrnnError(f"damaged manifest.json in {path} (no {variant} model listed)") from None
    # bundles exported before the sampling loop or the prefill graph, and variants without one, have none
    companions = {}
    for kind, key in (("loop", "sampling_loops"), ("prefill", "prefill")):
        try:
            file = manifest.get(key, {}).get(variant)
            companions[kind] = file and (path / file, manifest["files"][file])
        except (KeyError, TypeError, AttributeError):
            raise CharrnnError(f"damaged manifest.json in {path} ({key} of {variant})") from None
    return Located(path, path / name, expected, **companions)


COMPANIONS = {"loop": ("sampling loop", LOOP_INPUTS, LOOP_OUTPUTS),
              "prefill": ("prefill graph", PREFILL_INPUTS, PREFILL_OUTPUTS)}


def check_companion(kind, session, spec, source):
    """A clear error unless a companion graph ("loop", "prefill") has the inputs and outputs the
    runtime binds."""
    what, extra_inputs, extra_outputs = COMPANIONS[kind]
    inputs = {i.name for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if inputs != {*extra_inputs.values(), *(t.input for t in spec)} \
            or outputs != {*extra_outputs.values(), *(t.output for t in spec)}:
        raise CharrnnError(f"the {what} does not fit the model: {source} has inputs {sorted(inputs)}, "
                           f"outputs {sorted(outputs)}")


def verify(onnx_path, expected_sha256):
    """sha256 of the file; a mismatch with the manifest means a corrupted or replaced model."""
    digest = files.sha256_file(onnx_path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise CharrnnError(f"model file is corrupted or was modified: {onnx_path} (sha256 does not match "
                           "manifest.json; re-export the bundle)")
    return digest


class StateTensor(NamedTuple):
    """One tensor of the recurrent state: fed as `input`, returned as `output`, [batch, size]."""

    input: str
    output: str
    size: int
    layer: int = 0
    role: str = "hidden"  # "hidden", or "cell" for an LSTM's cell state


def state_spec(facts):
    """The model's state tensors, in input order."""
    if "state" in facts:
        return [StateTensor(t["input"], t["output"], int(t["size"]), int(t["layer"]), t["role"])
                for t in facts["state"]]
    tensors = facts["tensors"]
    return [StateTensor(tensors["hidden"], tensors["next_hidden"], int(facts["units"]))]


def read_facts(session, source):
    """The charrnn facts from the ONNX metadata, checked against the graph's real shapes."""
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise CharrnnError(f"not a charrnn model (ONNX file has no '{METADATA_KEY}' metadata): {source}")
    try:
        facts = json.loads(raw)
        if facts["format"] != FORMAT or facts["format_version"] > FORMAT_VERSION:
            raise CharrnnError(f"unsupported model format {facts['format']} v{facts['format_version']}: {source}")
        vocab, tensors, spec = facts["vocab"], facts["tensors"], state_spec(facts)
    except (ValueError, KeyError, TypeError):
        raise CharrnnError(f"damaged charrnn metadata in {source}") from None

    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    expected = {tensors["char"]: (inputs, 1, None), tensors["logits"]: (outputs, 2, len(vocab))}
    for t in spec:
        expected[t.input], expected[t.output] = (inputs, 2, t.size), (outputs, 2, t.size)
    if set(inputs) != {tensors["char"], *(t.input for t in spec)}:
        raise CharrnnError(f"metadata does not match the model in {source}: graph inputs {sorted(inputs)}, "
                           f"metadata declares {[tensors['char'], *(t.input for t in spec)]}")
    for name, (where, rank, width) in expected.items():
        shape = where.get(name)
        if shape is None or len(shape) != rank or (width is not None and shape[-1] != width):
            raise CharrnnError(f"metadata does not match the model in {source}: tensor '{name}' has shape "
                               f"{shape}, metadata says rank {rank}" + (f" width {width}" if width else ""))
    if facts["vocab_size"] != len(vocab) or len(set(vocab)) != len(vocab):
        raise CharrnnError(f"damaged vocabulary in the metadata of {source}")
    return facts
