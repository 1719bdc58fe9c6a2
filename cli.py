"""The ``tca`` command line: click commands that turn flags into configs and call one function.

Results go to stdout; logs and progress bars go to stderr. A ``TcaError`` (bad input the
user can fix) becomes one sentence and exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import sys

import click

from tca import TcaError, __version__

log = logging.getLogger("tca")


class _Group(click.Group):
    """Turns every failure below it into one sentence on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # the one place that decides how failures look
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {_sentence(exc)}", err=True)
            ctx.exit(2 if isinstance(exc, (TcaError, KeyboardInterrupt)) else 1)


def _sentence(exc: BaseException) -> str:
    if isinstance(exc, TcaError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "the disk is full; free space and run the command again with --resume."
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}."
    return f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tca")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug logs).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: int, quiet: bool) -> None:
    """tca: activation caches for model diffing with transcoder adapters.

    \b
    The pipeline, one command per stage:
      harvest   paired MLP activations of a base and a fine-tuned model -> Zarr store
      train     sparse transcoder adapters offline from the store
      index     every feature activation into DuckDB; then `tca sql`, `tca top`
      eval      splice adapters into the model and measure what they recover
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s", force=True)


def emit(data: dict, as_json: bool, render) -> None:
    """Print a command's result: JSON on request, else the command's own rendering."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)


if __name__ == "__main__":
    main()
