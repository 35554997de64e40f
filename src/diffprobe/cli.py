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


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"diffprobe {version('diffprobe')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")
    ] = False,
) -> None:
    """Look inside diffusion models: representations, alignment, anomalies, lens, editing."""


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


class _CurrentStderr(logging.StreamHandler):
    """A log handler that writes to whatever ``sys.stderr`` is at the time of the message
    (notebooks and test runners swap it; a handler holding the old stream would write to a
    closed file)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup(quiet: bool) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
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


@app.command()
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
    seed: int = 0,
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
    quiet: Quiet = False,
) -> None:
    """Extract every site x noise level x condition in one pass over the data into RUN."""
    _setup(quiet)
    import diffprobe
    from diffprobe.data.sources import open_source
    from diffprobe.extract.engine import (
        EXTRACT_KIND,
        Condition,
        ExtractionError,
        ExtractionPlan,
        check_batching,
        parse_grid,
        parse_shard,
    )
    from diffprobe.extract.engine import extract as run_extract
    from diffprobe.io import check_output
    from diffprobe.loading import parse_device, parse_dtype

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
        seed=seed,
        image_size=size,
        chunk_items=chunk_items,
        store_dtype=store_dtype,
        batch_invariant=batch_invariant,
    )
    shard_range = parse_shard(shard)
    check_batching(batch_size, shard_range)
    parse_dtype(dtype)
    parse_device(device)
    check_output(out, EXTRACT_KIND, overwrite=overwrite)
    source = open_source(data, on_error)
    loaded = diffprobe.load(model, dtype=dtype, device=device)
    root = run_extract(
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


# Commands of the analysis layers live beside their code, each module with a
# ``register(app)`` function: diffprobe/commands/<name>.py.
_COMMAND_MODULES = ("align", "anomalies", "lens")


def _register_commands() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"diffprobe.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"diffprobe.commands.{name}":
                raise
            continue
        module.register(app)


_register_commands()


# Options that take several values after one flag (``--sites a b c``), as the issue tracker's
# and the papers' command lines write them; click options take one value, so these are joined.
_VARIADIC = ("--sites",)


def join_variadic(argv: list[str]) -> list[str]:
    """``[..., "--sites", "a", "b", "--noise", ...]`` -> ``[..., "--sites", "a b", ...]``."""
    out: list[str] = []
    position = 0
    while position < len(argv):
        token = argv[position]
        out.append(token)
        position += 1
        if token in _VARIADIC:
            values = []
            while position < len(argv) and not argv[position].startswith("-"):
                values.append(argv[position])
                position += 1
            if values:
                out.append(" ".join(values))
    return out


DEBUG_HINT = "rerun with --debug for the traceback"
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def main(argv: list[str] | None = None) -> None:
    """The console entry point: every expected failure is one line on stderr and exit code 2;
    an unexpected one is one line and a hint (``--debug`` anywhere shows the traceback);
    Ctrl-C says what was kept and exits 130."""
    import click

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("DIFFPROBE_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        # outside standalone mode typer returns the code of an exit (130 for Ctrl-C)
        code = app(args=join_variadic(args), prog_name="diffprobe", standalone_mode=False)
    except click.exceptions.Exit as done:
        code = done.exit_code
    except click.ClickException as err:
        err.show()
        raise SystemExit(err.exit_code) from None
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        code = INTERRUPTED
    except DiffprobeError as err:
        if debug:
            raise
        typer.echo(f"error: {_one_line(err)}", err=True)
        raise SystemExit(2) from None
    except Exception as err:
        if debug:
            raise
        typer.echo(f"error: unexpected {type(err).__name__}: {_one_line(err)}", err=True)
        typer.echo(DEBUG_HINT, err=True)
        raise SystemExit(1) from None
    if code == INTERRUPTED:
        typer.echo(
            "interrupted: finished work is kept (an extraction keeps its finished chunks); run "
            "the same command again to go on",
            err=True,
        )
    if isinstance(code, int) and code:
        raise SystemExit(code)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    main()
