"""charrnn-train: train the report's character GRU on any UTF-8 text."""

import os
import sys
import time

import click

from charrnn_runtime import __version__
from charrnn_runtime.command import BadInput, Command, cli_errors, quiet_tensorflow, require_extra

from .config import Config, Run, check_new_run

HELP = """Train a character-level GRU or LSTM network on any UTF-8 text.

Defaults reproduce the report: Tiny Shakespeare, Embedding(256) → GRU(1024) → Dense, sequences of
100, shuffle buffer 10,000, batch 64 (172 steps per epoch), Adam, 10 epochs. Every epoch writes a
checkpoint; a killed run continues with --resume RUN_DIR. With --validation-fraction the run's
model is the epoch with the best validation loss. KERAS_BACKEND=jax (the [jax] extra) trains under
JAX, whose compiled step was about twice as fast on a 2-core CPU (benchmarks/train_speed.py)."""


@click.command(cls=Command, help=HELP)
@click.version_option(__version__, prog_name="charrnn-train")
@click.option("--corpus", type=click.Path(dir_okay=False), default=None,
              help="UTF-8 text file to train on.  [default: the bundled tinyshakespeare.txt]")
@click.option("--epochs", type=int, default=10, show_default=True, help="Passes over the training text.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Sequences per step.")
@click.option("--seq-length", type=int, default=100, show_default=True,
              help="Characters per training sequence.")
@click.option("--buffer-size", type=int, default=10_000, show_default=True, help="Shuffle buffer size.")
@click.option("--embedding-dim", type=int, default=256, show_default=True, help="Embedding size.")
@click.option("--units", type=int, default=1024, show_default=True, help="Units of each recurrent layer.")
@click.option("--layers", type=int, default=1, show_default=True, help="Stacked recurrent layers.")
@click.option("--cell", type=click.Choice(["gru", "lstm"]), default="gru", show_default=True,
              help="Recurrent layer type.")
@click.option("--dropout", type=float, default=0.0, show_default=True,
              help="Dropout on the inputs of every recurrent layer and of the output layer.")
@click.option("--learning-rate", type=float, default=0.001, show_default=True, help="Adam learning rate.")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True,
              help="cosine: decay from --learning-rate to --min-learning-rate over all epochs.")
@click.option("--min-learning-rate", type=float, default=0.0, show_default=True,
              help="Where the cosine schedule ends.")
@click.option("--clip-norm", type=float, default=None, help="Clip gradients to this global norm.  [default: off]")
@click.option("--locked-dropout/--no-locked-dropout", default=False, show_default=True,
              help="Draw each --dropout mask once per sequence, shared by all its steps (variational dropout).")
@click.option("--embedding-dropout", type=float, default=0.0, show_default=True,
              help="Drop whole characters from the embedding (one mask per batch).")
@click.option("--weight-drop", type=float, default=0.0, show_default=True,
              help="DropConnect on the recurrent kernels (one mask per batch); inference uses the full kernels.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True,
              help="Decoupled weight decay (AdamW); 0 = Adam.")
@click.option("--average", type=click.Choice(["none", "ema", "swa"]), default="none", show_default=True,
              help="Average the weights after every step (exponential or uniform): the average is validated, "
                   "saved and exported.")
@click.option("--average-start", type=int, default=1, show_default=True, metavar="EPOCH",
              help="The first epoch whose steps are averaged.")
@click.option("--ema-decay", type=float, default=0.999, show_default=True, help="EMA decay per step.")
@click.option("--seed", type=int, default=42, show_default=True,
              help="Seeds weight init and the per-epoch shuffle.")
@click.option("--validation-fraction", type=float, default=0.0, show_default=True,
              help="Tail of the corpus held out; its loss and bits/char are reported each epoch, and the "
                   "best epoch becomes the run's model.")
@click.option("--early-stopping", type=int, default=0, show_default=True, metavar="PATIENCE",
              help="Stop after this many epochs without a better validation loss; 0 = off.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Run directory to create.  [default: runs/charrnn-YYYYmmdd-HHMMSS]")
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue a stopped or killed run from its last completed epoch (other options are ignored).")
@click.option("--verbose", is_flag=True, help="Show TensorFlow's own log lines.")
def main(corpus, out, resume, verbose, **options):
    with cli_errors():  # bad arguments are reported before TensorFlow is imported (seconds)
        if resume:
            run = Run.open(resume)
        else:
            config = Config(**options)
            if corpus:
                config.corpus = corpus
            out = out or time.strftime("runs/charrnn-%Y%m%d-%H%M%S")
            check_new_run(config, out)
    try:
        with quiet_tensorflow(verbose):
            from . import train as training
    except ImportError as error:
        backend = os.environ.get("KERAS_BACKEND", "tensorflow")
        if backend == "jax" and error.name in ("jax", "jaxlib"):
            require_extra("jax", "charrnn-train under KERAS_BACKEND=jax")
        if backend != "tensorflow" and error.name == backend:
            raise BadInput(f"charrnn-train under KERAS_BACKEND={backend} needs {backend} installed") from None
        require_extra("train", "charrnn-train")
    with cli_errors():
        if not resume:
            run = training.start(config, out)
        if run.finished and run.model_file.exists():
            click.echo(f"run {run.path} is already complete ({len(run.history)} epochs)", err=True)
        else:
            try:
                with training.StopOnInterrupt() as stop:
                    training.train(run, log=lambda line: click.echo(line, err=True), callbacks=[stop])
            except KeyboardInterrupt:
                click.echo(f"\ninterrupted after {len(run.history)} complete epochs; continue with: "
                           f"charrnn-train --resume {run.path}", err=True)
                sys.exit(130)
    click.echo(str(run.model_file))
