"""Seconds per training step, and per epoch of Tiny Shakespeare's first 90%, for network shapes under the
round-2 recipe's regularisers: charrnn's training layers (inputs projected before the time loop) against
the same layers running Keras' own loop, alternating, in one process.

    python benchmarks/train_speed.py [--shapes 2x512@32,2x512@64,3x512@32,3x512@64] [--steps 8] [--repeats 3]

A shape is LAYERSxUNITS@BATCH; every other setting is the recipe's (`make shakespeare-gru2x512-awd`):
sequences of 200, embedding 128, locked dropout 0.25, weight drop 0.25, AdamW 0.05, clipping at 5.
Prints the median ms per step of each and the epoch they make (validation not included).
"""

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from charrnn_train import data  # noqa: E402
from charrnn_train.config import Config  # noqa: E402
from charrnn_train.model import ProjectedInputs, compile_model  # noqa: E402

RECIPE = dict(seq_length=200, embedding_dim=128, dropout=0.25, locked_dropout=True, weight_drop=0.25,
              weight_decay=0.05, clip_norm=5.0, learning_rate=0.002, validation_fraction=0.1)


def keras_loop(self, *args, **kwargs):
    """The Keras parent's inner loop, for a ProjectedInputs layer (its cell's matmuls at every step)."""
    return super(ProjectedInputs, self).inner_loop(*args, **kwargs)


def timed_steps(model, inputs, targets, batch_size, steps):
    """Seconds per step of `steps` steps of model.fit (after one to warm up)."""
    model.fit(inputs[:batch_size], targets[:batch_size], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    rows = steps * batch_size
    started = time.perf_counter()
    model.fit(inputs[:rows], targets[:rows], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return (time.perf_counter() - started) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="2x512@32,2x512@64,3x512@32,3x512@64")
    parser.add_argument("--steps", type=int, default=8, help="steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each, alternating (the median)")
    args = parser.parse_args()

    import keras

    ids = None
    print("| shape | steps/epoch | Keras' loop ms/step | projected ms/step | speed-up | epoch, projected |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        network, batch_size = shape.split("@")
        layers, units = (int(n) for n in network.split("x"))
        config = Config(layers=layers, units=units, batch_size=int(batch_size), **RECIPE)
        if ids is None:
            text = data.read_corpus(config.corpus)
            vocab = data.build_vocab(text)
            ids = data.encode(text, vocab)
        train_set, _ = data.split(ids, config.seq_length, config.batch_size, config.buffer_size, config.seed,
                                  config.validation_fraction)
        inputs, targets = train_set.epoch(1)
        models = {}
        for loop in ("keras", "projected"):
            keras.utils.set_random_seed(config.seed)
            models[loop] = compile_model(config.build(len(vocab)), config.learning_rate, config.clip_norm, config.weight_decay)
        seconds = {loop: [] for loop in models}
        for _ in range(args.repeats):
            for loop, model in models.items():  # fit traces its step once, at the first measurement
                with mock.patch.object(ProjectedInputs, "inner_loop", keras_loop) if loop == "keras" else nullcontext():
                    seconds[loop].append(timed_steps(model, inputs, targets, config.batch_size, args.steps))
        keras_step, projected_step = (statistics.median(seconds[loop]) for loop in ("keras", "projected"))
        print(f"| {layers}×{units}, batch {config.batch_size} | {train_set.steps_per_epoch} | {1000 * keras_step:,.0f} | "
              f"{1000 * projected_step:,.0f} | {keras_step / projected_step:.2f}× | "
              f"{train_set.steps_per_epoch * projected_step:,.0f} s |", flush=True)
        del models
        keras.backend.clear_session()
    print(f"medians of {args.repeats} alternating measurements of {args.steps} steps; {os.cpu_count()} CPUs",
          file=sys.stderr)


if __name__ == "__main__":
    main()
