"""What every charrnn command shares, and only commands import: click's face of CharrnnError
(exit code 2, one line), the optional-extra hint, and a quiet TensorFlow import."""

import contextlib
import logging
import os
import sys

import click

from .errors import CharrnnError
from .install import pip_install


class BadInput(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"Error: {self.format_message()}", err=True, file=file)


class Command(click.Command):
    """A click command whose usage errors are one line (no usage dump), exit code 2."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            raise BadInput(e.format_message()) from None


@contextlib.contextmanager
def cli_errors():
    """Turn the errors a user can fix into one readable line and exit code 2."""
    try:
        yield
    except BrokenPipeError:  # the reader went away (`charrnn-run | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (CharrnnError, OSError) as e:
        raise BadInput(str(e)) from None


def require_extra(extra, command):
    """Import guard for optional dependencies: say which install fixes it."""
    raise BadInput(f"{command} needs the [{extra}] extra: {pip_install(extra)}")


def require_onnxruntime(command, error):
    """Import guard for the runtime's onnxruntime, which [cpu] or [gpu] brings. Any other ImportError
    is a bug, not a missing install, and is raised as it is."""
    if not (error.name or "").startswith("onnxruntime"):
        raise error
    raise BadInput(f"{command} needs onnxruntime: {pip_install('cpu')} (or [gpu] for CUDA)") from None


@contextlib.contextmanager
def quiet_tensorflow(verbose=False):
    """Import TensorFlow inside this: unless verbose, none of its INFO/WARNING lines are printed.

    TF_CPP_MIN_LOG_LEVEL quiets its C++ logging and logger levels its Python logging (tensorflow,
    absl, tf2onnx), but the lines its libraries print while loading, before absl::InitializeLog,
    ignore both: stderr points at /dev/null during the import.
    """
    if verbose:
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("tensorflow", "absl", "tf2onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    sys.stderr.flush()
    stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(stderr, 2)
        os.close(stderr)
