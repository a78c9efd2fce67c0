"""The cell wrapped in an ONNX Scan: a whole prompt in one onnxruntime call.

    (chars int32 [batch, T], *state) → (*next_state, logits float32 [batch, T, vocab])

logits[:, t] is what the cell returns after chars[:, t], so a prompt's per-position log-probabilities
(echo, scoring) come with its final state. The runtime feeds prompts with it instead of one session
run per character, and the engine runs it beside the batch, not inside it.
"""

import numpy as np
from onnx import TensorProto, helper

from charrnn_runtime.bundle import PREFILL_INPUTS as INPUTS
from charrnn_runtime.bundle import PREFILL_OUTPUTS as OUTPUTS

from . import validate
from .graph import inline_cell, model_like, value, vocab_size

PREFILL_VARIANTS = {"fp32": "prefill.onnx", "int8": "prefill.int8.onnx"}


def wrap(cell, spec, tensors):
    """The prefill model around `cell` (an ONNX single-step model with state tensors `spec`)."""
    vocab = vocab_size(cell, tensors)
    step, inner = inline_cell(cell, spec, tensors, "scan/", "scan/char")
    carried = [*(inner[t.output] for t in spec), inner[tensors["logits"]]]
    forward = [helper.make_node("Identity", [name], [f"scan/out/{name}"]) for name in carried]
    body = helper.make_graph(
        step + forward, "feed_one",
        [*(value(f"scan/in/{t.input}") for t in spec), value("scan/char", TensorProto.INT32)],
        [value(f"scan/out/{name}") for name in carried],
        initializer=list(cell.graph.initializer))
    scan = helper.make_node(
        "Scan", [*(t.input for t in spec), INPUTS["chars"]], [*(t.output for t in spec), OUTPUTS["logits"]],
        body=body, num_scan_inputs=1, scan_input_axes=[1], scan_output_axes=[1])
    graph = helper.make_graph(
        [scan], "charrnn_prefill",
        [value(INPUTS["chars"], TensorProto.INT32, ["batch", "steps"]),
         *(value(t.input, shape=["batch", t.size]) for t in spec)],
        [*(value(t.output, shape=["batch", t.size]) for t in spec),
         value(OUTPUTS["logits"], shape=["batch", "steps", vocab])])
    return model_like(cell, graph)


def compare(prefill_session, cell_step, ids, spec, tolerance=validate.TOLERANCE, log=print, variant="fp32"):
    """The prefill graph against the cell stepped in Python over the validation text (batch 1 and 3):
    every position's logits and the final state within `tolerance`."""
    worst, cases = 0.0, validate.cases_for(len(ids))
    names = [o.name for o in prefill_session.get_outputs()]
    for batch, length in cases:
        chars = validate.segments(ids, batch, length)[:, :-1].astype(np.int32)
        state = {t.input: np.zeros((batch, t.size), np.float32) for t in spec}
        got = dict(zip(names, prefill_session.run(names, {INPUTS["chars"]: chars, **state})))
        expected = []
        for t in range(length):
            logits, state = cell_step(chars[:, t], state)
            expected.append(logits)
        diffs = [np.abs(got[OUTPUTS["logits"]] - np.stack(expected, axis=1)).max()]
        diffs += [np.abs(got[t.output] - state[t.input]).max() for t in spec]
        worst = max(worst, *map(float, diffs))
    if worst > tolerance:
        raise validate.ValidationFailed(f"prefill graph differs from the cell by {worst:.2e} > {tolerance:.0e}")
    log(f"prefill {variant:5s}max abs diff {worst:.2e} against the {variant} cell stepped (tolerance {tolerance:.0e})")
    return {"max_abs_diff": worst, "tolerance": tolerance, "cases": [list(c) for c in cases]}
