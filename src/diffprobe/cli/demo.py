"""``diffprobe demo``: the main job on the embedded default (what ``make demo`` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import Quiet, setup


def demo(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/demo"),
    quiet: Quiet = False,
) -> None:
    """The main job on the embedded `tiny` and the shapes world: models, sites, a capture, an
    image grid, an extraction grid, its alignment, anomalies and a Diffusion Lens grid."""
    setup(quiet)
    from diffprobe.stages.demo import run_demo

    run_demo(out, progress=not quiet)


def register(app: typer.Typer) -> None:
    app.command()(demo)
