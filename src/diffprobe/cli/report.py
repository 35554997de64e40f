"""``diffprobe report`` (one self-contained HTML file of runs) and ``diffprobe inspect`` (the
local web inspector with the labelling tool)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import setup

Runs = Annotated[list[Path], typer.Argument(help="run folders (any folder diffprobe wrote)")]


def report_command(
    runs: Runs,
    out: Annotated[Path, typer.Option(help="the HTML file to write")] = Path("report.html"),
    title: Annotated[str | None, typer.Option(help="the report's title")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an earlier report at --out")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No logs.")] = False,
) -> None:
    """Write one self-contained HTML report of RUNS (images inlined, no network requests):
    a section per stage found in them. Prints the report's path."""
    setup(quiet)
    from diffprobe.report.build import check_report_path, write_report

    check_report_path(out, overwrite)
    path = write_report(runs, out, overwrite=overwrite, title=title)
    typer.echo(str(path))


def inspect_command(
    runs: Runs,
    host: Annotated[
        str | None,
        typer.Option(
            help="address to listen on (default 127.0.0.1; another is served with a warning)"
        ),  # fmt: skip
    ] = None,
    port: Annotated[int, typer.Option(help="port (0: any free port)")] = 8765,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No request log.")] = False,
) -> None:
    """Serve a local web inspector of RUNS: runs and stages, feature browser, anomaly labelling
    tool, alignment and lens views, two runs side by side. Only files inside RUNS are served;
    labels are written into the runs' anomaly stages. Ctrl-C stops it."""
    setup(quiet)
    from diffprobe.app.safety import AddressError
    from diffprobe.app.server import make_server, url_of
    from diffprobe.app.views import RunRef, StageRef
    from diffprobe.report.discover import find_stages

    if not 0 <= port <= 65535:
        raise AddressError(f"--port {port}: a port is a number from 0 to 65535")
    refs = []
    for run in runs:
        stages = find_stages(run)
        refs.append(RunRef(stages[0].root, [StageRef(s.kind, s.path, s.name) for s in stages]))
    try:
        server = make_server(refs, host or "127.0.0.1", port, allow_remote=host is not None,
                             quiet=quiet)  # fmt: skip
    except OSError as err:
        raise AddressError(
            f"cannot listen on {host or '127.0.0.1'}:{port} ({err.strerror or err}); choose "
            "another --port"
        ) from None
    typer.echo(f"diffprobe inspect: {url_of(server)} (Ctrl-C stops it)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
    app.command("inspect")(inspect_command)
