"""The network: Embedding → N recurrent layers (GRU or LSTM, full sequences) → Dense logits.

The defaults (one GRU, no dropout) build exactly the report's model, layer for layer, so its
weight initialisation, and with it every figure of the report's run, is unchanged. Dropout, when
asked for, sits on the inputs of every recurrent layer and of the Dense layer (not on the
recurrent connections, which would slow every step), as in karpathy/char-rnn; with
`locked_dropout` each mask is drawn once per sequence and shared by all its steps (variational
dropout).

AWD-LSTM's other regularisers (Merity et al., 2017) act in training only, through two layer
types that train like their Keras parents and infer exactly like them: `EmbeddingDropout` and
the `WeightDrop` GRU/LSTM. A run saves (and export reads) the same network built with plain
Embedding/GRU/LSTM layers: `build_model(..., regularised=False)`, the same weights in the same order.
"""

import keras
from keras import ops

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
class WeightDropGRU(WeightDrop, keras.layers.GRU):
    pass


@keras.saving.register_keras_serializable("charrnn")
class WeightDropLSTM(WeightDrop, keras.layers.LSTM):
    pass


WEIGHT_DROP_CELLS = {"gru": WeightDropGRU, "lstm": WeightDropLSTM}


def recurrent_layer_names(cell, layers):
    return [cell] if layers == 1 else [f"{cell}_{i}" for i in range(1, layers + 1)]


def build_model(vocab_size, embedding_dim=256, units=1024, layers=1, cell="gru", dropout=0.0,
                locked_dropout=False, embedding_dropout=0.0, weight_drop=0.0, regularised=True):
    """The network; regularised=False: the same network with plain layers only (what is saved)."""
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
