"""What every command shares: the option types, logging to stderr, list options."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="compile the denoiser's and VAE's repeated blocks (torch.compile; pays on a GPU, "
        "the first batch waits for the compiler; values differ from eager by rounding only)",
    ),
]


class _CurrentStderr(logging.StreamHandler):
    """A log handler that writes to whatever ``sys.stderr`` is at the time of the message
    (notebooks and test runners swap it; a handler holding the old stream would write to a
    closed file)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup(quiet: bool) -> None:
    """Logs (INFO, or WARNING with ``quiet``) to stderr; ``quiet`` also turns progress bars off
    (``TQDM_DISABLE``)."""
    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"


def names(entries: list[str] | None) -> list[str] | None:
    """Repeated and comma / space separated values as one list (None when none given)."""
    if not entries:
        return None
    return [v for entry in entries for v in entry.replace(",", " ").split() if v]
