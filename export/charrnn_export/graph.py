"""Building ONNX graphs around the exported cell: its nodes inlined into a Loop or Scan body."""

import onnx
from onnx import TensorProto, helper


def inline_cell(cell, spec, tensors, prefix, char):
    """The cell's nodes renamed for a subgraph: every internal name under `prefix`, the character
    input read from `char` and each state input from f"{prefix}in/{input}". Returns the nodes and
    the new name of each of the cell's names (the weights keep theirs: the body holds them)."""
    inner = {name: f"{prefix}{name}" for node in cell.graph.node for name in [*node.input, *node.output]}
    inner.update({i.name: i.name for i in cell.graph.initializer})
    inner[""] = ""  # an omitted optional input
    inner[tensors["char"]] = char
    inner.update({t.input: f"{prefix}in/{t.input}" for t in spec})

    def renamed(node):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [inner[name] for name in node.input]
        copy.output[:] = [inner[name] for name in node.output]
        return copy

    return [renamed(node) for node in cell.graph.node], inner


def value(name, elem=TensorProto.FLOAT, shape=None):
    return helper.make_tensor_value_info(name, elem, shape)


def vocab_size(cell, tensors):
    logits = next(o for o in cell.graph.output if o.name == tensors["logits"])
    return logits.type.tensor_type.shape.dim[-1].dim_value or None


def model_like(cell, graph):
    """A checked model of `graph` with the cell's opsets, producer and IR version."""
    model = helper.make_model(graph, opset_imports=list(cell.opset_import), producer_name=cell.producer_name)
    model.ir_version = cell.ir_version
    onnx.checker.check_model(model, full_check=True)
    return model
