"""The trained Keras network as a single-step cell with the state kept outside.

    (char int32 [batch], *state float32 [batch, units]) → (logits [batch, vocab], *next_state)

The state is one tensor per GRU layer, or a hidden and a cell tensor per LSTM layer; a one-layer
GRU keeps the report's names `hidden` → `next_hidden`. The Embedding is folded into the first
layer's input projection: the input side of every gate is `embedding[char] @ kernel + input_bias`,
so one (vocab × gates·units) table replaces the embedding lookup, a matmul and an add per step,
exactly (Keras' GRU has reset_after=True, so its input bias is separate from the recurrent one).
"""

import keras
import numpy as np
import tensorflow as tf

from charrnn_runtime.bundle import StateTensor
from charrnn_runtime.errors import CharrnnError

from .validate import TENSORS

RECURRENT = {"GRU": "gru", "LSTM": "lstm"}
ROLES = {"gru": ("hidden",), "lstm": ("hidden", "cell")}


def network_layers(model):
    """(Embedding, [recurrent layers], Dense) of a supported model (Dropout is skipped), or a clear error."""
    layers = [layer for layer in model.layers
              if not isinstance(layer, (keras.layers.InputLayer, keras.layers.Dropout))]
    kinds = [type(layer).__name__ for layer in layers]
    if len(kinds) < 3 or kinds[0] != "Embedding" or kinds[-1] != "Dense" \
            or any(kind not in RECURRENT for kind in kinds[1:-1]):
        raise CharrnnError(f"unsupported architecture {' → '.join(kinds) or '(empty)'}: "
                           "charrnn exports Embedding → GRU/LSTM layers → Dense")
    embedding, *recurrent, dense = layers
    for layer in recurrent:
        cell = layer.cell
        expected = {"activation": "tanh", "recurrent_activation": "sigmoid", "use_bias": True,
                    "go_backwards": False, "return_sequences": True}
        actual = {"activation": keras.activations.serialize(cell.activation), "use_bias": cell.use_bias,
                  "recurrent_activation": keras.activations.serialize(cell.recurrent_activation),
                  "go_backwards": layer.go_backwards, "return_sequences": layer.return_sequences}
        if isinstance(layer, keras.layers.GRU):
            expected["reset_after"], actual["reset_after"] = True, cell.reset_after
        wrong = [f"{k}={actual[k]!r}" for k in expected if actual[k] != expected[k]]
        if wrong:
            raise CharrnnError(f"unsupported {layer.name} settings ({', '.join(wrong)}): charrnn exports "
                               "tanh/sigmoid GRU (reset_after) and LSTM layers with biases")
    if keras.activations.serialize(dense.activation) != "linear" or not dense.use_bias:
        raise CharrnnError("unsupported Dense settings: charrnn exports a linear Dense with bias")
    return embedding, recurrent, dense


def cell_weights(model):
    """Folded float32 weights and the dense kernel and bias. Per layer: cell, recurrent_kernel, and
    for layer 0 a table (embedding @ kernel + input bias), else kernel and input_bias; a GRU also has
    its separate recurrent_bias."""
    embedding, recurrent, dense = network_layers(model)
    layers = []
    for i, layer in enumerate(recurrent):
        cell = RECURRENT[type(layer).__name__]
        kernel, recurrent_kernel, bias = (np.asarray(w) for w in layer.cell.get_weights())
        weights = {"cell": cell, "recurrent_kernel": recurrent_kernel}
        input_bias = bias
        if cell == "gru":
            input_bias, weights["recurrent_bias"] = bias
        if i == 0:
            table = np.asarray(embedding.get_weights()[0]).astype(np.float64) @ kernel.astype(np.float64)
            weights["table"] = (table + input_bias).astype(np.float32)
        else:
            weights["kernel"], weights["input_bias"] = kernel, input_bias
        layers.append(weights)
    dense_kernel, dense_bias = (np.asarray(w) for w in dense.get_weights())
    return {"layers": layers, "dense_kernel": dense_kernel, "dense_bias": dense_bias}


def state_spec(weights):
    """The cell's state tensors, in input order: [hidden(, cell)] per layer."""
    layers = weights["layers"]
    spec = []
    for i, layer in enumerate(layers):
        units = layer["recurrent_kernel"].shape[0]
        for role in ROLES[layer["cell"]]:
            name = role if len(layers) == 1 else f"{role}_{i}"
            spec.append(StateTensor(name, f"next_{name}", units, i, role))
    return spec


def vocab_size(weights):
    return weights["layers"][0]["table"].shape[0]


class Cell(tf.Module):
    """One step of the whole stack in TensorFlow ops that tf2onnx maps to standard ONNX ops."""

    def __init__(self, weights):
        super().__init__(name="charrnn_cell")
        self.spec = state_spec(weights)
        self.kinds = [layer["cell"] for layer in weights["layers"]]
        self.layer_variables = [{name: tf.Variable(value, trainable=False, name=f"{name}_{i}")
                                 for name, value in layer.items() if name != "cell"}
                                for i, layer in enumerate(weights["layers"])]
        self.dense_kernel = tf.Variable(weights["dense_kernel"], trainable=False, name="dense_kernel")
        self.dense_bias = tf.Variable(weights["dense_bias"], trainable=False, name="dense_bias")
        self.step = tf.function(self._step, input_signature=[
            tf.TensorSpec([None], tf.int32, name=TENSORS["char"]),
            *(tf.TensorSpec([None, t.size], tf.float32, name=t.input) for t in self.spec)])

    def _step(self, char, *state):
        state, next_state, x = list(state), {}, None
        for i, (kind, w) in enumerate(zip(self.kinds, self.layer_variables)):
            x = tf.gather(w["table"], char) if i == 0 else tf.matmul(x, w["kernel"]) + w["input_bias"]
            h = state.pop(0)
            recurrent = tf.matmul(h, w["recurrent_kernel"])
            if "recurrent_bias" in w:
                recurrent += w["recurrent_bias"]
            if kind == "gru":
                x = gru(x, h, recurrent)
                layer_state = [x]
            else:
                x, c = lstm(x, state.pop(0), recurrent)
                layer_state = [x, c]
            for t, value in zip([t for t in self.spec if t.layer == i], layer_state):
                next_state[t.output] = value
        logits = tf.matmul(x, self.dense_kernel) + self.dense_bias
        return {TENSORS["logits"]: logits, **next_state}


def gru(x, hidden, recurrent):
    """Keras' reset_after GRU: gates z, r, candidate from input (x) and recurrent projections."""
    units = hidden.shape[-1]
    x_zr, x_candidate = tf.split(x, [2 * units, units], axis=1)
    h_zr, h_candidate = tf.split(recurrent, [2 * units, units], axis=1)
    update, reset = tf.split(tf.sigmoid(x_zr + h_zr), 2, axis=1)
    candidate = tf.tanh(x_candidate + reset * h_candidate)
    return candidate + update * (hidden - candidate)


def lstm(x, cell, recurrent):
    """Keras' LSTM: gates i, f, candidate, o → (next hidden, next cell)."""
    i, f, candidate, o = tf.split(x + recurrent, 4, axis=1)
    next_cell = tf.sigmoid(f) * cell + tf.sigmoid(i) * tf.tanh(candidate)
    return tf.sigmoid(o) * tf.tanh(next_cell), next_cell
