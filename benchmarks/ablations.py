"""The ablation table of training round 2 (README): runs of one recipe, each with one setting changed.

    python benchmarks/ablations.py benchmarks/round2/shakespeare-gru2x512-awd benchmarks/round2/*-no-*

The first run is the recipe; every other run is named by what its config changes from it (its
length in epochs included: the cosine schedule spans the run, so fewer epochs anneal sooner).
Figures per run: the validation loss of what it exports (its best epoch; the EMA weights, where it
averages); the best validation loss of its trained weights not averaged
(`trained_val_loss` in history.json, or checkpoint_loss.json from `benchmarks/checkpoint_loss.py` for
runs made before history recorded it), which is what the same run without averaging would have
exported, since the average only watches the training (so that ablation needs no run of its own);
the change against what the recipe exports (a run still training: against the recipe at the same
epoch); quality.py's held-out losses once the run is exported and scored (`make ablation-<name>`
writes quality.json); and its training minutes.
"""

import argparse
import dataclasses
import json
from pathlib import Path

from charrnn_train.config import Run

IGNORED = {"corpus"}  # where the corpus lay on the machine that trained


def load(path):
    """The run's records (charrnn_train's Run: config, history, when it stopped) as a dict, with
    quality.json and checkpoint_loss.json where present."""
    run = Run.open(path)
    record = {"name": run.path.name, "config": {**dataclasses.asdict(run.config), "keras_backend": run.keras_backend},
              "history": run.history,
              "best": run.history[run.best_epoch - 1], "finished": run.finished, "stopped_early": run.stopped_early}
    for extra in ("quality", "checkpoint_loss"):
        if (run.path / f"{extra}.json").exists():
            record[extra] = json.loads((run.path / f"{extra}.json").read_text())
    return record


AVERAGE_SETTINGS = {"average_start", "ema_decay"}  # moot in a run without an average


def changes(config, recipe):
    """What a run's config (with the Keras backend that trained it: same maths, other random streams)
    changes from the recipe's."""
    moot = IGNORED | (AVERAGE_SETTINGS if config.get("average") == "none" else set())
    return ", ".join(f"{key} {config[key]}" for key in config if key not in moot and config[key] != recipe.get(key)) \
        or "none (another run)"


def not_averaged(run):
    """(loss, epoch) of the run's best trained weights not averaged: what a run without averaging exports."""
    recorded = [(r["trained_val_loss"], r["epoch"]) for r in run["history"] if "trained_val_loss" in r]
    checkpoint = run.get("checkpoint_loss")
    if checkpoint:
        recorded.append((checkpoint["trained_val_loss"], checkpoint["epoch"]))
    return min(recorded, default=None)


def held_out(run):
    """quality.py's (windows of 256, full context) for the run's own bundle, if it was scored."""
    results = run.get("quality", {}).get("results", [])
    return next(((r["windowed_loss"], r["full_context_loss"]) for r in results
                 if Path(r["bundle"]).parent.name == run["name"]), None)


def progress(run):
    done, planned = len(run["history"]), run["config"]["epochs"]
    if done == planned:
        return f"{done}"
    return f"{done} of {planned}, " + ("stopped early" if run["stopped_early"] else "training")


def table(runs):
    recipe = runs[0]
    lines = ["| run | changed from the recipe | epochs | val loss (epoch) | vs the recipe | not averaged (epoch) "
             "| held-out, windows of 256 | full context | training min |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        record = run["best"]
        if run is recipe:
            delta = ""
        elif run["finished"]:  # what it exports against what the recipe exports
            delta = f"{record['val_loss'] - recipe['best']['val_loss']:+.4f}"
        else:  # still training: against the recipe at the same epoch
            last = run["history"][-1]
            at = next(r for r in recipe["history"] if r["epoch"] == last["epoch"])
            delta = f"{last['val_loss'] - at['val_loss']:+.4f} at epoch {last['epoch']}"
        raw, scored = not_averaged(run), held_out(run)
        lines.append(" | ".join([
            f"| {run['name']}", "the recipe" if run is recipe else changes(run["config"], recipe["config"]),
            progress(run), f"{record['val_loss']:.4f} ({record['epoch']})", delta,
            "" if raw is None else f"{raw[0]:.4f} ({raw[1]})",
            *(("", "") if scored is None else (f"{scored[0]:.4f}", f"{scored[1]:.4f}")),
            f"{sum(r['seconds'] for r in run['history']) / 60:.0f} |"]))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="the recipe's records, then its ablations' (run directories)")
    print(table([load(path) for path in parser.parse_args().runs]))


if __name__ == "__main__":
    main()
