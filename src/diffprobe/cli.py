"""The ``diffprobe`` command line. Results go to stdout or files, logs and progress to stderr."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from diffprobe.errors import DiffprobeError

app = typer.Typer(
    name="diffprobe",
    help="Look inside diffusion models: representations, alignment, anomalies, lens, editing.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _setup(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"


@app.command()
def models(as_json: AsJson = False) -> None:
    """List the model aliases with family, hub id, resolution and prediction type."""
    from diffprobe.registry import list_models

    specs = list_models()
    if as_json:
        typer.echo(json.dumps([s.as_dict() for s in specs], indent=2))
        return
    rows = [("alias", "family", "resolution", "prediction", "source")]
    rows += [(s.alias, s.family, str(s.resolution), s.prediction_type, s.source if not s.local
              else "embedded") for s in specs]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])


@app.command()
def sites(
    model: Annotated[str, typer.Argument(help="alias, hub-id-free local folder")],
    size: Annotated[int | None, typer.Option(help="image size in px (default: native)")] = None,
    filter: Annotated[str | None, typer.Option("--filter", "-f", help="substring to keep")] = None,
    component: Annotated[list[str] | None, typer.Option(help="only these components")] = None,
    as_json: AsJson = False,
) -> None:
    """List every site of MODEL with its output shape per item, offline and without weights
    (built on the meta device from the configs shipped with diffprobe)."""
    from diffprobe.models.meta import site_shapes
    from diffprobe.registry import resolve

    spec = resolve(model)
    source = spec.source if spec.local else (spec.alias or model)
    shapes = site_shapes(source, size, component or None)
    chosen = [s for s in shapes.values() if not filter or filter in s.site]
    if as_json:
        typer.echo(json.dumps([
            {"site": s.site, "module": s.module_class, "shape": list(s.shape),
             "elements": {k: list(v) for k, v in (s.elements or {}).items()}}
            for s in chosen
        ], indent=1))
        return
    width = max((len(s.site) for s in chosen), default=10)
    for s in chosen:
        extra = ""
        if s.elements:
            extra = "  elements: " + ", ".join(f"{k} {tuple(v)}" for k, v in s.elements.items())
        typer.echo(f"{s.site.ljust(width)}  {s.module_class:<28} {tuple(s.shape)}{extra}")
    typer.echo(f"{len(chosen)} sites", err=True)


@app.command("train-tiny")
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
    _setup(quiet)
    from diffprobe.train.tiny import train_tiny

    train_tiny(out, seed=seed, device=device, resume=resume, progress=not quiet)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/demo"),
    quiet: Quiet = False,
) -> None:
    """The main job on the embedded default: models, sites, a capture on `tiny`."""
    _setup(quiet)
    from diffprobe.demo import run_demo

    run_demo(out, progress=not quiet)


def main() -> None:
    try:
        app()
    except DiffprobeError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
