"""Training curves of several runs side by side: a plot and a Markdown table (README: training round 2).

    python benchmarks/curves.py models/shakespeare-gru2x512/training runs/shakespeare-gru2x512-awd \
        --out docs/training-round2.png

Each argument is a run directory or a bundle's `training/` folder (a history.json inside), named by
its directory (a bundle's by the bundle). The plot has each run's validation loss (solid), training
loss (dotted) and, where the run averages its weights, the validation loss of the weights not
averaged (dashed). The table has the same figures and each epoch's seconds.
"""

import argparse
import json
from pathlib import Path


def load(path):
    path = Path(path)
    name = path.parent.name if path.name == "training" else path.name
    return name, json.loads((path / "history.json").read_text())


def table(runs):
    epochs = max(len(history) for _, history in runs)
    header = ["epoch"]
    for name, history in runs:
        header += [f"{name} loss", f"{name} val loss"]
        if any("trained_val_loss" in r for r in history):
            header.append(f"{name} val loss, not averaged")
        header.append(f"{name} s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for epoch in range(1, epochs + 1):
        cells = [str(epoch)]
        for _, history in runs:
            r = history[epoch - 1] if epoch <= len(history) else {}
            cells += [f"{r['loss']:.4f}" if r else "", f"{r['val_loss']:.4f}" if "val_loss" in r else ""]
            if any("trained_val_loss" in x for x in history):
                cells.append(f"{r['trained_val_loss']:.4f}" if "trained_val_loss" in r else "")
            cells.append(f"{r['seconds']:.0f}" if r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(10, 4.5))
    tab20 = plt.get_cmap("tab20").colors
    colors = tab20[0::2] + tab20[1::2]  # the ten strong colours, then their light shades (and square markers)
    for i, (name, history) in enumerate(runs):
        color, marker = colors[i % 20], "os"[i // 10 % 2]
        epochs = [r["epoch"] for r in history]
        ax.plot(epochs, [r["val_loss"] for r in history], color=color, marker=marker, markersize=3, label=name)
        ax.plot(epochs, [r["loss"] for r in history], color=color, linestyle=":")
        trained = [(r["epoch"], r["trained_val_loss"]) for r in history if "trained_val_loss" in r]
        if trained:
            ax.plot(*zip(*trained), color=color, linestyle="--")
    ax.set_ylim(1.1, 1.7)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.grid(alpha=0.3)
    runs_legend = ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="run", title_fontsize=8)
    ax.add_artist(runs_legend)  # one entry per run (colour), a second legend for what each line style is
    styles = [Line2D([], [], color="grey", marker="o", markersize=3, label="validation"),
              Line2D([], [], color="grey", linestyle=":", label="training (dropout on)"),
              Line2D([], [], color="grey", linestyle="--", label="validation, not averaged")]
    ax.legend(handles=styles, fontsize=8, loc="lower left", bbox_to_anchor=(1.01, 0))
    fig.subplots_adjust(left=0.08, right=0.66, bottom=0.11, top=0.97)  # the legends sit right of the axes
    # long run names widen the figure rather than lose their ends
    fig.savefig(out, dpi=100, bbox_inches="tight", bbox_extra_artists=[runs_legend])
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories or bundles' training/ folders")
    parser.add_argument("--out", help="the plot (PNG); none without it")
    args = parser.parse_args()
    runs = [load(path) for path in args.runs]
    if args.out:
        plot(runs, args.out)
    print(table(runs))


if __name__ == "__main__":
    main()
