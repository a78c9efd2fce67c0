"""The int8 variant: int8 weights and a fixed activation scale, so no row depends on another.

Every matmul of the cell multiplies a hidden state: the recurrent projection of each layer, the input
projection of the layers above the first (the first layer's is a table lookup) and the output layer.
A hidden state lies in [-1, 1] by construction (a GRU's mixes tanh values with the previous state,
starting from zeros; an LSTM's is sigmoid · tanh), so its range need not be measured: each value is
quantized on its own, x → round(127 · x) + 128 as uint8 (QuantizeLinear, scale 1/127; float rounding
past ±1 saturates). The weights are int8 per output column (symmetric, scale max|w| / 63), and one
com.microsoft MatMulIntegerToFloat (onnxruntime >= 1.14, CPU) multiplies, scales and adds the bias.

Bundles exported before this used onnxruntime's dynamic quantization, which takes one activation
scale from the min and max of the whole batch: a row's text then depended on its batch neighbours
(9 to 12 of 32 concurrent requests differed from their solo runs), so servers defaulted to fp32.
With the fixed scale a row's logits are bit-identical at any batch size (checked at every export),
the held-out cost is the same (+0.0002 bits/char), and a step is no slower (no min/max pass).
"""

from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import loop, validate

ACTIVATION_SCALE, ACTIVATION_ZERO_POINT = 1 / 127, 128
# Weights in [-63, 63] (7 bits, onnxruntime's reduce_range): on x86 CPUs without VNNI, onnxruntime's
# uint8 × int8 kernel adds pairs of products in int16 (VPMADDUBSW), which saturates past 32,767:
# 255 · 127 · 2 would, 255 · 63 · 2 does not. With 8-bit weights an AVX2-only host lost +0.01 bits/char
# where a VNNI host lost +0.0006, and their int8 texts differed; with 7 bits every host computes the same.
WEIGHT_MAX = 63
COST_LIMIT = 0.01  # bits/char the int8 variant may lose against fp32 on the validation text
MS_DOMAIN = "com.microsoft"


def quantize_int8(cell):
    """The int8 cell of an fp32 cell (ONNX): each MatMul by a constant weight, with the Add of a constant
    bias that follows it, becomes QuantizeLinear → MatMulIntegerToFloat."""
    model = onnx.ModelProto()
    model.CopyFrom(cell)
    graph = model.graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    scale, zero_point = "int8/activation_scale", "int8/activation_zero_point"
    added = [numpy_helper.from_array(np.array(ACTIVATION_SCALE, np.float32), scale),
             numpy_helper.from_array(np.array(ACTIVATION_ZERO_POINT, np.uint8), zero_point)]
    nodes, fused = [], set()  # fused: the outputs of the bias Adds folded into a matmul
    for node in graph.node:
        if node.output[0] in fused:
            continue
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or weight.ndim != 2:
            nodes.append(node)
            continue
        name, output = node.input[1], node.output[0]
        bias_add = _bias_add(consumers.get(output, []), output, weights, weight.shape[1])
        column_scale = np.abs(weight).max(axis=0) / WEIGHT_MAX
        column_scale[column_scale == 0] = 1
        added += [numpy_helper.from_array(np.rint(weight / column_scale).astype(np.int8), f"{name}/int8"),
                  numpy_helper.from_array(column_scale.astype(np.float32), f"{name}/int8_scale")]
        inputs = [f"{name}/int8_input", f"{name}/int8", scale, f"{name}/int8_scale", zero_point]
        if bias_add is not None:  # b_zero_point (symmetric weights: 0) left out, then the bias
            fused.add(bias_add.output[0])
            inputs += ["", next(i for i in bias_add.input if i != output)]
            output = bias_add.output[0]
        nodes += [helper.make_node("QuantizeLinear", [node.input[0], scale, zero_point], [f"{name}/int8_input"],
                                   name=f"{name}/quantize"),
                  helper.make_node("MatMulIntegerToFloat", inputs, [output], name=f"{name}/matmul", domain=MS_DOMAIN)]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [i for i in graph.initializer if i.name in used] + added
    del graph.initializer[:]
    graph.initializer.extend(kept)
    model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    onnx.checker.check_model(model, full_check=True)
    return model


def _bias_add(consumers, output, weights, columns):
    """The Add node that adds a constant [columns] bias to `output`, if it is the output's only consumer."""
    if len(consumers) != 1 or consumers[0].op_type != "Add":
        return None
    other = [weights.get(name) for name in consumers[0].input if name != output]
    return consumers[0] if len(other) == 1 and other[0] is not None and other[0].shape == (columns,) else None


class Int8(NamedTuple):
    """The int8 cell, its sampling loop and their validation records, for the bundle's "int8" entries."""

    cell: onnx.ModelProto
    loop: onnx.ModelProto
    validation: dict  # {"int8": …, "loop": {"int8": …}}


def int8_variant(fp32_cell, ids, spec, held_out, tolerance=validate.TOLERANCE, log=print):
    """Quantize `fp32_cell` and validate the result on the text `ids`: its cost against fp32, rows
    that never interact, and a sampling loop that draws what the cell draws."""
    cell = quantize_int8(fp32_cell)
    fp32, int8 = (validate.onnx_step(validate.cpu_session(m.SerializeToString()), spec) for m in (fp32_cell, cell))
    record = {**cost(fp32, int8, ids, spec), "rows": rows_alone(int8, ids, spec),
              "quantization": f"int8 weights per column in [-{WEIGHT_MAX}, {WEIGHT_MAX}]; activations (hidden states, "
                              "in [-1, 1]) at the fixed scale 1/127, so rows are independent"}
    log(f"int8         bits/char {record['bits_per_char']:.4f}, cost {record['cost_bits_per_char']:+.4f} vs fp32 "
        f"(limit {COST_LIMIT}, held-out: {held_out}); max |Δlogit| vs fp32 {record['max_abs_logit_diff']:.2e}; "
        f"rows stepped together = alone (max abs diff {record['rows']['max_abs_diff']:.1e})")
    if record["cost_bits_per_char"] > COST_LIMIT:
        raise validate.ValidationFailed(f"int8 costs {record['cost_bits_per_char']:+.4f} bits/char against fp32, "
                                        f"over the limit {COST_LIMIT}; nothing was written")
    wrapped = loop.wrap(cell, spec, validate.TENSORS)
    loop_record = loop.compare(validate.cpu_session(wrapped.SerializeToString()), int8, ids, spec,
                               tolerance=tolerance, log=log)
    return Int8(cell, wrapped, {"int8": record, "loop": {"int8": loop_record}})


def cost(fp32, int8, ids, spec):
    """Bits per character of both steps on the validation text (4 rows, teacher-forced), and the largest
    logit difference."""
    rows = validate.segments(ids, 4, len(ids) // 4 - 1)
    logits = [validate.step_through(step, rows[:, :-1], spec) for step in (fp32, int8)]
    bpc = [validate.bits_per_char(z, rows[:, 1:]) for z in logits]
    return {"bits_per_char": bpc[1], "fp32_bits_per_char": bpc[0], "cost_bits_per_char": bpc[1] - bpc[0],
            "max_abs_logit_diff": float(np.abs(logits[1] - logits[0]).max())}


def rows_alone(step, ids, spec):
    """Three rows of the validation text stepped as one batch must give, bit for bit, the logits each
    gives alone at every step: what lets a server batch requests without changing their text."""
    rows = validate.segments(ids, 3, validate.SHORT)[:, :-1]
    together = validate.step_through(step, rows, spec)
    worst = max(float(np.abs(validate.step_through(step, rows[i:i + 1], spec)[0] - together[i]).max())
                for i in range(len(rows)))
    if worst != 0:
        raise validate.ValidationFailed(f"int8 rows differ by {worst:.2e} when stepped together instead of "
                                        "alone; nothing was written")
    return {"batch": len(rows), "steps": rows.shape[1], "identical": True, "max_abs_diff": worst}
