"""``diffprobe report RUN [RUN...] --out report.html``: one self-contained HTML file with a
section per stage found in the runs (see :mod:`diffprobe.report.discover`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from diffprobe.errors import DiffprobeError
from diffprobe.io import versions, write_text
from diffprobe.report.discover import Stage, find_stages
from diffprobe.report.html import GENERATOR, esc, page, table
from diffprobe.report.sections import TITLES, section


class ReportError(DiffprobeError):
    """A report that cannot be written where it was asked."""


def check_report_path(out: str | Path, overwrite: bool = False) -> Path:
    """Where the report goes: a new file, or an earlier diffprobe report (replaced only with
    ``overwrite``). Anything else there is refused before any work."""
    path = Path(out)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"--out {out}: a report is one HTML file; name it *.html")
    if path.is_dir():
        raise ReportError(f"--out {out} is a folder; give a file name ending in .html")
    if path.exists():
        try:
            head = path.read_bytes()[:2000].decode("utf-8", "replace")
        except OSError as err:
            raise ReportError(f"--out {out}: cannot read the existing file ({err})") from None
        if GENERATOR not in head:
            raise ReportError(
                f"--out {out} exists and is not a diffprobe report; choose another name"
            )
        if not overwrite:
            raise ReportError(
                f"--out {out} holds an earlier report; pass --overwrite to replace it"
            )
    if not path.parent.exists():
        raise ReportError(f"--out {out}: the folder {path.parent} does not exist")
    return path


def collect(runs: Sequence[str | Path]) -> list[Stage]:
    """Every stage of every run (each run checked first: one bad name fails before any work)."""
    if not runs:
        raise ReportError("no run given; name at least one run folder")
    stages: list[Stage] = []
    for run in runs:
        stages += find_stages(run)
    return stages


def build_report(runs: Sequence[str | Path], title: str | None = None) -> str:
    """The report's HTML for ``runs`` (folders diffprobe wrote)."""
    began = time.perf_counter()
    stages = collect(runs)
    sections = []
    overview = [
        {"run": s.root.name, "stage": s.name, "kind": s.kind,
         "section": TITLES.get(s.kind, s.kind)}
        for s in stages
    ]  # fmt: skip
    for number, stage in enumerate(stages):
        heading, inner = section(stage)
        sections.append((f"s{number}-{stage.kind}", heading, inner))
    made = versions()
    seconds = time.perf_counter() - began
    contents = (
        "<p>Runs: " + ", ".join(esc(Path(r).resolve()) for r in runs) + "</p>"
        + table(overview, limit=200)
        + f"<p class='where'>made by diffprobe in {seconds:.1f} s with "
        + esc(", ".join(f"{k} {v}" for k, v in made.items())) + "</p>"
    )  # fmt: skip
    sections.insert(0, ("runs", "Runs and stages", contents))
    names = ", ".join(Path(r).resolve().name for r in runs)
    return page(title or f"diffprobe report: {names}", time.strftime("%Y-%m-%d %H:%M %Z"), sections)


def write_report(runs: Sequence[str | Path], out: str | Path, *, overwrite: bool = False,
                 title: str | None = None) -> Path:  # fmt: skip
    """Write the report of ``runs`` to ``out`` (atomically); returns its path."""
    path = check_report_path(out, overwrite)
    document = build_report(runs, title)
    return write_text(path, document)
