"""The network: Embedding → N recurrent layers (GRU or LSTM, full sequences) → Dense logits.

The defaults (one GRU, no dropout) build exactly the report's model, layer for layer, so its
weight initialisation, and with it every figure of the report's run, is unchanged. Dropout, when
asked for, sits on the inputs of every recurrent layer and of the Dense layer (not on the
recurrent connections, which would slow every step), as in karpathy/char-rnn.
"""

import keras

CELLS = {"gru": keras.layers.GRU, "lstm": keras.layers.LSTM}


def recurrent_layer_names(cell, layers):
    return [cell] if layers == 1 else [f"{cell}_{i}" for i in range(1, layers + 1)]


def build_model(vocab_size, embedding_dim=256, units=1024, layers=1, cell="gru", dropout=0.0):
    stack = [keras.Input(shape=(None,), dtype="int32", name="chars"),
             keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")]
    for i, name in enumerate(recurrent_layer_names(cell, layers)):
        if dropout > 0:
            stack.append(keras.layers.Dropout(dropout, name=f"dropout_{i}"))
        stack.append(CELLS[cell](units, return_sequences=True, recurrent_initializer="glorot_uniform", name=name))
    if dropout > 0:
        stack.append(keras.layers.Dropout(dropout, name=f"dropout_{layers}"))
    stack.append(keras.layers.Dense(vocab_size, name="logits"))
    return keras.Sequential(stack, name="charrnn")


def learning_rate(config, steps_per_epoch):
    """A float (constant) or a cosine decay from learning_rate to min_learning_rate over the run."""
    if config.lr_schedule == "constant":
        return config.learning_rate
    return keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=config.epochs * steps_per_epoch,
        alpha=config.min_learning_rate / config.learning_rate)


def compile_model(model, learning_rate=0.001, clip_norm=None):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate, global_clipnorm=clip_norm),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model
