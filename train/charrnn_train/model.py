"""The network: Embedding → N recurrent layers (GRU or LSTM, full sequences) → Dense logits.

The defaults (one GRU, no dropout) build exactly the report's model, layer for layer, so its
weight initialisation, and with it every figure of the report's run, is unchanged. Dropout, when
asked for, sits on the inputs of every recurrent layer and of the Dense layer (not on the
recurrent connections, which would slow every step), as in karpathy/char-rnn; with
`locked_dropout` each mask is drawn once per sequence and shared by all its steps (variational
dropout).

AWD-LSTM's other regularisers (Merity et al., 2017) act in training only, through two layer
types that train like their Keras parents and infer exactly like them: `EmbeddingDropout` and
the `WeightDrop` GRU/LSTM. Training's recurrent layers also project their inputs for the whole
sequence before the time loop (`ProjectedInputs`). A run saves (and export reads) the same network
built with plain Embedding/GRU/LSTM layers: `build_model(..., regularised=False)`, the same weights
in the same order.
"""

import keras
from keras import ops
from keras.src import backend as keras_backend  # Keras' time loop, rnn() (keras is pinned in pyproject)

CELLS = {"gru": keras.layers.GRU, "lstm": keras.layers.LSTM}


@keras.saving.register_keras_serializable("charrnn")
class EmbeddingDropout(keras.layers.Embedding):
    """Embedding that in training drops whole characters: one mask per batch over the vocabulary
    zeroes every occurrence of the dropped characters and scales the others by 1 / (1 - rate)."""

    def __init__(self, *args, rate=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.rate = rate
        self.seed_generator = keras.random.SeedGenerator()

    def call(self, inputs, training=False):
        if not training:
            return super().call(inputs)
        keep = keras.random.dropout(ops.ones((self.input_dim, 1)), self.rate, seed=self.seed_generator)
        return ops.take(self.embeddings * keep, ops.cast(inputs, "int32"), axis=0)

    def compute_output_spec(self, inputs, training=False):  # Keras passes call's arguments
        return super().compute_output_spec(inputs)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


class ProjectedInputs:
    """A GRU/LSTM layer whose loop multiplies only the recurrent kernel at each step: the inputs'
    share of every gate (x·W + b) is one matmul over the whole sequence before the loop, as cuDNN
    does, instead of a small matmul per step as Keras' cells do. The same weights and arithmetic as
    the Keras parent (tests/test_train.py holds outputs and gradients to it); training steps are
    faster on CPU (benchmarks/train_speed.py). Where the parent has a fused kernel (cuDNN on a GPU)
    or a setting this loop lacks (a mask, the cell's own dropout), the parent's loop runs."""

    def inner_loop(self, sequences, initial_state, mask, training=False):
        cell = self.cell
        if mask is not None or cell.dropout or cell.recurrent_dropout or not cell.use_bias or self._parent_loop():
            return super().inner_loop(sequences, initial_state, mask, training=training)
        projected = ops.matmul(sequences, cell.kernel) + self._input_bias()
        return keras_backend.rnn(self._recurrent_step(cell.recurrent_kernel), projected, list(initial_state),
                                 go_backwards=self.go_backwards, unroll=self.unroll, input_length=sequences.shape[1],
                                 return_all_outputs=self.return_sequences)


@keras.saving.register_keras_serializable("charrnn")
class ProjectedGRU(ProjectedInputs, keras.layers.GRU):
    def _parent_loop(self):
        cell = self.cell
        # Only TensorFlow's check knows reset_after (the other backends' fused GRU assumes it).
        reset_after = {"reset_after": cell.reset_after} if keras.backend.backend() == "tensorflow" else {}
        return not cell.reset_after or self.use_cudnn is not False and keras_backend.cudnn_ok(
            cell.activation, cell.recurrent_activation, self.unroll, cell.use_bias, **reset_after)

    def _input_bias(self):
        return self.cell.bias[0]  # reset_after: the input bias, then the recurrent one

    def _recurrent_step(self, recurrent_kernel):
        cell, recurrent_bias = self.cell, self.cell.bias[1]

        def step(projected, states):
            h = states[0]
            x_z, x_r, x_h = ops.split(projected, 3, axis=-1)
            h_z, h_r, h_h = ops.split(ops.matmul(h, recurrent_kernel) + recurrent_bias, 3, axis=-1)
            z = cell.recurrent_activation(x_z + h_z)
            r = cell.recurrent_activation(x_r + h_r)
            h = z * h + (1 - z) * cell.activation(x_h + r * h_h)
            return h, [h]
        return step


@keras.saving.register_keras_serializable("charrnn")
class ProjectedLSTM(ProjectedInputs, keras.layers.LSTM):
    def _parent_loop(self):
        cell = self.cell
        return self.use_cudnn is not False and keras_backend.cudnn_ok(
            cell.activation, cell.recurrent_activation, self.unroll, cell.use_bias)

    def _input_bias(self):
        return self.cell.bias

    def _recurrent_step(self, recurrent_kernel):
        cell = self.cell

        def step(projected, states):
            h, c = states
            z_i, z_f, z_c, z_o = ops.split(projected + ops.matmul(h, recurrent_kernel), 4, axis=-1)
            c = cell.recurrent_activation(z_f) * c + cell.recurrent_activation(z_i) * cell.activation(z_c)
            h = cell.recurrent_activation(z_o) * cell.activation(c)
            return h, [h, c]
        return step


class WeightDrop:
    """DropConnect on a GRU/LSTM layer's recurrent kernel (AWD-LSTM's weight drop).

    In training every batch draws one mask over the recurrent kernel (kept weights scaled by
    1 / (1 - weight_drop), as inverted dropout) and every step of every sequence in the batch uses
    that dropped kernel; inference uses the full kernel, so the layer exports as a plain one.
    """

    def __init__(self, *args, weight_drop=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_drop = weight_drop
        self.seed_generator = keras.random.SeedGenerator()

    def call(self, sequences, initial_state=None, mask=None, training=False):
        if not training:
            return super().call(sequences, initial_state=initial_state, mask=mask, training=training)
        kernel = self.cell.recurrent_kernel
        dropped = kernel * keras.random.dropout(ops.ones(kernel.shape), self.weight_drop, seed=self.seed_generator)
        # The cell reads self.recurrent_kernel at every step: it reads the dropped kernel during this
        # call (bypassing Keras' attribute tracking, which must keep the variable).
        object.__setattr__(self.cell, "recurrent_kernel", dropped)
        try:
            return super().call(sequences, initial_state=initial_state, mask=mask, training=training)
        finally:
            object.__setattr__(self.cell, "recurrent_kernel", kernel)

    def get_config(self):
        return {**super().get_config(), "weight_drop": self.weight_drop}


@keras.saving.register_keras_serializable("charrnn")
class WeightDropGRU(WeightDrop, ProjectedGRU):
    pass


@keras.saving.register_keras_serializable("charrnn")
class WeightDropLSTM(WeightDrop, ProjectedLSTM):
    pass


TRAINING_CELLS = {"gru": ProjectedGRU, "lstm": ProjectedLSTM}
WEIGHT_DROP_CELLS = {"gru": WeightDropGRU, "lstm": WeightDropLSTM}


def recurrent_layer_names(cell, layers):
    return [cell] if layers == 1 else [f"{cell}_{i}" for i in range(1, layers + 1)]


def build_model(vocab_size, embedding_dim=256, units=1024, layers=1, cell="gru", dropout=0.0,
                locked_dropout=False, embedding_dropout=0.0, weight_drop=0.0, regularised=True):
    """The network as it trains; regularised=False: the same network with plain Keras layers only
    (what is saved and exported)."""
    if regularised and embedding_dropout > 0:
        embedding = EmbeddingDropout(vocab_size, embedding_dim, rate=embedding_dropout, name="embedding")
    else:
        embedding = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")
    stack = [keras.Input(shape=(None,), dtype="int32", name="chars"), embedding]
    noise_shape = (None, 1, None) if locked_dropout else None  # one mask per sequence, all steps
    for i, name in enumerate(recurrent_layer_names(cell, layers)):
        if dropout > 0:
            stack.append(keras.layers.Dropout(dropout, noise_shape=noise_shape, name=f"dropout_{i}"))
        options = dict(return_sequences=True, recurrent_initializer="glorot_uniform", name=name)
        if regularised and weight_drop > 0:
            stack.append(WEIGHT_DROP_CELLS[cell](units, weight_drop=weight_drop, **options))
        elif regularised:
            stack.append(TRAINING_CELLS[cell](units, **options))
        else:
            stack.append(CELLS[cell](units, **options))
    if dropout > 0:
        stack.append(keras.layers.Dropout(dropout, noise_shape=noise_shape, name=f"dropout_{layers}"))
    stack.append(keras.layers.Dense(vocab_size, name="logits"))
    return keras.Sequential(stack, name="charrnn")


def learning_rate(config, steps_per_epoch):
    """A float (constant) or a cosine decay from learning_rate to min_learning_rate over the run."""
    if config.lr_schedule == "constant":
        return config.learning_rate
    return keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=config.epochs * steps_per_epoch,
        alpha=config.min_learning_rate / config.learning_rate)


def compile_model(model, learning_rate=0.001, clip_norm=None, weight_decay=0.0):
    """Adam, or with weight_decay AdamW: every weight shrinks by learning_rate * weight_decay per step,
    apart from the gradient step (decoupled, as torch.optim.AdamW on all parameters)."""
    if weight_decay:
        optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay,
                                           global_clipnorm=clip_norm)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate, global_clipnorm=clip_norm)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model
