"""The trained Keras network as a single-step cell with the state kept outside.

    (char int32 [batch], hidden float32 [batch, units]) → (logits [batch, vocab], next_hidden)

The Embedding is folded into the GRU's input projection: for Keras' reset_after=True GRU the input
side of every gate is `embedding[char] @ kernel + input_bias`, so one (vocab × 3·units) table
replaces the embedding lookup, a matmul and an add per step, exactly.
"""

import keras
import numpy as np
import tensorflow as tf

from charrnn_runtime.errors import CharrnnError

TENSORS = {"char": "char", "hidden": "hidden", "logits": "logits", "next_hidden": "next_hidden"}


def network_layers(model):
    """The (Embedding, GRU, Dense) layers of a supported model, or a clear error."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    kinds = [type(layer).__name__ for layer in layers]
    if kinds != ["Embedding", "GRU", "Dense"]:
        raise CharrnnError(f"unsupported architecture {' → '.join(kinds) or '(empty)'}: "
                           "charrnn exports Embedding → GRU → Dense")
    embedding, gru, dense = layers
    cell = gru.cell
    expected = {"reset_after": True, "activation": "tanh", "recurrent_activation": "sigmoid",
                "use_bias": True, "go_backwards": False}
    actual = {"reset_after": cell.reset_after, "use_bias": cell.use_bias, "go_backwards": gru.go_backwards,
              "activation": keras.activations.serialize(cell.activation),
              "recurrent_activation": keras.activations.serialize(cell.recurrent_activation)}
    wrong = [f"{k}={actual[k]!r}" for k in expected if actual[k] != expected[k]]
    if wrong or keras.activations.serialize(dense.activation) != "linear" or not dense.use_bias:
        raise CharrnnError(f"unsupported GRU/Dense settings ({', '.join(wrong) or 'dense activation/bias'}): "
                           "charrnn exports a reset_after tanh/sigmoid GRU and a linear Dense with bias")
    return embedding, gru, dense


def cell_weights(model):
    """Folded float32 weights: table [vocab, 3u], recurrent kernel [u, 3u] and bias, dense kernel and bias."""
    embedding, gru, dense = network_layers(model)
    kernel, recurrent_kernel, bias = (np.asarray(w) for w in gru.cell.get_weights())
    embeddings = np.asarray(embedding.get_weights()[0])
    table = embeddings.astype(np.float64) @ kernel.astype(np.float64) + bias[0]
    dense_kernel, dense_bias = (np.asarray(w) for w in dense.get_weights())
    return {"table": table.astype(np.float32), "recurrent_kernel": recurrent_kernel,
            "recurrent_bias": bias[1], "dense_kernel": dense_kernel, "dense_bias": dense_bias}


class Cell(tf.Module):
    """One GRU step in TensorFlow ops that tf2onnx maps to standard ONNX ops."""

    def __init__(self, weights):
        super().__init__(name="charrnn_cell")
        self.vocab_size, gates = weights["table"].shape
        self.units = gates // 3
        for name, value in weights.items():
            setattr(self, name, tf.Variable(value, trainable=False, name=name))
        self.step = tf.function(self._step, input_signature=[
            tf.TensorSpec([None], tf.int32, name=TENSORS["char"]),
            tf.TensorSpec([None, self.units], tf.float32, name=TENSORS["hidden"]),
        ])

    def _step(self, char, hidden):
        units = self.units
        x = tf.gather(self.table, char)
        h = tf.matmul(hidden, self.recurrent_kernel) + self.recurrent_bias
        x_zr, x_candidate = tf.split(x, [2 * units, units], axis=1)
        h_zr, h_candidate = tf.split(h, [2 * units, units], axis=1)
        update, reset = tf.split(tf.sigmoid(x_zr + h_zr), 2, axis=1)
        candidate = tf.tanh(x_candidate + reset * h_candidate)
        next_hidden = candidate + update * (hidden - candidate)
        logits = tf.matmul(next_hidden, self.dense_kernel) + self.dense_bias
        return {TENSORS["logits"]: logits, TENSORS["next_hidden"]: next_hidden}
