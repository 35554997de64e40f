"""``diffprobe lens``: the Diffusion Lens, images from every intermediate text-encoder layer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise typer.BadParameter(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise typer.BadParameter(
            f"--seeds takes non-negative integers such as 0,1,2,3, got {text!r}"
        )
    return seeds


def lens_command(
    model: Annotated[str, typer.Option(help="alias, hub id or local diffusers folder")],
    prompt: Annotated[str, typer.Option(help="the prompt to lens")],
    layers: Annotated[str, typer.Option(help="'all' or layers such as 0,2,4 (-1 = last)")] = "all",
    seeds: Annotated[
        str, typer.Option(help="comma-separated seeds, one image per layer each")
    ] = "0",
    steps: Annotated[int, typer.Option(help="sampler steps")] = 25,
    guidance: Annotated[
        float | None, typer.Option(help="guidance scale (default: the family's)")
    ] = None,
    encoder: Annotated[
        str | None,
        typer.Option(help="text encoder to lens, e.g. text_encoder_2 (default: the family's)"),
    ] = None,
    pad: Annotated[
        str, typer.Option(help="padding tokens: keep (the lensed layer's) | full (the encoder's)")
    ] = "keep",
    norm: Annotated[
        str, typer.Option(help="pipeline (the pipeline's readout) | final (final LN everywhere)")
    ] = "pipeline",
    pooled: Annotated[
        str, typer.Option(help="pooled vector: full (full encoders) | lens (from the layer)")
    ] = "full",
    size: Annotated[int | None, typer.Option(help="image size (default: native)")] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per pipeline call")] = 8,
    dtype: str = "fp32",
    device: str = "cpu",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/lens"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.")] = False,
) -> None:
    """Generate an image from every layer of a text encoder (Toker et al.'s Diffusion Lens):
    one PNG per (layer, seed), grid.png with layer labels and lens.json in OUT (printed)."""
    from diffprobe.cli import _setup

    _setup(quiet)
    import diffprobe
    from diffprobe.lens import NORMS, PADDING, POOLED, lens

    for name, value, choices in (("--pad", pad, PADDING), ("--norm", norm, NORMS),
                                 ("--pooled", pooled, POOLED)):  # fmt: skip
        if value not in choices:
            raise typer.BadParameter(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    seed_list = _seeds(seeds)
    loaded = diffprobe.load(model, dtype=dtype, device=device)
    result = lens(
        loaded, prompt, layers=layers, seeds=seed_list, steps=steps, guidance_scale=guidance,
        encoder=encoder, padding=pad, norm=norm, pooled=pooled, size=size,
        batch_size=batch_size, progress=not quiet,
    )  # fmt: skip
    result.save(out)
    typer.echo(str(out))


def register(app: typer.Typer) -> None:
    app.command("lens")(lens_command)
