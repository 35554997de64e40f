"""``diffprobe models`` and ``diffprobe sites``: what diffprobe can open, and every site of a
model with its shape (meta device, no weights)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from diffprobe.cli.common import AsJson


def models(as_json: AsJson = False) -> None:
    """List the model aliases with family, hub id, resolution and prediction type."""
    from diffprobe.registry import list_models

    specs = list_models()
    if as_json:
        typer.echo(json.dumps([s.as_dict() for s in specs], indent=2))
        return
    rows = [("alias", "family", "resolution", "prediction", "source")]
    rows += [
        (
            s.alias,
            s.family,
            str(s.resolution),
            s.prediction_type,
            s.source if not s.local else "embedded",
        )
        for s in specs
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[4])


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
        typer.echo(
            json.dumps(
                [
                    {
                        "site": s.site,
                        "module": s.module_class,
                        "shape": list(s.shape),
                        "elements": {k: list(v) for k, v in (s.elements or {}).items()},
                    }
                    for s in chosen
                ],
                indent=1,
            )
        )
        return
    width = max((len(s.site) for s in chosen), default=10)
    for s in chosen:
        extra = ""
        if s.elements:
            extra = "  elements: " + ", ".join(f"{k} {tuple(v)}" for k, v in s.elements.items())
        typer.echo(f"{s.site.ljust(width)}  {s.module_class:<28} {tuple(s.shape)}{extra}")
    typer.echo(f"{len(chosen)} sites", err=True)


def register(app: typer.Typer) -> None:
    app.command()(models)
    app.command()(sites)
