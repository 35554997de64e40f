"""``diffprobe train-tiny``: train the embedded models from scratch (docs/tiny.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import Quiet, setup


def train_tiny_command(
    out: Annotated[Path, typer.Option(help="where checkpoints and the pipeline go")] = Path(
        "runs/tiny-train"
    ),
    seed: int = 0,
    device: str = "cpu",
    resume: Annotated[bool, typer.Option(help="continue from the latest checkpoint")] = True,
    quiet: Quiet = False,
) -> None:
    """Train diffprobe's `tiny` Stable Diffusion on the shapes world (fixed seed, resumable)."""
    setup(quiet)
    from diffprobe.io import check_output
    from diffprobe.loading import parse_device
    from diffprobe.train.tiny import TRAIN_KIND, train_tiny

    parse_device(device)
    check_output(out, TRAIN_KIND)

    train_tiny(out, seed=seed, device=device, resume=resume, progress=not quiet)


def register(app: typer.Typer) -> None:
    app.command("train-tiny")(train_tiny_command)
