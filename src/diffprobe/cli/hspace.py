"""``diffprobe hspace train | direction | eval``: h-space editing (Asyrp) — docs/hspace.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import Quiet, setup

hspace_app = typer.Typer(help="h-space editing (Asyrp): train Δh, directions, evaluation.",
                         no_args_is_help=True)  # fmt: skip

Model = Annotated[str, typer.Option(help="tiny-ddpm, tiny, an alias or a local folder")]
Source = Annotated[str, typer.Option(help="source text / shapes-world colour, e.g. red")]
Target = Annotated[str, typer.Option(help="target text / shapes-world colour, e.g. blue")]
Out = Annotated[Path, typer.Option(help="output folder")]
Overwrite = Annotated[bool, typer.Option(help="replace diffprobe's earlier output there")]


def _check(steps: int, items: int, source: str, target: str) -> None:
    from diffprobe.interventions.hspace import HSpaceError
    from diffprobe.stages.hspace import check_texts

    if steps < 2:
        raise HSpaceError(f"--steps {steps}: DDIM needs at least 2 steps (Asyrp uses 40)")
    if items < 2:
        raise HSpaceError(f"--items {items}: use at least 2 images")
    check_texts(source, target)


def _load(model: str, device: str):
    from diffprobe.interventions.hspace import mid_block
    from diffprobe.loading import load

    loaded = load(model, device=device)
    mid_block(loaded)
    return loaded


def train_command(
    model: Model, source: Source, target: Target,
    out: Out = Path("runs/hspace-train"),
    kind: Annotated[str, typer.Option(help="conv (Asyrp DeltaBlock) | transformer | free")] = "conv",
    items: Annotated[int, typer.Option(help="training images of the source colour")] = 16,
    steps: Annotated[int, typer.Option(help="DDIM steps of inversion and chain")] = 40,
    objective: Annotated[str, typer.Option(
        help="clip (Asyrp's directional CLIP loss) | paired (shapes-world colour twins)")] = "clip",
    epochs: Annotated[int | None, typer.Option(help="default 1 (clip), 150 (paired)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="default 4 (clip), 16 (paired)")] = None,
    optimizer: Annotated[str | None, typer.Option(
        help="sgd | adamw; default sgd (clip), adamw (paired)")] = None,
    lr: Annotated[float | None, typer.Option(help="default 0.5 (clip), 1e-2 (paired)")] = None,
    lambda_clip: float = 1.0,
    lambda_recon: Annotated[float | None, typer.Option(
        help="L1 to the unedited P_t (clip; default 3) / to the unedited output outside the "
        "shape (paired; default 0.1)")] = None,
    paired_loss: Annotated[str, typer.Option(help="paired: mse | l1 to the twin")] = "mse",
    paired_at: Annotated[str, typer.Option(
        help="paired: final (whole chain) | pt (P_t per step, Asyrp's loop)")] = "final",
    t_edit: Annotated[int | None, typer.Option(help="default: from the distance curve")] = None,
    t_boost: Annotated[int | None, typer.Option(help="default: from the curve; -1 = off")] = None,
    clip: Annotated[str, typer.Option(help="tiny-clip or a CLIPModel folder / hub id")] = "tiny-clip",
    seed: int = 0, device: str = "cpu", overwrite: Overwrite = False, quiet: Quiet = False,
) -> None:  # fmt: skip
    """Train a Δh network (Asyrp's directional CLIP + L1 loss, or colour twins with
    --objective paired); writes delta.safetensors."""
    setup(quiet)
    from dataclasses import asdict

    from diffprobe.interventions.hspace import HSpaceError
    from diffprobe.interventions.hspace.deltas import KINDS
    from diffprobe.interventions.hspace.paired import PAIRED_AT, PAIRED_LOSSES
    from diffprobe.interventions.hspace.training import OBJECTIVES, PAIRED_DEFAULTS, TrainConfig
    from diffprobe.io import check_output
    from diffprobe.stages.hspace import HSPACE_KIND, paired_data, source_images, train

    _check(steps, items, source, target)
    if kind not in KINDS:
        raise HSpaceError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if objective not in OBJECTIVES:
        raise HSpaceError(f"--objective {objective!r}: expected {' or '.join(OBJECTIVES)}")
    if paired_loss not in PAIRED_LOSSES or paired_at not in PAIRED_AT:
        raise HSpaceError(f"--paired-loss {paired_loss!r} / --paired-at {paired_at!r}: expected "
                          "mse or l1 / final or pt")  # fmt: skip
    defaults = {**asdict(TrainConfig()), **(PAIRED_DEFAULTS if objective == "paired" else {})}
    given = {"epochs": epochs, "batch_size": batch_size, "optimizer": optimizer,
             "learning_rate": lr, "lambda_recon": lambda_recon}  # fmt: skip
    chosen = {k: defaults[k] if v is None else v for k, v in given.items()}
    if chosen["optimizer"] not in ("sgd", "adamw"):
        raise HSpaceError(f"--optimizer {optimizer!r}: expected sgd or adamw")
    source_images(source, 1)
    if objective == "paired":
        paired_data(source, target, 1, seed)
    check_output(out, HSPACE_KIND, overwrite=overwrite)
    loaded = _load(model, device)
    config = TrainConfig(steps=steps, lambda_clip=lambda_clip, seed=seed, objective=objective,
                         paired_loss=paired_loss, paired_at=paired_at, **chosen)  # fmt: skip
    folder = train(loaded, out, source=source, target=target, kind=kind, items=items, clip=clip,
                   config=config, t_edit=t_edit, t_boost=t_boost, seed=seed,
                   progress=not quiet, overwrite=overwrite)  # fmt: skip
    typer.echo(str(folder / "delta.safetensors"))


def direction_command(
    model: Model, source: Source, target: Target,
    out: Out = Path("runs/hspace-direction"),
    method: Annotated[str, typer.Option(help="mean-difference | pca")] = "mean-difference",
    items: int = 16, steps: int = 40, seed: int = 0, device: str = "cpu",
    overwrite: Overwrite = False, quiet: Quiet = False,
) -> None:  # fmt: skip
    """A training-free Δh from h of source- and target-colour images (no CLIP, no training)."""
    setup(quiet)
    from diffprobe.io import check_output
    from diffprobe.stages.hspace import HSPACE_KIND, make_direction, source_images

    _check(steps, items, source, target)
    source_images(source, 1)
    source_images(target, 1)
    check_output(out, HSPACE_KIND, overwrite=overwrite)
    loaded = _load(model, device)
    folder = make_direction(loaded, out, source=source, target=target, method=method,
                            items=items, steps=steps, seed=seed, progress=not quiet,
                            overwrite=overwrite)  # fmt: skip
    typer.echo(str(folder / "delta.safetensors"))


def eval_command(
    model: Model, source: Source, target: Target,
    delta: Annotated[list[Path], typer.Option(help="Δh file(s); several are summed")],
    out: Out = Path("runs/hspace-eval"),
    strengths: Annotated[str, typer.Option(help="comma-separated α")] = "-2,-1,0,1,2",
    coefficients: Annotated[str | None, typer.Option(help="one per --delta")] = None,
    items: int = 16, steps: int = 40,
    t_edit: Annotated[int | None, typer.Option(help="default: the Δh file's")] = None,
    t_boost: Annotated[int | None, typer.Option(help="default: the Δh file's; -1 = off")] = None,
    clip: str = "tiny-clip", seed: int = 0, device: str = "cpu",
    overwrite: Overwrite = False, quiet: Quiet = False,
) -> None:  # fmt: skip
    """Edit held-out source-colour images at every α; S_dir, Fréchet, KID, reader, linearity."""
    setup(quiet)
    import json

    from diffprobe.interventions.hspace import HSpaceError, load_delta
    from diffprobe.io import check_output
    from diffprobe.stages.hspace import HSPACE_KIND, evaluate, source_images

    _check(steps, items, source, target)
    try:
        alphas = [float(v) for v in strengths.split(",") if v.strip()]
        weights = None if coefficients is None else [float(v) for v in coefficients.split(",")]
    except ValueError:
        raise HSpaceError(f"--strengths {strengths!r} / --coefficients {coefficients!r}: give "
                          "comma-separated numbers such as -2,-1,0,1,2") from None  # fmt: skip
    if not alphas:
        raise HSpaceError("--strengths: give at least one strength")
    for path in delta:
        load_delta(path)
    source_images(source, 1)
    check_output(out, HSPACE_KIND, overwrite=overwrite)
    loaded = _load(model, device)
    result = evaluate(loaded, delta, out, source=source, target=target, strengths=alphas,
                      items=items, steps=steps, t_edit=t_edit, t_boost=t_boost,
                      coefficients=weights, clip=clip, seed=seed, progress=not quiet,
                      overwrite=overwrite)  # fmt: skip
    typer.echo(json.dumps({"out": str(out), "linearity": result["linearity"]}))


def register(app: typer.Typer) -> None:
    hspace_app.command("train")(train_command)
    hspace_app.command("direction")(direction_command)
    hspace_app.command("eval")(eval_command)
    app.add_typer(hspace_app, name="hspace")
