"""charrnn-train: train the report's character GRU on any UTF-8 text."""

import sys
import time

import click

from charrnn_runtime import __version__
from charrnn_runtime.errors import Command, cli_errors, quiet_tensorflow, require_extra

from .config import Config, Run, check_new_run

HELP = """Train the report's character GRU on any UTF-8 text.

Defaults reproduce the report: Tiny Shakespeare, Embedding(256) → GRU(1024) → Dense, sequences of
100, shuffle buffer 10,000, batch 64 (172 steps per epoch), Adam, 10 epochs. Every epoch writes a
checkpoint; a killed run continues with --resume RUN_DIR."""


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
@click.option("--units", type=int, default=1024, show_default=True, help="GRU units.")
@click.option("--learning-rate", type=float, default=0.001, show_default=True, help="Adam learning rate.")
@click.option("--seed", type=int, default=42, show_default=True,
              help="Seeds weight init and the per-epoch shuffle.")
@click.option("--validation-fraction", type=float, default=0.0, show_default=True,
              help="Tail of the corpus held out; its loss and bits/char are reported each epoch.")
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
    except ImportError:
        require_extra("train", "charrnn-train")
    with cli_errors():
        if not resume:
            run = training.start(config, out)
        if len(run.history) >= run.config.epochs and run.model_file.exists():
            click.echo(f"run {run.path} is already complete ({run.config.epochs} epochs)", err=True)
        else:
            try:
                with training.StopOnInterrupt() as stop:
                    training.train(run, log=lambda line: click.echo(line, err=True), callbacks=[stop])
            except KeyboardInterrupt:
                click.echo(f"\ninterrupted after {len(run.history)} complete epochs; continue with: "
                           f"charrnn-train --resume {run.path}", err=True)
                sys.exit(130)
    click.echo(str(run.model_file))
