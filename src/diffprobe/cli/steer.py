"""``diffprobe steer``: push a channel or direction during generation; ``--prior`` is the
thesis' prior stage (docs/features.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import Quiet, setup


def _channels(text: str) -> list[int]:
    from diffprobe.cli.features import parse_seeds
    from diffprobe.features import SteerError

    try:
        return parse_seeds(text, "--channel")
    except Exception:  # noqa: BLE001 - one message for every malformed list
        raise SteerError(
            f"--channel {text!r}: give channel indices such as 3 or 0,5,7 or 0-7"
        ) from None


def _direction(spec: str):
    """``FILE.safetensors[:KEY[:ROW]]`` -> a 1-D tensor."""
    from safetensors.torch import load_file

    from diffprobe.features import SteerError

    path, _, rest = spec.partition(":")
    key, _, row = rest.partition(":")
    if not Path(path).is_file():
        raise SteerError(f"--direction {spec}: no such file (FILE.safetensors[:KEY[:ROW]])")
    try:
        tensors = load_file(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises several kinds
        raise SteerError(f"--direction {spec}: not a safetensors file ({err})") from None
    if not key:
        if len(tensors) != 1:
            raise SteerError(f"--direction {spec}: the file holds {', '.join(tensors)}; name one")
        key = next(iter(tensors))
    if key not in tensors:
        raise SteerError(f"--direction {spec}: no tensor {key!r}; it holds {', '.join(tensors)}")
    value = tensors[key]
    if row:
        if not row.isdigit() or int(row) >= value.shape[0]:
            raise SteerError(f"--direction {spec}: row {row} of a {tuple(value.shape)} tensor")
        value = value[int(row)]
    if value.dim() != 1:
        raise SteerError(f"--direction {spec}: a {tuple(value.shape)} tensor; give a vector "
                         "or FILE:KEY:ROW")  # fmt: skip
    return value


def _mask(path: Path):
    import numpy as np

    from diffprobe.features import SteerError

    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SteerError(f"--mask {path}: not a readable .npy array ({err})") from None
    if values.ndim not in (1, 2) or not np.isin(values, (0, 1)).all():
        raise SteerError(
            f"--mask {path}: a {values.dtype} {values.shape} array; give 0/1 or bool of shape "
            "(height, width) or (tokens,)"
        )
    return values.astype(bool)


def steer_command(
    model: Annotated[str, typer.Option(help="alias, hub id or local diffusers folder")],
    site: Annotated[str, typer.Option(help="the denoiser site to steer")],
    out: Annotated[Path, typer.Option(help="output folder")],
    channel: Annotated[str | None, typer.Option(help="channel(s): 3, 0,5,7 or 0-7")] = None,
    direction: Annotated[
        str | None, typer.Option(help="a vector: FILE.safetensors[:KEY[:ROW]] (e.g. SAE W_dec)")
    ] = None,
    mode: Annotated[str, typer.Option(help="add | scale | clamp")] = "add",
    strength: Annotated[float | None, typer.Option(help="absolute strength")] = None,
    relative: Annotated[
        float | None, typer.Option(help="strength = this x max activation per timestep")
    ] = None,
    analysis: Annotated[
        Path | None, typer.Option(help="folder of diffprobe features analyse")
    ] = None,
    window: Annotated[str, typer.Option(help="all | active | peaks | LOW-HIGH")] = "all",
    branch: Annotated[str | None, typer.Option(help="cond | uncond (default: both)")] = None,
    mask: Annotated[
        Path | None, typer.Option(help="spatial mask: a .npy of 0/1 (height, width) or (tokens,)")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="prompt(s) (default: empty)")] = None,
    seeds: Annotated[str, typer.Option(help="seeds, e.g. 0-63")] = "0",
    steps: int = 25,
    guidance: Annotated[float | None, typer.Option(help="default: the family's")] = None,
    size: int | None = None,
    prior: Annotated[
        bool,
        typer.Option(
            help="the thesis' prior: empty prompt, no CFG, seeds 1024,1111,4359,3248,"
            "1026, latents saved (strength default: --relative 50)"
        ),
    ] = False,
    no_baseline: Annotated[bool, typer.Option(help="skip the unsteered images")] = False,
    dtype: str = "fp32",
    device: str = "cpu",
    overwrite: bool = False,
    quiet: Quiet = False,
) -> None:
    """Generate with a channel (or direction) added, scaled or clamped inside a timestep
    window; one folder of images per channel, and the unsteered baseline (OUT printed)."""
    setup(quiet)
    from diffprobe.cli.features import parse_seeds
    from diffprobe.features import (
        STEER_MODES,
        Analysis,
        SteerError,
        resolve_steer,
        steer_to_folder,
    )  # fmt: skip
    from diffprobe.io import check_output
    from diffprobe.loading import load, parse_device, parse_dtype
    from diffprobe.stages.features import prior_settings

    if (channel is None) == (direction is None):
        raise SteerError("give --channel or --direction (one of them)")
    if mode not in STEER_MODES:
        raise SteerError(f"--mode {mode!r}: expected one of {', '.join(STEER_MODES)}")
    if branch not in (None, "cond", "uncond"):
        raise SteerError(f"--branch {branch!r}: expected cond or uncond")
    if steps < 1:
        raise SteerError(f"--steps {steps}: at least 1")
    if prior:
        if prompt or guidance not in (None, 1.0):
            raise SteerError("--prior steers the empty prompt without CFG: leave out --prompt "
                             "and --guidance")  # fmt: skip
        prompts, seed_list, guidance, relative = prior_settings(strength, relative)
    else:
        prompts, seed_list = list(prompt or [""]), parse_seeds(seeds)
    channels = _channels(channel) if channel is not None else [None]
    vector = _direction(direction) if direction is not None else None
    read = Analysis(analysis) if analysis is not None else None
    spatial = _mask(mask) if mask is not None else None
    parse_dtype(dtype)
    parse_device(device)
    check_output(out, "steer", overwrite=overwrite)
    loaded = load(model, dtype=dtype, device=device)
    steers = [
        resolve_steer(loaded, site, channel=c, direction=vector, mode=mode, strength=strength,
                      relative=relative, window=window, analysis=read, branch=branch,
                      mask=spatial)
        for c in channels
    ]  # fmt: skip
    result = steer_to_folder(loaded, steers, out, prompts=prompts, seeds=seed_list, steps=steps,
                             guidance_scale=guidance, size=size, prior=prior,
                             baseline=not no_baseline, overwrite=overwrite,
                             progress=not quiet)  # fmt: skip
    typer.echo(str(result))


def register(app: typer.Typer) -> None:
    app.command("steer")(steer_command)
