"""The ``diffprobe`` command line. Results go to stdout or files, logs and progress to stderr."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from diffprobe.errors import DiffprobeError

app = typer.Typer(
    name="diffprobe",
    help="Look inside diffusion models: representations, alignment, anomalies, lens, editing.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"diffprobe {version('diffprobe')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")
    ] = False,
) -> None:
    """Look inside diffusion models: representations, alignment, anomalies, lens, editing."""


# One module per group of commands, each with a ``register(app)`` function, in the order
# ``diffprobe --help`` lists them.
_COMMAND_MODULES = (
    "models", "extract", "align", "anomalies", "lens", "sae", "features", "steer", "dream",
    "attribution", "train", "train_extra", "hspace", "demo", "report", "run",
)  # fmt: skip


def _register_commands() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"diffprobe.cli.{name}").register(app)


_register_commands()


# Options that take several values after one flag (``--sites a b c``), as the issue tracker's
# and the papers' command lines write them; click options take one value, so these are joined.
_VARIADIC = ("--sites",)


def join_variadic(argv: list[str]) -> list[str]:
    """``[..., "--sites", "a", "b", "--noise", ...]`` -> ``[..., "--sites", "a b", ...]``."""
    out: list[str] = []
    position = 0
    while position < len(argv):
        token = argv[position]
        out.append(token)
        position += 1
        if token in _VARIADIC:
            values = []
            while position < len(argv) and not argv[position].startswith("-"):
                values.append(argv[position])
                position += 1
            if values:
                out.append(" ".join(values))
    return out


DEBUG_HINT = "rerun with --debug for the traceback"
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def main(argv: list[str] | None = None) -> None:
    """The console entry point: every expected failure is one line on stderr and exit code 2;
    an unexpected one is one line and a hint (``--debug`` anywhere shows the traceback);
    Ctrl-C says what was kept and exits 130."""
    import click

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("DIFFPROBE_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        # outside standalone mode typer returns the code of an exit (130 for Ctrl-C)
        code = app(args=join_variadic(args), prog_name="diffprobe", standalone_mode=False)
    except click.exceptions.Exit as done:
        code = done.exit_code
    except click.ClickException as err:
        err.show()
        raise SystemExit(err.exit_code) from None
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        code = INTERRUPTED
    except DiffprobeError as err:
        if debug:
            raise
        typer.echo(f"error: {_one_line(err)}", err=True)
        raise SystemExit(2) from None
    except Exception as err:
        if debug:
            raise
        typer.echo(f"error: unexpected {type(err).__name__}: {_one_line(err)}", err=True)
        typer.echo(DEBUG_HINT, err=True)
        raise SystemExit(1) from None
    if code == INTERRUPTED:
        typer.echo(
            "interrupted: finished work is kept (an extraction keeps its finished chunks); run "
            "the same command again to go on",
            err=True,
        )
    if isinstance(code, int) and code:
        raise SystemExit(code)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
