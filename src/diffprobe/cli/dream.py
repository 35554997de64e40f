"""``diffprobe dream``: deep dream of channels or SAE features of one site (docs/dream.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import setup


def _error(message: str):
    from diffprobe.interventions.dream import DreamError

    return DreamError(message)


def _integers(text: str, option: str, minimum: int = 0) -> list[int]:
    """'3,7' or '0-15' or '0-3,9' -> [..], each >= minimum, no repeats."""
    values: list[int] = []
    for word in [w for w in text.replace(" ", "").split(",") if w]:
        low, dash, high = word.partition("-") if not word.startswith("-") else (word, "", "")
        try:
            span = range(int(low), int(high) + 1) if dash else [int(word)]
        except ValueError:
            raise _error(
                f"{option} {text!r}: expected integers such as 3,7 or a range 0-15"
            ) from None
        values.extend(span)
    if not values:
        raise _error(f"{option} {text!r}: expected integers such as 3,7 or a range 0-15")
    if min(values) < minimum:
        raise _error(f"{option} {text!r}: values are integers >= {minimum}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise _error(f"{option} {text!r}: {repeated[0]} is given twice")
    return values


def _timesteps(text: str, peaks: Path | None, targets: list[int]) -> dict[int, list[float]]:
    """'0,500' or '0,peaks' (with --peaks FILE: {"target": [t, ...]}) -> target -> timesteps."""
    words = [w for w in text.replace(" ", "").split(",") if w]
    if not words:
        raise _error(f"--timesteps {text!r}: expected timesteps such as 0,500 or 0,peaks")
    fixed: list[float] = []
    for word in words:
        if word == "peaks":
            continue
        try:
            value = float(word)
        except ValueError:
            raise _error(
                f"--timesteps {text!r}: {word!r} is neither a number nor 'peaks'"
            ) from None
        if not math.isfinite(value):
            raise _error(f"--timesteps {text!r}: {word!r} is not a finite number")
        if value in fixed:
            raise _error(f"--timesteps {text!r}: {word} is given twice")
        fixed.append(value)
    table = {target: list(fixed) for target in targets}
    if "peaks" not in words:
        if peaks is not None:
            raise _error("--peaks is read only with 'peaks' in --timesteps (e.g. 0,peaks)")
        return table
    if peaks is None:
        raise _error(
            f"--timesteps {text!r} asks for activity peaks: pass --peaks FILE, a JSON object "
            'of target -> timesteps such as {"3": [420, 780]}'
        )
    try:
        found = json.loads(Path(peaks).expanduser().read_text())
    except (OSError, ValueError) as err:
        raise _error(f"--peaks {peaks}: not a readable JSON file ({err})") from None
    if not isinstance(found, dict):
        raise _error(f"--peaks {peaks}: expected a JSON object of target -> timesteps")
    for target in targets:
        values = found.get(str(target), [])
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise _error(f"--peaks {peaks}: target {target} needs a list of timesteps")
        table[target] = sorted(set(table[target]) | {float(v) for v in values})
        if not table[target]:
            raise _error(f"--peaks {peaks}: target {target} has no peaks and --timesteps "
                         "names no fixed timestep; add one such as 0")  # fmt: skip
    return table


def _check(steps: int, lr: float, batch_size: int, snapshot_every: int, weights: dict) -> None:
    if steps < 1:
        raise _error(f"--steps {steps}: a dream takes at least 1 step")
    if not (math.isfinite(lr) and lr > 0):
        raise _error(f"--lr {lr:g}: the learning rate is a finite number > 0")
    if batch_size < 1:
        raise _error(f"--batch-size {batch_size}: a batch holds at least 1 dream")
    if snapshot_every < 1:
        raise _error(f"--snapshot-every {snapshot_every}: expected a number of steps >= 1")
    for name, value in weights.items():
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise _error(f"{name} {value:g}: expected a finite number >= 0")


def dream_command(
    model: Annotated[str, typer.Option(help="alias, hub id or local diffusers folder")],
    site: Annotated[str, typer.Option(help="denoiser site, e.g. unet.up_blocks.1")],
    channel: Annotated[
        str | None, typer.Option(help="channels to dream: 3,7 or a range 0-15")
    ] = None,
    sae: Annotated[Path | None, typer.Option(help="SAE folder (saelens/sparsify/openai)")] = None,
    hookpoint: Annotated[
        str | None, typer.Option(help="subfolder of a multi-hookpoint SAE folder")
    ] = None,
    feature: Annotated[
        str | None, typer.Option(help="SAE features to dream (with --sae): 12,40 or 0-15")
    ] = None,
    timesteps: Annotated[
        str, typer.Option(help="timesteps to dream at: 0,500; 'peaks' reads --peaks")
    ] = "0",
    peaks: Annotated[
        Path | None, typer.Option(help='JSON of target -> activity peaks, {"3": [420]}')
    ] = None,
    seeds: Annotated[str, typer.Option(help="seeds, one dream per target each: 0,1,2")] = "0",
    steps: Annotated[int, typer.Option(help="optimisation steps")] = 100,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 0.05,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.01,
    snapshot_every: Annotated[int, typer.Option(help="snapshot every K steps")] = 10,
    tv: Annotated[
        float | None, typer.Option(help="total-variation weight (default 0.5; SAE: 0)")
    ] = None,
    range_weight: Annotated[float, typer.Option("--range", help="range-penalty weight")] = 0.5,
    range_threshold: Annotated[float, typer.Option(help="range-penalty threshold |z|")] = 3.0,
    moment: Annotated[
        float | None, typer.Option(help="moment-penalty weight (default 0; SAE: 0.5)")
    ] = None,
    sigma: Annotated[
        float | None, typer.Option(help="start σ of the gradient blur (default 0.5; SAE: 0)")
    ] = None,
    jitter: Annotated[int, typer.Option(help="jitter in latent pixels")] = 1,
    rotate: Annotated[float, typer.Option(help="rotation range ± degrees")] = 5.0,
    scale: Annotated[float, typer.Option(help="largest zoom factor (>= 1)")] = 1.1,
    renoise: Annotated[
        bool, typer.Option("--renoise/--no-renoise", help="noise z to t with fresh noise each step")
    ] = True,
    spectral: Annotated[
        bool, typer.Option("--spectral/--no-spectral", help="1/(|f|+1) gradient filter")
    ] = True,
    prompt: Annotated[str, typer.Option(help="conditioning prompt")] = "",
    prior: Annotated[
        Path | None, typer.Option(help="safetensors of start latents (steer --prior)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="dreams per render")] = 16,
    size: Annotated[int | None, typer.Option(help="image size (default: native)")] = None,
    dtype: str = "fp32",
    device: str = "cpu",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/dream"),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an earlier dream output in OUT")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.")] = False,
) -> None:
    """Deep dream: optimise the clean latent so a channel's (or SAE feature's) mean activation
    at a timestep is maximal (thesis regularisers and transforms); one folder per target with
    images, latents, per-step stats, snapshots and grid.png; dream.json in OUT (printed)."""
    setup(quiet)
    from diffprobe.io import check_output
    from diffprobe.loading import load, parse_device, parse_dtype
    from diffprobe.stages.dream import DREAM_KIND, DreamSettings, dream_targets

    if (channel is None) == (feature is None):
        raise _error("give --channel C[,C..] or --sae PATH --feature F[,F..] (one of them)")
    if feature is not None and sae is None:
        raise _error("--feature needs --sae PATH, the SAE whose latents are dreamt")
    if channel is not None and sae is not None:
        raise _error("--sae dreams SAE features: give --feature, not --channel")
    targets = _integers(channel if channel is not None else feature,
                        "--channel" if channel is not None else "--feature")  # fmt: skip
    seed_list = _integers(seeds, "--seeds")
    table = _timesteps(timesteps, peaks, targets)
    use_sae = sae is not None
    settings = DreamSettings(
        steps=steps, lr=lr, weight_decay=weight_decay, snapshot_every=snapshot_every,
        tv=(0.0 if use_sae else 0.5) if tv is None else tv, range_weight=range_weight,
        range_threshold=range_threshold,
        moment=(0.5 if use_sae else 0.0) if moment is None else moment,
        jitter=jitter, rotate=rotate, scale=scale, renoise=renoise, spectral=spectral,
        sigma=(0.0 if use_sae else 0.5) if sigma is None else sigma, prompt=prompt,
    )  # fmt: skip
    _check(steps, lr, batch_size, snapshot_every, {"--tv": settings.tv, "--range": range_weight,
           "--moment": settings.moment, "--sigma": settings.sigma,
           "--weight-decay": weight_decay, "--range-threshold": range_threshold,
           "--rotate": rotate})  # fmt: skip
    if jitter < 0:
        raise _error(f"--jitter {jitter}: expected a number of latent pixels >= 0")
    if not (math.isfinite(scale) and scale >= 1):
        raise _error(f"--scale {scale:g}: the largest zoom factor is a finite number >= 1")
    if size is not None and size < 1:
        raise _error(f"--size {size}: the image size is a positive number of pixels")
    parse_dtype(dtype)
    parse_device(device)
    check_output(out, DREAM_KIND, overwrite=overwrite)
    loaded_sae = None
    if use_sae:
        from diffprobe.sae import load_sae

        loaded_sae = load_sae(sae, hookpoint=hookpoint, device=device)
    loaded = load(model, dtype=dtype, device=device)
    start = None
    if prior is not None:
        from diffprobe.interventions.dream import input_shape, load_prior

        start = load_prior(prior, input_shape(loaded, size))
    dream_targets(
        loaded, site, targets, table, seed_list, out, sae=loaded_sae, prior=start,
        settings=settings, batch_size=batch_size, size=size, overwrite=overwrite,
        progress=not quiet, sae_path=str(sae) if sae else None,
    )  # fmt: skip
    typer.echo(str(out / "dream.json"))


def register(app: typer.Typer) -> None:
    app.command("dream")(dream_command)
