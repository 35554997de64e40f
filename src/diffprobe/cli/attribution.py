"""``diffprobe attribution``: per-word attention maps; ``diffprobe attribution-eval``: their mIoU."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import Quiet, setup


def _size(text: str | None) -> int | tuple[int, int] | None:
    from diffprobe.stages.attribution import AttributionError

    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        values = [int(p) for p in parts]
        return values[0] if len(values) == 1 else (values[0], values[1])
    raise AttributionError(f"--size {text!r}: give one side in px (64) or height x width (64x96)")


def _choices(
    option: str, text: str | None, allowed: tuple[str, ...], default: str = "all"
) -> list[str] | None:
    """None for ``default`` (the library's default choice), ``["all"]`` for 'all' when that
    is not the default, else the comma-separated values, each one of ``allowed``."""
    from diffprobe.stages.attribution import AttributionError

    word = "all" if text is None else text.strip().lower()
    if word == default:
        return None
    if word == "all":
        return ["all"]
    values = [v.strip() for v in text.split(",") if v.strip()]
    wrong = [v for v in values if v not in allowed]
    if wrong or not values:
        named = "'all'" if default == "all" else f"'{default}', 'all'"
        raise AttributionError(
            f"{option} {text!r}: expected {named} or comma-separated {', '.join(allowed)}"
        )
    return values


def attribution_command(
    model: Annotated[str, typer.Option(help="alias, hub id or local diffusers folder")],
    prompt: Annotated[list[str], typer.Option(help="a prompt (repeat for several)")],
    out: Annotated[Path, typer.Option(help="output folder")],
    words: Annotated[
        str | None,
        typer.Option(
            help="comma-separated words or phrases, e.g. circle,red,top left "
            "(default: every word of each prompt)"
        ),
    ] = None,  # fmt: skip
    seed: Annotated[int, typer.Option(help="seed of the first prompt (then +1 each)")] = 0,
    steps: Annotated[int, typer.Option(help="sampler steps")] = 25,
    guidance: Annotated[
        float | None, typer.Option(help="guidance scale (default: the family's; <= 1: no CFG)")
    ] = None,
    size: Annotated[str | None, typer.Option(help="64 or 64x96 (default: native)")] = None,
    layers: Annotated[
        str,
        typer.Option(
            help="'default' (every site but the UNet mid block, as DAAM), 'all', or layer "
            "groups: down,mid,up (UNets), joint,single (DiTs)"
        ),
    ] = "default",
    timesteps: Annotated[
        str, typer.Option(help="'all' or ranges: early (noise > 2/3), middle, late (< 1/3)")
    ] = "all",
    weighting: Annotated[
        str,
        typer.Option(
            help="attention (each text position's map, as DAAM) | rollout (each input word's "
            "map through the text encoder's attention rollout; one-encoder families) | "
            "rollout-words (then each pixel's share over the prompt's words) | "
            "output-rollout-words (the same on value-space scores; UNet families)"
        ),
    ] = "attention",
    store: Annotated[
        bool, typer.Option("--store", help="stream every map to OUT/maps.zarr as float16")
    ] = False,
    masks: Annotated[
        str,
        typer.Option(
            help="none | reader: ground truth of shapes-world images from the "
            "attribute reader's foreground, scored in attribution.json"
        ),
    ] = "none",  # fmt: skip
    threshold: Annotated[float, typer.Option(help="threshold in (0, 1) for IoU")] = 0.4,
    dtype: str = "fp32",
    device: str = "cpu",
    quiet: Quiet = False,
) -> None:
    """Per-word heat maps from the attention of image tokens to text tokens (every family with
    text attention), one DAAM experiment folder per prompt in OUT, attribution.json (printed)."""
    setup(quiet)
    from diffprobe.analysis.attribution import check_threshold, check_weighting
    from diffprobe.io import check_output
    from diffprobe.loading import load, parse_device, parse_dtype
    from diffprobe.stages.attribution import ATTRIBUTION_KIND, AttributionError
    from diffprobe.stages.attribution_run import run_attribution

    check_threshold(threshold)
    check_weighting(weighting)
    if steps < 1:
        raise AttributionError(f"--steps {steps}: the sampler needs at least 1 step")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise AttributionError(f"--guidance {guidance:g}: a finite number >= 0")
    if masks not in ("none", "reader"):
        raise AttributionError(f"--masks {masks!r}: expected none or reader")
    if not [p for p in prompt if p.strip()]:
        raise AttributionError("--prompt: give a non-empty prompt")
    chosen_size = _size(size)
    chosen_layers = _choices(
        "--layers", layers, ("down", "mid", "up", "joint", "single"), default="default"
    )
    chosen_steps = _choices("--timesteps", timesteps, ("early", "middle", "late"))
    word_list = [w.strip() for w in words.split(",") if w.strip()] if words else None
    parse_dtype(dtype)
    parse_device(device)
    check_output(out, ATTRIBUTION_KIND)
    loaded = load(model, dtype=dtype, device=device)
    if chosen_size is not None:
        for side in chosen_size if isinstance(chosen_size, tuple) else (chosen_size,):
            loaded.check_size(side)
    folder = run_attribution(
        loaded, prompt, out, words=word_list, seeds=[seed + i for i in range(len(prompt))],
        steps=steps, guidance_scale=guidance, size=chosen_size, layers=chosen_layers,
        timesteps=chosen_steps, store=store, masks=None if masks == "none" else masks,
        threshold=threshold, weighting=weighting, progress=not quiet,
    )  # fmt: skip
    typer.echo(str(folder / "attribution.json"))


def attribution_eval_command(
    folder: Annotated[
        Path, typer.Argument(help="folder of DAAM experiments (*.gt.png beside maps)")
    ],
    threshold: Annotated[float, typer.Option(help="threshold in (0, 1)")] = 0.4,
    sweep: Annotated[bool, typer.Option("--sweep", help="also thresholds 0.05 .. 0.95")] = False,
    maps: Annotated[
        str, typer.Option(help="heat_map (cross-attention) | concept_map (output space)")
    ] = "heat_map",
    quiet: Quiet = False,
) -> None:
    """mIoU of thresholded maps against ground-truth masks (DAAM's *.gt.png layout); JSON on
    stdout."""
    setup(quiet)
    from diffprobe.stages.attribution import AttributionError
    from diffprobe.stages.attribution_run import evaluate_folder

    if maps not in ("heat_map", "concept_map"):
        raise AttributionError(f"--maps {maps!r}: expected heat_map or concept_map")
    result = evaluate_folder(folder, threshold=threshold, sweep=sweep, maps=maps)
    typer.echo(json.dumps(result, indent=2))


def register(app: typer.Typer) -> None:
    app.command("attribution")(attribution_command)
    app.command("attribution-eval")(attribution_eval_command)
