"""Every export is checked against the Keras model it came from (never optional).

Held-out text is teacher-forced through the Keras full-sequence model, and stepped one character
at a time through the exported cell with the state carried outside. Every logit must agree within
the tolerance (max abs), and so must the bits per character.
"""

import math

import numpy as np
import onnxruntime as ort

from charrnn_runtime.errors import CharrnnError

TENSORS = {"char": "char", "logits": "logits"}  # the cell's input and output besides its state (cell.py)

TOLERANCE = 1e-4
LONG, SHORT = 256, 32


class ValidationFailed(CharrnnError):
    pass


def cases_for(chars):
    """(batch, length) cases: batch 1 and 3, a short and a long length that fit the text."""
    long = min(LONG, chars // 3 - 1)
    if long < 8:
        raise CharrnnError(f"validation text too short: {chars} characters, need at least 27")
    short = min(SHORT, long // 2)
    return [(1, short), (1, long), (3, short), (3, long)]


def segments(ids, batch, length):
    """`batch` windows of length + 1 ids spread over the text."""
    span = length + 1
    if len(ids) < batch * span:
        raise CharrnnError(f"validation text too short: {len(ids)} characters, need {batch * span}")
    starts = np.linspace(0, len(ids) - span, batch).astype(int)
    return np.stack([ids[s:s + span] for s in starts])


def bits_per_char(logits, targets):
    """Mean negative log2-likelihood of targets; logits [..., vocab] in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)
    return float(nll.mean() / math.log(2))


def named_step(run, spec):
    """step(char, state) → (logits, next state) over `run(inputs) → {output name: array}`."""
    def step(char, state):
        out = run({TENSORS["char"]: char, **state})
        return np.asarray(out[TENSORS["logits"]]), {t.input: np.asarray(out[t.output]) for t in spec}
    return step


def onnx_step(session, spec):
    names = [o.name for o in session.get_outputs()]
    return named_step(lambda inputs: dict(zip(names, session.run(names, inputs))), spec)


def cpu_session(model):
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def step_through(step, inputs, spec):
    """Logits [batch, length, vocab] of a single-step function `step(char, state) → (logits, next state)`;
    states are {input name: array}, starting from zeros of the state tensors in `spec`."""
    state = {t.input: np.zeros((inputs.shape[0], t.size), np.float32) for t in spec}
    out = []
    for t in range(inputs.shape[1]):
        logits, state = step(inputs[:, t], state)
        out.append(np.asarray(logits))
    return np.stack(out, axis=1)


def compare(keras_model, steps, ids, spec, tolerance=TOLERANCE, log=print):
    """Check each named step function against Keras; return {name: {max_abs_diff, ...}} or raise."""
    cases = cases_for(len(ids))
    results = {name: {"max_abs_logit_diff": 0.0, "max_bits_per_char_diff": 0.0} for name in steps}
    for batch, length in cases:
        window = segments(ids, batch, length)
        inputs, targets = window[:, :-1].astype(np.int32), window[:, 1:]
        reference = np.asarray(keras_model(inputs))
        reference_bpc = bits_per_char(reference, targets)
        for name, step in steps.items():
            logits = step_through(step, inputs, spec)
            result = results[name]
            result["max_abs_logit_diff"] = max(result["max_abs_logit_diff"],
                                               float(np.abs(logits - reference).max()))
            result["max_bits_per_char_diff"] = max(result["max_bits_per_char_diff"],
                                                   abs(bits_per_char(logits, targets) - reference_bpc))
    failed = []
    for name, result in results.items():
        result.update(tolerance=tolerance, cases=[list(c) for c in cases])
        ok = result["max_abs_logit_diff"] <= tolerance and result["max_bits_per_char_diff"] <= tolerance
        log(f"{name:12s} max |Δlogit| {result['max_abs_logit_diff']:.2e}  "
            f"max |Δbits/char| {result['max_bits_per_char_diff']:.2e}  "
            f"(tolerance {tolerance:.0e}, batch×length {', '.join(f'{b}×{n}' for b, n in cases)})  "
            + ("ok" if ok else "FAILED"))
        if not ok:
            failed.append(name)
    if failed:
        raise ValidationFailed(f"export does not match the Keras model ({', '.join(failed)} over tolerance "
                               f"{tolerance:g}); nothing was written")
    return results
