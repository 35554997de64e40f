"""``diffprobe features capture|analyse``: activity over denoising timesteps (docs/features.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import Quiet, setup


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """``"0,1,2"`` or ``"0-63"`` -> a list of seeds."""
    from diffprobe.features import ActivityError

    seeds: list[int] = []
    try:
        for word in [w for w in text.replace(" ", "").split(",") if w]:
            low, sep, high = word.partition("-")
            seeds += list(range(int(low), int(high) + 1)) if sep and low else [int(word)]
    except ValueError:
        raise ActivityError(
            f"{option} {text!r}: give integers >= 0 such as 0,1,2 or a range such as 0-63"
        ) from None
    if not seeds or min(seeds) < 0:
        raise ActivityError(f"{option} {text!r}: give integers >= 0 such as 0,1,2 or 0-63")
    return seeds


def capture_command(
    model: Annotated[str, typer.Option(help="alias, hub id or local diffusers folder")],
    prompts: Annotated[str, typer.Option(help="prompt file (one a line) or shapes:N")],
    sites: Annotated[
        list[str], typer.Option("--sites", help="denoiser sites (repeat or space-separate)")
    ],
    out: Annotated[Path, typer.Option(help="run folder")],
    seeds: Annotated[str, typer.Option(help="seeds per prompt, e.g. 0,1,2 or 0-4")] = "0",
    steps: Annotated[int, typer.Option(help="sampler steps")] = 25,
    guidance: Annotated[
        float | None, typer.Option(help="guidance scale (default: the family's; <= 1: no CFG)")
    ] = None,
    negative_prompt: Annotated[
        str | None, typer.Option(help="the unconditional branch's prompt (default: empty)")
    ] = None,
    reduce: Annotated[str, typer.Option(help="mean, or mean,max (over space/tokens)")] = "mean",
    branch: Annotated[str, typer.Option(help="cond | uncond | both (no CFG: none)")] = "cond",
    size: Annotated[int | None, typer.Option(help="image size (default: native)")] = None,
    batch_size: Annotated[int, typer.Option(help="items per pipeline call")] = 8,
    chunk_items: Annotated[int, typer.Option(help="items per store chunk (the resume unit)")] = 16,
    store_dtype: Annotated[str, typer.Option(help="float32 or float16")] = "float32",
    shard: Annotated[str, typer.Option(help="i/n: this process fills every n-th chunk")] = "0/1",
    dtype: str = "fp32",
    device: str = "cpu",
    overwrite: Annotated[bool, typer.Option(help="replace an earlier, different capture")] = False,
    quiet: Quiet = False,
) -> None:
    """Generate every prompt x seed and record, per site, timestep and CFG branch, each
    channel's activation reduced over space/tokens into RUN (printed)."""
    setup(quiet)
    from diffprobe.extract.plan import check_batching, parse_shard
    from diffprobe.features import ActivityPlan, capture_activity, read_prompts
    from diffprobe.io import check_output
    from diffprobe.loading import load, parse_device, parse_dtype

    plan = ActivityPlan(
        sites=[s for entry in sites for s in entry.split()],
        seeds=parse_seeds(seeds),
        steps=steps,
        guidance_scale=guidance,
        negative_prompt=negative_prompt,
        reductions=tuple(r for r in reduce.replace(" ", "").split(",") if r),
        branches=branch,
        size=size,
        chunk_items=chunk_items,
        store_dtype=store_dtype,
    )
    shard_range = parse_shard(shard)
    check_batching(batch_size, shard_range)
    read_prompts(prompts)  # a bad prompt file fails before the model loads
    parse_dtype(dtype)
    parse_device(device)
    check_output(out, "features", overwrite=overwrite)
    loaded = load(model, dtype=dtype, device=device)
    root = capture_activity(loaded, prompts, plan, out, batch_size=batch_size,
                            shard=shard_range, overwrite=overwrite, progress=not quiet)  # fmt: skip
    typer.echo(str(root))


def analyse_command(
    run: Annotated[Path, typer.Argument(help="a run folder of diffprobe features capture")],
    out: Annotated[
        Path | None, typer.Option(help="analysis folder (default: RUN-analysis)")
    ] = None,
    sites: Annotated[list[str] | None, typer.Option("--sites", help="default: all")] = None,
    branch: Annotated[str | None, typer.Option(help="default: cond (none without CFG)")] = None,
    top_k: Annotated[int, typer.Option(help="k of the per-sample top-k frequency")] = 20,
    examples: Annotated[int, typer.Option(help="top examples per channel")] = 9,
    windows: Annotated[
        str | None, typer.Option(help="timestep windows for top examples, e.g. 0-300,300-1000")
    ] = None,
    profile: Annotated[
        str, typer.Option(help="table for active timesteps and peaks: frequency | mean | max")
    ] = "frequency",
    threshold: Annotated[float, typer.Option(help="active where the profile exceeds it")] = 0.0,
    peak_height: float = 0.0,
    peak_distance: Annotated[int, typer.Option(help="min timesteps between peaks")] = 100,
    peak_count: Annotated[int, typer.Option(help="highest peaks kept per channel")] = 3,
    plot_channels: Annotated[int, typer.Option(help="channels plotted per site")] = 8,
    overwrite: bool = False,
    quiet: Quiet = False,
) -> None:
    """Timestep analysis of RUN: mean/max activation and top-k frequency per channel and
    timestep, active timesteps, peaks, top examples; tables, JSON, CSV and plots (OUT printed)."""
    setup(quiet)
    from diffprobe.features import analyse_activity, open_activity, parse_windows

    activity = open_activity(run)
    chosen = [s for entry in sites for s in entry.split()] if sites else None
    result = analyse_activity(
        activity, out or run.with_name(run.name + "-analysis"), sites=chosen, branch=branch,
        top_k=top_k, examples=examples, windows=parse_windows(windows), profile=profile,
        threshold=threshold, peak_height=peak_height, peak_distance=peak_distance,
        peak_count=peak_count, plot_channels=plot_channels, overwrite=overwrite,
    )  # fmt: skip
    typer.echo(str(result))


def register(app: typer.Typer) -> None:
    features_app = typer.Typer(
        name="features",
        help="Activity of channels over denoising timesteps: capture during generation, analyse.",
        no_args_is_help=True,
    )
    app.add_typer(features_app, name="features")
    features_app.command("capture")(capture_command)
    features_app.command("analyse")(analyse_command)
