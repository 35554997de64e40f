"""``diffprobe train-tiny-ddpm`` and ``train-tiny-clip``: the embedded models of h-space editing
(docs/tiny-ddpm.md, docs/tiny-clip.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import Quiet, setup

Minutes = Annotated[
    float | None, typer.Option(help="stop after this many minutes (checkpointed; resumable)")
]
Resume = Annotated[bool, typer.Option(help="continue from the latest checkpoint")]


def _check(out: Path, kind: str, device: str) -> None:
    """Refuse a bad --device or --out before any work."""
    from diffprobe.io import check_output
    from diffprobe.loading import parse_device

    parse_device(device)
    check_output(out, kind)


def train_tiny_ddpm_command(
    out: Annotated[Path, typer.Option(help="where checkpoints and the pipeline go")] = Path(
        "runs/tiny-ddpm-train"
    ),
    seed: int = 0,
    device: str = "cpu",
    resume: Resume = True,
    minutes: Minutes = None,
    steps: Annotated[
        int | None, typer.Option(help="training steps (default: the recipe's)")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch (default: the recipe's)")] = None,
    quiet: Quiet = False,
) -> None:
    """Train diffprobe's `tiny-ddpm` pixel DDPM on the shapes world (fixed seed, resumable)."""
    setup(quiet)
    from diffprobe.train.ddpm import DDPM_KIND, train_tiny_ddpm

    _check(out, DDPM_KIND, device)
    train_tiny_ddpm(out, seed=seed, device=device, resume=resume, progress=not quiet,
                    minutes=minutes, steps=steps, batch_size=batch_size, threads=None)  # fmt: skip


def train_tiny_clip_command(
    out: Annotated[Path, typer.Option(help="where checkpoints and the model go")] = Path(
        "runs/tiny-clip-train"
    ),
    seed: int = 0,
    device: str = "cpu",
    resume: Resume = True,
    minutes: Minutes = None,
    quiet: Quiet = False,
) -> None:
    """Train diffprobe's `tiny-clip` CLIPModel on shapes images and captions (fixed seed)."""
    setup(quiet)
    from diffprobe.train.clip import CLIP_KIND, train_tiny_clip

    _check(out, CLIP_KIND, device)
    train_tiny_clip(out, seed=seed, device=device, resume=resume, progress=not quiet,
                    minutes=minutes)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("train-tiny-ddpm")(train_tiny_ddpm_command)
    app.command("train-tiny-clip")(train_tiny_clip_command)
