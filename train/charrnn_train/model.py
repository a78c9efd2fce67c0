"""The report's network: Embedding → GRU (full sequences) → Dense logits."""

import keras


def build_model(vocab_size, embedding_dim=256, units=1024):
    model = keras.Sequential(
        [
            keras.Input(shape=(None,), dtype="int32", name="chars"),
            keras.layers.Embedding(vocab_size, embedding_dim, name="embedding"),
            keras.layers.GRU(
                units,
                return_sequences=True,
                recurrent_initializer="glorot_uniform",
                name="gru",
            ),
            keras.layers.Dense(vocab_size, name="logits"),
        ],
        name="charrnn",
    )
    return model


def compile_model(model, learning_rate=0.001):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model
