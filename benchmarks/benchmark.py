"""Characters per second of the report's generation loop, a tf.function step loop, and the charrnn runtime.

    python benchmarks/benchmark.py [--model models/shakespeare] [--json benchmarks/results.json]

All rows run in one process on one machine, so the ratios compare like with like. Every figure is
the median of --repeats runs. Needs the [train] extra (TensorFlow) for the reference rows.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
PRIME = "ROMEO: "


def median_rate(work, units, repeats):
    """Median units/second of `work()` over repeats (after one warm-up run)."""
    return median_rates({None: work}, units, repeats)[None]


def median_rates(works, units, repeats):
    """{name: median units/second} of each `work()` (after one warm-up run each), the works taking turns
    in every repeat, so a machine that slows down or speeds up mid-run weighs on all of them alike."""
    for work in works.values():
        work()
    rates = {name: [] for name in works}
    for _ in range(repeats):
        for name, work in works.items():
            started = time.perf_counter()
            work()
            rates[name].append(units / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def report_loop(keras_file, vocab, chars, repeats):
    """The report's loop: the model rebuilt at batch 1 with a stateful GRU, one call per character."""
    import keras
    import tensorflow as tf

    trained = keras.models.load_model(keras_file, compile=False)
    units = trained.get_layer("gru").units
    model = keras.Sequential([
        keras.Input(batch_shape=(1, None), dtype="int32"),
        keras.layers.Embedding(len(vocab), trained.get_layer("embedding").output_dim),
        keras.layers.GRU(units, return_sequences=True, stateful=True, recurrent_initializer="glorot_uniform"),
        keras.layers.Dense(len(vocab)),
    ])
    model.set_weights(trained.get_weights())
    index = {c: i for i, c in enumerate(vocab)}

    def generate():
        model.get_layer(index=1).reset_states()
        input_eval = tf.expand_dims([index[c] for c in PRIME], 0)
        for _ in range(chars):
            predictions = model(input_eval)[:, -1, :] / 1.0
            predicted_id = tf.random.categorical(predictions, num_samples=1)[-1, 0]
            input_eval = tf.expand_dims([predicted_id], 0)
    return median_rate(generate, chars, repeats)


def tf_function_loop(keras_file, vocab, chars, repeats):
    """A tf.function single step with external state and tf.random.categorical."""
    import keras
    import tensorflow as tf

    model = keras.models.load_model(keras_file, compile=False)
    embedding, gru, dense = (model.get_layer(n) for n in ("embedding", "gru", "logits"))

    @tf.function(input_signature=[tf.TensorSpec([1], tf.int32), tf.TensorSpec([1, gru.units], tf.float32)])
    def step(char, hidden):
        output, states = gru.cell(embedding(char), [hidden])
        next_char = tf.random.categorical(dense(output), 1)[:, 0]
        return tf.cast(next_char, tf.int32), states[0]

    def generate():
        hidden = tf.zeros([1, gru.units])
        char = None
        for c in PRIME:
            char, hidden = step(tf.constant([vocab.index(c)]), hidden)
        for _ in range(chars):
            char, hidden = step(char, hidden)
    return median_rate(generate, chars, repeats)


def runtime_rate(model, streams, chars, repeats):
    """Aggregate chars/s of the runtime's batched sampling loop (prime fed once, then forked)."""
    return runtime_rates({None: model}, streams, chars, repeats)[None]


def runtime_rates(models, streams, chars, repeats):
    """{name: aggregate chars/s} of the runtime's batched sampling loop (prime fed once, then forked) for
    each of `models` ({name: model}), measured in turns."""
    return median_rates({name: lambda model=model: model.generate_batch(PRIME, chars, num_samples=streams, seed=0)
                         for name, model in models.items()}, chars * streams, repeats)


def process_seconds(model_path, repeats, *options):
    """Median wall time of a whole `charrnn-run` process (stdout to a file), after one warm-up run."""
    command = [sys.executable, "-m", "charrnn_runtime", "--model", str(model_path), "--provider", "cpu", *options]
    times = []
    with tempfile.TemporaryFile() as out:
        for _ in range(repeats + 1):
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=out, stderr=subprocess.DEVNULL)
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def cli_rate(model_path, variant, chars, repeats):
    """chars/s of whole charrnn-run processes: (chars + 1)-character runs minus 1-character runs (start-up)."""
    run = [process_seconds(model_path, repeats, "--variant", variant, "--seed", "1", "--length", str(length))
           for length in (chars + 1, 1)]
    return chars / (run[0] - run[1])


def training_step_seconds(corpus, steps):
    """Median seconds per step over a second epoch: charrnn-train vs a plain model.fit of the same model.

    Medians of single steps, not epoch totals: on a shared machine a few slow steps would
    otherwise decide the comparison.
    """
    import keras

    from charrnn_train import train
    from charrnn_train.data import encode, split
    from charrnn_train.model import build_model, compile_model

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_train_batch_begin(self, batch, logs=None):
            self.started = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)

    text = Path(corpus).read_text(encoding="utf-8")[: steps * 64 * 101 + 1]
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "corpus.txt"
        small.write_text(text, encoding="utf-8")
        ours = StepTimer()
        train.train(train.start(train.Config(corpus=str(small), epochs=2), Path(tmp) / "run"),
                    log=lambda line: None, callbacks=[ours])

    vocab = sorted(set(text))
    batches, _ = split(encode(text, vocab), 100, 64, 10_000, seed=0)
    inputs, targets = batches.epoch(1)
    keras.utils.set_random_seed(0)
    plain = StepTimer()
    compile_model(build_model(len(vocab))).fit(inputs, targets, batch_size=64, epochs=2, verbose=0, callbacks=[plain])
    return statistics.median(ours.seconds[steps:]), statistics.median(plain.seconds[steps:])


def describe_machine():
    """CPU model and core count, plus the GPU's name where nvidia-smi answers."""
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    machine = f"{cpu}, {os.cpu_count()} cores"
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        gpu = ""
    return machine + (f", {gpu}" if gpu else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "shakespeare"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chars", type=int, default=2000, help="characters per runtime measurement")
    parser.add_argument("--reference-chars", type=int, default=200, help="characters per report-loop run")
    parser.add_argument("--cli-chars", type=int, default=40_000, help="characters per whole-process CLI run")
    parser.add_argument("--cli-repeats", type=int, default=3)
    parser.add_argument("--training-steps", type=int, default=20, help="steps per epoch for row 7 (0 = skip)")
    args = parser.parse_args()

    import charrnn_runtime
    from charrnn_runtime.providers import cuda_unavailable_reason

    bundle = Path(args.model)
    keras_file = bundle / "training" / "model.keras"
    rows = []

    def add(name, value, unit="chars/s", streams=1):
        rows.append({"name": name, "value": value, "unit": unit, "streams": streams})
        print(f"  {name}: {value:,.5g} {unit}", file=sys.stderr, flush=True)

    cpu = {variant: charrnn_runtime.load(bundle, provider="cpu", variant=variant) for variant in ("fp32", "int8")}
    stepped = {variant: charrnn_runtime.load(bundle, provider="cpu", variant=variant, sampling_loop=False)
               for variant, model in cpu.items() if model.loop_session is not None}  # the same, one run per char
    vocab = cpu["fp32"].vocab
    add("(1) report loop: stateful Keras model + tf.random.categorical",
        report_loop(keras_file, vocab, args.reference_chars, args.repeats))
    add("(2) tf.function step + tf.random.categorical",
        tf_function_loop(keras_file, vocab, args.chars // 2, args.repeats))
    one_stream = {}  # the rows of (3), measured in turns so that fp32 and int8 meet the same machine
    for variant, model in cpu.items():
        one_stream[f"(3) runtime cpu {variant}, 1 stream"] = model
        one_stream[f"(3) runtime cpu {variant}, 1 stream, 1 onnxruntime thread"] = \
            charrnn_runtime.load(bundle, provider="cpu", variant=variant, threads=1)
        if variant in stepped:
            one_stream[f"(3) runtime cpu {variant}, 1 stream, sampling_loop=False"] = stepped[variant]
    for name, rate in runtime_rates(one_stream, 1, args.chars, args.repeats).items():
        add(name, rate)
    batched = {streams: runtime_rates(cpu, streams, max(50, args.chars // streams * 4), args.repeats)
               for streams in (16, 64, 256)}
    for variant in cpu:
        for streams, rates in batched.items():
            add(f"(4) runtime cpu {variant}, {streams} streams", rates[variant], streams=streams)

    cuda_reason = cuda_unavailable_reason()
    if cuda_reason is None:
        try:
            gpu = charrnn_runtime.load(bundle, provider="cuda")
        except charrnn_runtime.CharrnnError as e:
            cuda_reason = str(e)
        else:
            add("(5) runtime cuda fp32, 1 stream", runtime_rate(gpu, 1, args.chars, args.repeats))
            for streams in (64, 1024, 4096):
                add(f"(5) runtime cuda fp32, {streams} streams", runtime_rate(gpu, streams, 200, args.repeats),
                    streams=streams)
    if cuda_reason:
        print(f"  (5) cuda skipped: {cuda_reason}", file=sys.stderr)

    add("(6) cold start: charrnn-run --length 1", process_seconds(bundle, args.repeats, "--length", "1"), unit="s")
    for variant, model in cpu.items():
        add(f"(8) charrnn-run {variant}, whole process, {args.cli_chars:,} chars to a file",
            cli_rate(bundle, variant, args.cli_chars, args.cli_repeats))
        add(f"(8) in-process model.generate {variant}, {args.cli_chars:,} chars",
            median_rate(lambda: model.generate(PRIME, args.cli_chars, seed=1), args.cli_chars, args.cli_repeats))
        if variant in stepped:
            add(f"(8) in-process model.generate {variant}, {args.cli_chars:,} chars, sampling_loop=False",
                median_rate(lambda: stepped[variant].generate(PRIME, args.cli_chars, seed=1), args.cli_chars,
                            args.cli_repeats))
    if args.training_steps:
        ours, plain = training_step_seconds(ROOT / "train" / "data" / "tinyshakespeare.txt", args.training_steps)
        add("(7) training: charrnn-train", ours, unit="s/step")
        add("(7) training: plain model.fit", plain, unit="s/step")

    report, step_loop = rows[0]["value"], rows[1]["value"]
    machine = describe_machine()
    lines = [f"machine: {machine}; onnxruntime {charrnn_runtime.model.ort.__version__}; "
             f"medians of {args.repeats}", "",
             "| measurement | value | × report loop | × tf.function loop |", "|---|---:|---:|---:|"]
    for row in rows:
        ratio = (f"{row['value'] / report:,.1f}×", f"{row['value'] / step_loop:,.1f}×") \
            if row["unit"] == "chars/s" else ("", "")
        value = f"{row['value']:,.0f}" if row["unit"] == "chars/s" else f"{row['value']:.3f}"
        lines.append(f"| {row['name']} | {value} {row['unit']} | {ratio[0]} | {ratio[1]} |")
    print("\n".join(lines))
    Path(args.json).write_text(json.dumps({"machine": machine, "repeats": args.repeats, "rows": rows,
                                           "cuda_skipped": cuda_reason}, indent=2) + "\n")


if __name__ == "__main__":
    main()
