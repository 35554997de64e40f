"""``diffprobe extract``: the grid engine from the command line (docs/store.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import Compile, Quiet, setup


def extract(
    model: Annotated[str, typer.Option(help="alias, hub id or local diffusers folder")],
    data: Annotated[str, typer.Option(help="image folder, THINGS root, or shapes:N")],
    sites: Annotated[
        list[str], typer.Option("--sites", help="denoiser sites (repeat or space-separate)")
    ],
    out: Annotated[Path, typer.Option(help="run folder")],
    noise: Annotated[
        str | None, typer.Option(help="noise levels p in [0,1], e.g. 0,0.1,0.5")
    ] = None,
    timesteps: Annotated[str | None, typer.Option(help="timesteps instead of noise levels")] = None,
    condition: Annotated[str, typer.Option(help="empty | template | captions | prompt")] = "empty",
    template: Annotated[str | None, typer.Option(help="e.g. 'a photo of a {label}'")] = None,
    captions: Annotated[
        Path | None, typer.Option(help="captions file (id,caption CSV or lines)")
    ] = None,
    guidance_scale: Annotated[
        float, typer.Option(help="> 1 stores the cond and uncond branches")
    ] = 1.0,
    pooling: Annotated[str, typer.Option(help="none | mean | max")] = "mean",
    batch_size: int = 16,
    chunk_items: Annotated[int, typer.Option(help="items per store chunk (the resume unit)")] = 32,
    seed: Annotated[
        int | None, typer.Option(help="noise seed (default 0; 42 under --protocol alignment-paper)")
    ] = None,
    protocol: Annotated[
        str,
        typer.Option(
            help="default (t = round(p·T), VAE mean, noise per item) | alignment-paper (img2img "
            "with --protocol-steps steps: t = scheduler.timesteps[N - int(N·p)], VAE posterior "
            "sample, one noise tensor for every image; docs/alignment.md)"
        ),
    ] = "default",
    protocol_steps: Annotated[
        int, typer.Option(help="img2img inference steps of --protocol alignment-paper")
    ] = 100,
    size: Annotated[int | None, typer.Option(help="image size (default: model native)")] = None,
    dtype: str = "fp32",
    device: str = "cpu",
    store_dtype: Annotated[str, typer.Option(help="float32 or float16")] = "float32",
    shard: Annotated[str, typer.Option(help="i/n: this process fills every n-th chunk")] = "0/1",
    on_error: Annotated[str, typer.Option(help="unreadable images: skip | fail")] = "fail",
    batch_invariant: Annotated[
        bool,
        typer.Option(
            help="same bits at every --batch-size (convolutions one item at a time; slower)"
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="replace an earlier, different extraction in OUT (only what diffprobe wrote "
            "there is removed; a folder holding anything else is refused)"
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            help="torch CPU threads (default: torch's, 1 under torchrun's OMP_NUM_THREADS=1); "
            "CPU values depend on it: give every shard and the single process the same number "
            "for bit-identical stores (docs/store.md)"
        ),
    ] = None,
    compile: Compile = False,
    quiet: Quiet = False,
) -> None:
    """Extract every site x noise level x condition in one pass over the data into RUN."""
    setup(quiet)
    from diffprobe.data.sources import open_source
    from diffprobe.extract import EXTRACT_KIND, extract
    from diffprobe.extract.plan import (
        Condition,
        ExtractionError,
        ExtractionPlan,
        check_batching,
        parse_grid,
        parse_shard,
    )
    from diffprobe.io import check_output
    from diffprobe.loading import load, parse_device, parse_dtype

    site_list = [s for entry in sites for s in entry.split()]
    kind = "captions" if captions is not None and condition == "empty" else condition
    if template is not None and kind not in ("template", "prompt"):
        raise ExtractionError(
            f"--template {template!r} is used only with --condition template or --condition "
            f"prompt, not --condition {kind}; pass one of those"
        )
    if captions is not None and kind != "captions":
        raise ExtractionError(
            f"--captions {captions} is used only with --condition captions, not --condition "
            f"{kind}; leave one of them out"
        )
    plan = ExtractionPlan(
        sites=site_list,
        noise_levels=parse_grid(noise, "--noise"),
        timesteps=parse_grid(timesteps, "--timesteps"),
        conditions=[Condition(kind, kind, template, guidance_scale)],
        pooling=pooling,
        seed=(42 if protocol == "alignment-paper" else 0) if seed is None else seed,
        protocol=protocol,
        protocol_steps=protocol_steps,
        image_size=size,
        chunk_items=chunk_items,
        store_dtype=store_dtype,
        batch_invariant=batch_invariant,
    )
    shard_range = parse_shard(shard)
    check_batching(batch_size, shard_range)
    parse_dtype(dtype)
    parse_device(device)
    if threads is not None:
        if threads < 1:
            raise ExtractionError(f"--threads {threads}: expected an integer >= 1")
        import torch

        torch.set_num_threads(threads)
    check_output(out, EXTRACT_KIND, overwrite=overwrite)
    source = open_source(data, on_error)
    loaded = load(model, dtype=dtype, device=device)
    if compile:
        loaded.compile()
    root = extract(
        loaded,
        source,
        plan,
        out,
        batch_size=batch_size,
        shard=shard_range,
        overwrite=overwrite,
        captions_file=captions,
        progress=not quiet,
    )
    typer.echo(str(root))


def register(app: typer.Typer) -> None:
    app.command()(extract)
