"""Held-out quality of model bundles on the last 10% of Tiny Shakespeare, beside nanoGPT's figures.

    python benchmarks/quality.py models/shakespeare-report-90 models/shakespeare-gru2x512

Each bundle is scored by the runtime (numpy + onnxruntime) two ways:
- windows of 256: the held-out text cut into 257-character windows, each scored from the zero
  state, so no prediction sees more than 256 characters: the protocol of nanoGPT's validation loss
  (block size 256), hence comparable with its published figures;
- full context: the whole held-out text stepped once, the state carried through (what an RNN
  gives when it streams).
It also reports what training measured on the same split (its best epoch's validation loss, on
chunks of its own sequence length), the training time, and what the int8 variant costs in windows of
256 against fp32 (on stderr). Writes benchmarks/quality.json.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import charrnn_runtime
from charrnn_train.data import DEFAULT_CORPUS, held_out_start, read_corpus

VALIDATION_FRACTION = 0.1  # nanoGPT's shakespeare_char split: the first 90% trains, the last 10% validates
NANOGPT = [  # published in karpathy/nanoGPT's README (shakespeare_char), not rerun here
    ("nanoGPT baby GPT, 10.7M params, block 256, on an A100 (published)", 1.4697),
    ("nanoGPT CPU config, 0.8M params, block 64, 2,000 iterations (published)", 1.88),
]
WINDOW = 256


def evaluate(bundle, text):
    model = charrnn_runtime.load(bundle, provider="cpu")
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    training = manifest.get("training") or {}
    history = json.loads((Path(bundle) / "training" / "history.json").read_text())
    validated = [r for r in history if "val_loss" in r]
    return {
        "bundle": str(bundle),
        "parameters": manifest.get("parameters"),
        "network": manifest.get("network", {"layers": [{"cell": "gru", "units": manifest.get("units")}]}),
        "config": training.get("config"),
        "windowed_loss": model.score(text, window=WINDOW)["loss"],
        "int8_windowed_loss": charrnn_runtime.load(bundle, provider="cpu", variant="int8").score(
            text, window=WINDOW)["loss"],
        "full_context_loss": model.score(text)["loss"],
        "training_best_val_loss": min((r["val_loss"] for r in validated), default=None),
        "epochs": len(history),
        "training_seconds": sum(r["seconds"] for r in history),
    }


def describe(result):
    layers = result["network"]["layers"]
    shape = f"{len(layers)}×{layers[0]['cell'].upper()}({layers[0]['units']})"
    return f"{Path(result['bundle']).name}: {shape}, {result['epochs']} epochs"


def table(results):
    lines = ["| model | held-out loss, windows of 256 (nats) | bits/char | full context (nats) | "
             "training's val loss | training time |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        val = r["training_best_val_loss"]
        lines.append(f"| {describe(r)} | {r['windowed_loss']:.4f} | {r['windowed_loss'] / math.log(2):.3f} | "
                     f"{r['full_context_loss']:.4f} | {'' if val is None else f'{val:.4f}'} | "
                     f"{r['training_seconds'] / 60:.0f} min |")
    for name, loss in NANOGPT:
        lines.append(f"| {name} | {loss:.4f} | {loss / math.log(2):.3f} |  |  |  |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--out", default=Path(__file__).with_name("quality.json"))
    args = parser.parse_args()
    text = read_corpus(DEFAULT_CORPUS)
    held_out = text[held_out_start(len(text), VALIDATION_FRACTION):]
    print(f"held-out text: the last {len(held_out):,} characters of {DEFAULT_CORPUS.name}", file=sys.stderr)
    results = [evaluate(bundle, held_out) for bundle in args.bundles]
    for r in results:
        cost = (r["int8_windowed_loss"] - r["windowed_loss"]) / math.log(2)
        print(f"{describe(r)}: int8 {r['int8_windowed_loss']:.4f} nats in windows of {WINDOW}, "
              f"{cost:+.4f} bits/char against fp32", file=sys.stderr)
    print(table(results))
    Path(args.out).write_text(json.dumps({"held_out_chars": len(held_out), "window": WINDOW,
                                          "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
