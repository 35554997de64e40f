"""``diffprobe lens``: the Diffusion Lens, images from every intermediate text-encoder layer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import setup


def _seeds(text: str) -> list[int]:
    from diffprobe.lens import LensError

    try:
        seeds = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise LensError(
            f"--seeds {text!r}: seeds are comma-separated integers such as 0,1,2,3"
        ) from None
    if not seeds or min(seeds) < 0:
        raise LensError(f"--seeds {text!r}: seeds are integers >= 0, such as 0,1,2,3")
    return seeds


def _check_layers(text: str) -> None:
    """The form of ``--layers`` (the range is checked once the model is loaded)."""
    from diffprobe.lens import LensError

    if text.strip().lower() == "all":
        return
    words = [w for w in text.replace(" ", "").split(",") if w]
    if not words or not all(w.lstrip("-").isdigit() for w in words):
        raise LensError(
            f"--layers {text!r}: give 'all' or comma-separated layer numbers such as 0,2,4 "
            "(-1 = the last)"
        )


def _check_numbers(steps: int, batch_size: int, size: int | None, guidance: float | None):
    from diffprobe.lens import LensError

    if steps < 1:
        raise LensError(f"--steps {steps}: the sampler needs at least 1 step")
    if batch_size < 1:
        raise LensError(f"--batch-size {batch_size}: a batch holds at least 1 prompt")
    if size is not None and size < 1:
        raise LensError(
            f"--size {size}: the image size is a positive number of pixels (leave it out for "
            "the model's native size)"
        )
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise LensError(
            f"--guidance {guidance:g}: the guidance scale is a finite number >= 0 (leave it "
            "out for the family's default)"
        )


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
        str | None,
        typer.Option(
            help="pooled vector: full (full encoders) | lens (from the layer) | empty (the empty "
            "prompt's below the last layer, Toker's FLUX notebook); default: empty for FLUX's "
            "T5, lens for an encoder feeding only the pooled vector, else full"
        ),
    ] = None,
    size: Annotated[int | None, typer.Option(help="image size (default: native)")] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per pipeline call")] = 8,
    dtype: str = "fp32",
    device: str = "cpu",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/lens"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.")] = False,
) -> None:
    """Generate an image from every layer of a text encoder (Toker et al.'s Diffusion Lens):
    one PNG per (layer, seed), grid.png with layer labels and lens.json in OUT (printed)."""
    setup(quiet)
    from diffprobe.io import check_output
    from diffprobe.lens import LENS_KIND, NORMS, PADDING, POOLED, LensError, lens
    from diffprobe.loading import load, parse_device, parse_dtype

    for name, value, choices in (("--pad", pad, PADDING), ("--norm", norm, NORMS),
                                 ("--pooled", pooled, POOLED)):  # fmt: skip
        if value is not None and value not in choices:
            raise LensError(f"{name} {value!r}: expected one of {', '.join(choices)}")
    seed_list = _seeds(seeds)
    _check_layers(layers)
    _check_numbers(steps, batch_size, size, guidance)
    parse_dtype(dtype)
    parse_device(device)
    check_output(out, LENS_KIND)
    loaded = load(model, dtype=dtype, device=device)
    result = lens(
        loaded, prompt, layers=layers, seeds=seed_list, steps=steps, guidance_scale=guidance,
        encoder=encoder, padding=pad, norm=norm, pooled=pooled, size=size,
        batch_size=batch_size, progress=not quiet,
    )  # fmt: skip
    result.save(out)
    typer.echo(str(out))


def register(app: typer.Typer) -> None:
    app.command("lens")(lens_command)
