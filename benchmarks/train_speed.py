"""Seconds per training step, and per epoch of Tiny Shakespeare's first 90%, for network shapes under the
round-2 recipe's regularisers: charrnn's training layers (inputs projected before the time loop) against
the same layers running Keras' own loop, under each Keras backend, alternating.

    python benchmarks/train_speed.py [--shapes 2x512@32,2x512@64,3x512@32,3x512@64] [--backends tensorflow,jax]
                                     [--steps 8] [--repeats 3]

A shape is LAYERSxUNITS@BATCH; every other setting is the recipe's (`make shakespeare-gru2x512-awd`):
sequences of 200, embedding 128, locked dropout 0.25, weight drop 0.25, AdamW 0.05, clipping at 5.
Keras picks its backend once per process, so each measurement runs in a process of its own
(KERAS_BACKEND=...), backends and repeats alternating. Under JAX, Keras' own GRU loop already projects
its inputs (a compiled scan); under TensorFlow it multiplies the input kernel at every step.
Prints the median ms per step of each and the epoch they make (validation not included).
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RECIPE = dict(seq_length=200, embedding_dim=128, dropout=0.25, locked_dropout=True, weight_drop=0.25,
              weight_decay=0.05, clip_norm=5.0, learning_rate=0.002, validation_fraction=0.1)


def keras_loop(self, *args, **kwargs):
    """The Keras parent's inner loop, for a ProjectedInputs layer (its cell's matmuls at every step)."""
    from charrnn_train.model import ProjectedInputs

    return super(ProjectedInputs, self).inner_loop(*args, **kwargs)


def timed_steps(model, inputs, targets, batch_size, steps):
    """Seconds per step of `steps` steps of model.fit (after one to warm up)."""
    model.fit(inputs[:batch_size], targets[:batch_size], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    rows = steps * batch_size
    started = time.perf_counter()
    model.fit(inputs[:rows], targets[:rows], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return (time.perf_counter() - started) / steps


def measure(shape, steps):
    """In this process (its Keras backend): seconds per step of each loop for one shape, and steps per epoch."""
    import keras

    from charrnn_train import data
    from charrnn_train.config import Config
    from charrnn_train.model import ProjectedInputs, compile_model

    network, batch_size = shape.split("@")
    layers, units = (int(n) for n in network.split("x"))
    config = Config(layers=layers, units=units, batch_size=int(batch_size), **RECIPE)
    text = data.read_corpus(config.corpus)
    vocab = data.build_vocab(text)
    ids = data.encode(text, vocab)
    train_set, _ = data.split(ids, config.seq_length, config.batch_size, config.buffer_size, config.seed,
                              config.validation_fraction)
    inputs, targets = train_set.epoch(1)
    seconds = {"steps_per_epoch": train_set.steps_per_epoch}
    for loop in ("keras", "projected"):
        keras.utils.set_random_seed(config.seed)
        model = compile_model(config.build(len(vocab)), config.learning_rate, config.clip_norm,
                              config.weight_decay)
        with mock.patch.object(ProjectedInputs, "inner_loop", keras_loop) if loop == "keras" else nullcontext():
            seconds[loop] = timed_steps(model, inputs, targets, config.batch_size, steps)
        del model
        keras.backend.clear_session()
    return seconds


def measure_in_process(backend, shape, steps):
    command = [sys.executable, __file__, "--measure", shape, "--steps", str(steps)]
    result = subprocess.run(command, env={**os.environ, "KERAS_BACKEND": backend}, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{backend}, {shape}: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="2x512@32,2x512@64,3x512@32,3x512@64")
    parser.add_argument("--backends", default="tensorflow,jax", help="Keras backends (one not installed is skipped)")
    parser.add_argument("--steps", type=int, default=8, help="steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each, alternating (the median)")
    parser.add_argument("--measure", metavar="SHAPE", help=argparse.SUPPRESS)  # one measurement, as JSON
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.steps)))
        return

    backends = [b for b in args.backends.split(",") if importlib.util.find_spec(b) is not None]
    print("| shape | backend | steps/epoch | Keras' loop ms/step | projected ms/step | speed-up | epoch, projected |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        runs = {backend: [] for backend in backends}
        for _ in range(args.repeats):
            for backend in backends:
                runs[backend].append(measure_in_process(backend, shape, args.steps))
        network, batch_size = shape.split("@")
        for backend, measured in runs.items():
            keras_step, projected_step = (statistics.median(m[loop] for m in measured) for loop in ("keras", "projected"))
            steps_per_epoch = measured[0]["steps_per_epoch"]
            print(f"| {network.replace('x', '×')}, batch {batch_size} | {backend} | {steps_per_epoch} | "
                  f"{1000 * keras_step:,.0f} | {1000 * projected_step:,.0f} | {keras_step / projected_step:.2f}× | "
                  f"{steps_per_epoch * projected_step:,.0f} s |", flush=True)
    skipped = sorted(set(args.backends.split(",")) - set(backends))
    print(f"medians of {args.repeats} alternating measurements of {args.steps} steps; {os.cpu_count()} CPUs"
          + (f"; not installed: {', '.join(skipped)}" if skipped else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
