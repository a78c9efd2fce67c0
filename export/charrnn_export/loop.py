"""The cell wrapped in an ONNX Loop that samples: K characters per onnxruntime call.

    (steps int64 [], logits [batch, vocab], *state, noise float64 [steps, batch, vocab],
     inv_temperature float64 []) → (chars int32 [steps, batch], next_logits, *next_state)

Each iteration draws a character from the carried logits exactly as the runtime's sampler does
(Gumbel-max in float64: argmax(float64(logits) · (1/T) + noise); greedy is zero noise and 1/T = 1),
then steps the cell with it. The runtime uses it for plain temperature sampling: one call replaces
K session runs and K numpy sampling steps, and the text is the same character for character.
Only int8 bundles get one: for fp32 it measured no faster (README, Speed) and would repeat its weights.
"""

import numpy as np
from onnx import TensorProto, helper

from charrnn_runtime.bundle import LOOP_INPUTS as INPUTS
from charrnn_runtime.bundle import LOOP_OUTPUTS as OUTPUTS
from charrnn_runtime.params import SamplingParams
from charrnn_runtime.sampling import GumbelNoise, loop_inputs, sample

from . import validate
from .graph import inline_cell, model_like, value, vocab_size

LOOP_VARIANTS = {"int8": "loop.int8.onnx"}
STEPS = 64  # characters per call in validation


def wrap(cell, spec, tensors):
    """The sampling-loop model around `cell` (an ONNX single-step model with state tensors `spec`)."""
    vocab = vocab_size(cell, tensors)
    step, inner = inline_cell(cell, spec, tensors, "step/", "step/char")
    state_in = [f"step/in/{t.input}" for t in spec]
    sample = [
        helper.make_node("Gather", [INPUTS["noise"], "step/iteration"], ["step/noise"], axis=0),
        helper.make_node("Cast", ["step/in/logits"], ["step/logits64"], to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["step/logits64", INPUTS["inv_temperature"]], ["step/scaled"]),
        helper.make_node("Add", ["step/scaled", "step/noise"], ["step/scores"]),
        helper.make_node("ArgMax", ["step/scores"], ["step/char64"], axis=1, keepdims=0),
        helper.make_node("Cast", ["step/char64"], ["step/char"], to=TensorProto.INT32),
    ]
    carried_out = [inner[tensors["logits"]], *(inner[t.output] for t in spec)]
    forward = [helper.make_node("Identity", ["step/condition"], ["step/out/condition"]),
               helper.make_node("Identity", ["step/char"], ["step/out/char"]),
               *(helper.make_node("Identity", [name], [f"step/out/{name}"]) for name in carried_out)]
    body = helper.make_graph(
        sample + step + forward, "sample_and_step",
        [value("step/iteration", TensorProto.INT64, []), value("step/condition", TensorProto.BOOL, []),
         value("step/in/logits"), *(value(name) for name in state_in)],
        [value("step/out/condition", TensorProto.BOOL, []), *(value(f"step/out/{name}") for name in carried_out),
         value("step/out/char", TensorProto.INT32)],
        initializer=list(cell.graph.initializer))
    loop = helper.make_node(
        "Loop", [INPUTS["steps"], "", INPUTS["logits"], *(t.input for t in spec)],
        [OUTPUTS["logits"], *(t.output for t in spec), OUTPUTS["chars"]], body=body)
    graph = helper.make_graph(
        [loop], "charrnn_sampling_loop",
        [value(INPUTS["steps"], TensorProto.INT64, []), value(INPUTS["logits"], shape=["batch", vocab]),
         *(value(t.input, shape=["batch", t.size]) for t in spec),
         value(INPUTS["noise"], TensorProto.DOUBLE, ["steps", "batch", vocab]),
         value(INPUTS["inv_temperature"], TensorProto.DOUBLE, [])],
        [value(OUTPUTS["logits"], shape=["batch", vocab]), *(value(t.output, shape=["batch", t.size]) for t in spec),
         value(OUTPUTS["chars"], TensorProto.INT32, ["steps", "batch"])])
    return model_like(cell, graph)


def compare(loop_session, cell_step, ids, spec, tolerance=validate.TOLERANCE, log=print):
    """The loop against the cell stepped in Python and sampled by the runtime's `sample` with the same
    noise: the characters must be identical and the final logits and state within `tolerance`. Primed
    on the validation text, batch 1 and 3, temperature 0.8 and greedy."""
    worst, cases = 0.0, []
    for batch in (1, 3):
        rows = validate.segments(ids, batch, validate.SHORT)
        state = {t.input: np.zeros((batch, t.size), np.float32) for t in spec}
        for t in range(rows.shape[1]):
            logits, state = cell_step(rows[:, t], state)
        for temperature in (0.8, 0.0):
            params, noise = SamplingParams(temperature), GumbelNoise(range(batch), len(logits[0])).take(STEPS)
            expected_logits, expected_state, expected = logits, state, []
            for k in range(STEPS):
                chars = sample(expected_logits, params, noise[k]).astype(np.int32)
                expected.append(chars)
                expected_logits, expected_state = cell_step(chars, expected_state)
            noise, inverse = loop_inputs(params, noise)
            out = loop_session.run(None, {INPUTS["steps"]: np.array(STEPS, np.int64), INPUTS["logits"]: logits,
                                          **state, INPUTS["noise"]: noise,
                                          INPUTS["inv_temperature"]: np.array(inverse)})
            names = [o.name for o in loop_session.get_outputs()]
            got = dict(zip(names, out))
            if not np.array_equal(got[OUTPUTS["chars"]], np.stack(expected)):
                raise validate.ValidationFailed(f"sampling loop drew other characters than the cell "
                                                f"(batch {batch}, temperature {temperature})")
            diff = max([float(np.abs(got[OUTPUTS["logits"]] - expected_logits).max())]
                       + [float(np.abs(got[t.output] - expected_state[t.input]).max()) for t in spec])
            worst = max(worst, diff)
            cases.append([batch, temperature])
    if worst > tolerance:
        raise validate.ValidationFailed(f"sampling loop differs from the cell by {worst:.2e} > {tolerance:.0e}")
    log(f"loop         same {STEPS} characters as the cell; max abs diff {worst:.2e} (tolerance {tolerance:.0e})")
    return {"steps": STEPS, "identical_chars": True, "max_abs_diff": worst, "tolerance": tolerance, "cases": cases}
