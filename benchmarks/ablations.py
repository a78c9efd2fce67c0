"""The ablation table of training round 2 (README): runs of one recipe, each with one setting changed.

    python benchmarks/ablations.py benchmarks/round2/shakespeare-gru2x512-awd benchmarks/round2/*-no-*

The first run is the recipe; every other run is named by what its config changes from it. Figures
per run: validation loss at its last epoch with the weights it exports (the EMA, where it averages)
and with its trained weights not averaged (`trained_val_loss` in history.json, or
checkpoint_loss.json from `benchmarks/checkpoint_loss.py` for runs made before history recorded it);
the change against the recipe at the same epoch (same budget: a run still training is compared
with the recipe where it stands); quality.py's held-out losses once the run is exported and scored
(`make ablation-<name>` writes quality.json); and its training minutes. The weights not averaged are
exactly those of the same run without averaging (the average only watches the training), so that
ablation needs no run of its own.
"""

import argparse
import json
from pathlib import Path

IGNORED = {"corpus", "epochs"}  # where the corpus lay on the machine that trained; the schedule's length


def load(path):
    path = Path(path)
    record = {"name": path.name, "config": json.loads((path / "config.json").read_text())["config"],
              "history": json.loads((path / "history.json").read_text())}
    for extra in ("quality", "checkpoint_loss"):
        if (path / f"{extra}.json").exists():
            record[extra] = json.loads((path / f"{extra}.json").read_text())
    return record


def changes(config, recipe):
    return ", ".join(f"{key} {config[key]}" for key in config if key not in IGNORED and config[key] != recipe.get(key)) \
        or "none (another run)"


def not_averaged(run):
    last = run["history"][-1]
    if "trained_val_loss" in last:
        return last["trained_val_loss"]
    checkpoint = run.get("checkpoint_loss")
    return checkpoint["trained_val_loss"] if checkpoint and checkpoint["epoch"] == last["epoch"] else None


def held_out(run):
    """quality.py's (windows of 256, full context) for the run's own bundle, if it was scored."""
    results = run.get("quality", {}).get("results", [])
    return next(((r["windowed_loss"], r["full_context_loss"]) for r in results
                 if Path(r["bundle"]).parent.name == run["name"]), None)


def table(runs):
    recipe = runs[0]
    lines = ["| run | changed from the recipe | epochs | val loss | vs the recipe | val loss, not averaged "
             "| held-out, windows of 256 | full context | training min |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        history, planned = run["history"], run["config"]["epochs"]
        epoch, val = history[-1]["epoch"], history[-1]["val_loss"]
        same_epoch = next((r["val_loss"] for r in recipe["history"] if r["epoch"] == epoch), None)
        delta = "" if run is recipe or same_epoch is None else f"{val - same_epoch:+.4f}"
        raw, scored = not_averaged(run), held_out(run)
        lines.append(" | ".join([
            f"| {run['name']}", "the recipe" if run is recipe else changes(run["config"], recipe["config"]),
            f"{epoch}/{planned}", f"{val:.4f}", delta, "" if raw is None else f"{raw:.4f}",
            *(("", "") if scored is None else (f"{scored[0]:.4f}", f"{scored[1]:.4f}")),
            f"{sum(r['seconds'] for r in history) / 60:.0f} |"]))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="the recipe's records, then its ablations' (run directories)")
    print(table([load(path) for path in parser.parse_args().runs]))


if __name__ == "__main__":
    main()
