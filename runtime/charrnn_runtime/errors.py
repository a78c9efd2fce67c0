"""Errors users can fix, and how every charrnn CLI reports them: exit code 2, one line."""

import contextlib
import os
import sys

import click


class CharrnnError(ValueError):
    """Bad input or an unusable model/environment; the message says what to fix."""


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
    raise BadInput(f"{command} needs the [{extra}] extra: pip install 'charrnn[{extra}]'")
