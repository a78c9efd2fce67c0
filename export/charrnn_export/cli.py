"""charrnn-export: turn a trained run into a validated model bundle (SavedModel + ONNX + int8 ONNX)."""

import math
import os
from pathlib import Path

import click

from charrnn_runtime import __version__
from charrnn_runtime.command import BadInput, Command, cli_errors, quiet_tensorflow, require_extra

from .checks import check_out, find_source

HELP = """Turn a trained run into a validated model bundle (SavedModel + ONNX + int8 ONNX).

SOURCE is a run directory from charrnn-train, or a .keras file with a vocab.json beside it.
OUT defaults to SOURCE/bundle for a run (SOURCE.bundle for a file).

With --upgrade, SOURCE is an existing bundle whose int8 variant, sampling loop and prefill graphs
are derived again from its fp32 ONNX model and validated, in place (no TensorFlow needed)."""
EPILOG = ("Every export is validated: held-out text is teacher-forced through the Keras model and stepped "
          "through the SavedModel, the ONNX model (onnxruntime) and onnx's reference evaluator; any logit "
          "or bits/char difference over the tolerance fails the export and nothing is written.")


@click.command(cls=Command, help=HELP, epilog=EPILOG)
@click.version_option(__version__, prog_name="charrnn-export")
@click.argument("source", type=click.Path())
@click.argument("out", type=click.Path(), required=False)
@click.option("--force", is_flag=True, help="Replace OUT if it is an existing bundle (atomically).")
@click.option("--vocab", "vocab_file", type=click.Path(dir_okay=False), default=None,
              help="vocab.json for a bare .keras SOURCE.  [default: vocab.json beside it]")
@click.option("--validation-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="UTF-8 text to validate on.  [default: the run's held-out split, else its corpus' tail]")
@click.option("--tolerance", type=float, default=1e-4, show_default=True,
              help="Max abs difference allowed for every logit and for bits/char.")
@click.option("--runtime-only", is_flag=True,
              help="Leave the SavedModel and the Keras model out of OUT (both are still validated): "
                   "the ONNX variants, manifest and training history only, for shipping.")
@click.option("--upgrade", "--requantize", "upgrade", is_flag=True,
              help="SOURCE is a bundle: replace its int8 model, sampling loop and prefill graphs with ones made "
                   "from its fp32 model.onnx by this charrnn (validated; the rest of the bundle is kept). "
                   "--requantize: its old name.")
@click.option("--verbose", is_flag=True, help="Show TensorFlow's and tf2onnx's own log lines.")
def main(source, out, force, vocab_file, validation_text, tolerance, runtime_only, upgrade, verbose):
    with cli_errors():  # bad arguments are reported before TensorFlow is imported (seconds)
        if not (tolerance > 0 and math.isfinite(tolerance)):
            raise BadInput(f"--tolerance must be a positive number, got {tolerance}")
        if upgrade:
            return _upgrade(source, out, validation_text, tolerance)
        find_source(source, vocab_file)
        out = out or (Path(source) / "bundle" if Path(source).is_dir() else Path(source).with_suffix(".bundle"))
        check_out(out, force)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a GPU-traced GRU emits CudnnRNN ops tf2onnx cannot convert
    try:
        with quiet_tensorflow(verbose):
            from .export import Source, export
    except ImportError:
        require_extra("train", "charrnn-export")
    with cli_errors():
        export(Source(source, vocab_file), out, force=force, validation_text=validation_text,
               tolerance=tolerance, runtime_only=runtime_only, log=lambda line: click.echo(line, err=True))
    click.echo(str(out))


def _upgrade(bundle, out, validation_text, tolerance):
    if out is not None:
        raise BadInput("--upgrade rewrites the bundle SOURCE in place: give no OUT")
    try:
        from .derive import upgrade
    except ImportError:
        require_extra("train", "charrnn-export")
    upgrade(bundle, validation_text, tolerance, log=lambda line: click.echo(line, err=True))
    click.echo(str(bundle))
