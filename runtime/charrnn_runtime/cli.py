"""charrnn-run: generate text from a charrnn model with onnxruntime."""

import json
import sys
import time

import click

from . import __version__
from .bundle import MODEL_ENV
from .command import Command, cli_errors, require_onnxruntime
from .params import MAX_SEED, SamplingParams

EPILOG = ("The prompt is printed, then the generated text streams after it. An empty prompt starts from "
          "the zero state with a uniformly drawn first character. Without --seed a random seed is chosen "
          "and reported (stderr, or --json), so every run can be repeated.")


@click.command(cls=Command, help="Generate text from a charrnn model with onnxruntime (numpy + onnxruntime only).",
               epilog=EPILOG)
@click.version_option(__version__, prog_name="charrnn-run")
@click.option("--model", "model_path", type=click.Path(), default=None,
              help=f"Bundle directory or model.onnx.  [default: ${MODEL_ENV}, else the packaged Shakespeare model]")
@click.option("--prompt", "--prime", "prompt", default="ROMEO: ", show_default=True,
              help="Text to start from (--prime: its old name).")
@click.option("--length", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Characters to generate (fewer if a stop string comes first).")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Softmax temperature; 0 = greedy (always the most likely character).")
@click.option("--top-k", type=int, default=None, help="Sample only from the k most likely characters.  [default: off]")
@click.option("--top-p", type=float, default=None,
              help="Sample only from the most likely characters holding this much probability.  [default: off]")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None,
              help="Random seed; sample i uses seed + i.  [default: random]")
@click.option("--num-samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Independent samples, generated together in one batched loop.")
@click.option("--stop", multiple=True, help="Stop a sample after this string (kept in the output). Repeatable.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="onnxruntime provider: cuda fails if CUDA cannot be used; auto falls back to cpu.")
@click.option("--variant", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="Model weights: fp32, or int8 (faster on CPU, slightly less accurate).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with texts, settings, seeds, "
              "model sha256, provider used and chars/s instead of streaming text.")
def main(model_path, prompt, length, temperature, top_k, top_p, seed, num_samples, stop, provider, variant,
         as_json):
    try:
        from .model import load
    except ImportError as e:
        require_onnxruntime("charrnn-run", e)
    with cli_errors():
        params = SamplingParams(temperature, top_k, top_p, seed, stop, length)
        model = load(model_path, provider=provider, variant=variant)
        if model.cpu_reason:
            click.echo(f"note: running on CPU: {model.cpu_reason}", err=True)
        started = time.perf_counter()
        generator = model.generator(prompt, num_samples=num_samples, params=params)
        seeds = [params.row(i).seed for i in range(num_samples)]
        if as_json or num_samples > 1:
            texts = generator.run()
        else:
            texts = [stream_to_stdout(prompt, generator.stream())]
        seconds = time.perf_counter() - started
    chars = sum(len(t) for t in texts)
    speed = chars / seconds if seconds > 0 else float("inf")
    if as_json:
        click.echo(json.dumps({
            "model": str(model.path), "sha256": model.sha256, "variant": model.variant,
            "provider": model.provider,
            "settings": {"prompt": prompt, "length": length, "temperature": temperature, "top_k": top_k,
                         "top_p": top_p, "stop": list(stop), "num_samples": num_samples},
            "samples": [{"seed": s, "text": t} for s, t in zip(seeds, texts)],
            "chars_per_second": speed, "seconds": seconds,
        }, ensure_ascii=False, indent=2))
        return
    if num_samples > 1:
        for i, (s, text) in enumerate(zip(seeds, texts)):
            click.echo(f"{'' if i == 0 else chr(10)}=== sample {i + 1}/{num_samples} (seed {s}) ===")
            click.echo(prompt + text)
    click.echo(f"[{chars} chars in {seconds:.2f} s, {speed:,.0f} chars/s on {model.provider} ({model.variant}), "
               f"seed {seeds[0]}]", err=True)


TERMINAL_FLUSH_SECONDS = 0.03


def stream_to_stdout(prompt, chars):
    """Print the prompt, then each character as it comes; return the generated text.

    A terminal is flushed at most every TERMINAL_FLUSH_SECONDS (text appears as it is made); a file
    or pipe gets Python's buffered writes and one flush at the end, so the CLI keeps the API's speed.
    """
    out = sys.stdout
    out.write(prompt)
    text = []
    if out.isatty():
        last_flush = time.monotonic()
        for char in chars:
            out.write(char)
            text.append(char)
            now = time.monotonic()
            if now - last_flush >= TERMINAL_FLUSH_SECONDS:
                out.flush()
                last_flush = now
    else:
        for char in chars:
            out.write(char)
            text.append(char)
    out.write("\n")
    out.flush()
    return "".join(text)
