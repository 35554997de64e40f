"""Find the stages inside run folders: every folder diffprobe wrote carries a marker
(``diffprobe-output.json``) that names its kind (``extract``, ``align``, ``anomalies``, ``lens``,
``sae``, ...); extraction runs written before markers existed are known by ``run.json``.

The report and the inspector both start here, so what they show is decided by what is on disk,
not by a list of stages: a kind this module has never heard of is still found and shown by the
generic section (its figures, JSON summaries and tables).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from diffprobe.errors import DiffprobeError
from diffprobe.io import MARKER, read_marker

# Kinds in the order the report shows them; unknown kinds come after, by name.
KIND_ORDER = (
    "demo",
    "extract",
    "train-tiny",
    "align",
    "probe",
    "regress",
    "anomalies",
    "lens",
    "features",
    "features-analysis",
    "sae",
    "dream",
    "steer",
    "hspace",
    "attribution",
)
# Kinds that only feed other stages and say nothing on their own.
QUIET_KINDS = ("things-export", "report")
# Folders never entered: the feature store (thousands of chunk files) and hidden folders.
_SKIP_SUFFIXES = (".zarr",)
_MAX_FOLDERS = 4000


class RunError(DiffprobeError):
    """A run folder that cannot be shown."""


@dataclass
class Stage:
    """One output folder of a run: its ``kind``, where it is, and its marker."""

    kind: str
    path: Path
    root: Path  # the run folder it was found in (what the user named)
    marker: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The stage's path relative to its run (``.`` for the run folder itself)."""
        relative = self.path.relative_to(self.root).as_posix()
        return relative or "."

    @property
    def label(self) -> str:
        return f"{self.kind}: {self.root.name}/{self.name}".removesuffix("/.")


def _kind_of(folder: Path) -> tuple[str, dict] | None:
    marker = read_marker(folder)
    if marker is not None:
        return marker["kind"], marker
    if (folder / "run.json").is_file():
        try:
            info = json.loads((folder / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(info, dict) and "sites" in info:
            return "extract", {"kind": "extract", "legacy": True}
    return None


def check_run(path: str | Path) -> Path:
    """The resolved folder of a run named by the user; one clear line when it is not one."""
    folder = Path(path)
    if not folder.exists():
        raise RunError(f"run {path}: no such folder; give a folder diffprobe wrote (a run)")
    if not folder.is_dir():
        raise RunError(f"run {path}: not a folder; give a folder diffprobe wrote (a run)")
    return folder.resolve()


def find_stages(run: str | Path, max_depth: int = 4) -> list[Stage]:
    """Every stage folder at most ``max_depth`` levels inside ``run`` (the run itself
    included), in report order. Symbolic links are not followed; stores are not entered; the
    cropped-image runs the anomaly stage makes for itself are left out."""
    root = check_run(run)
    found: list[Stage] = []
    queue = [(root, 0)]
    visited = 0
    while queue and visited < _MAX_FOLDERS:
        folder, depth = queue.pop(0)
        visited += 1
        kind = _kind_of(folder)
        if kind is not None and kind[0] not in QUIET_KINDS:
            parent = _kind_of(folder.parent) if folder != root else None
            inner_crop = parent is not None and parent[0] == "anomalies"
            if not (kind[0] == "extract" and inner_crop and folder.name.startswith("cropped")):
                found.append(Stage(kind[0], folder, root, kind[1]))
        if depth >= max_depth:
            continue
        try:
            children = sorted(folder.iterdir())
        except OSError:
            continue
        for child in children:
            if child.is_symlink() or not child.is_dir() or child.name.startswith("."):
                continue
            if child.name.endswith(_SKIP_SUFFIXES) or child.name == "progress":
                continue
            queue.append((child, depth + 1))
    if not found:
        raise RunError(
            f"run {run}: no diffprobe output in it (no {MARKER} or run.json within "
            f"{max_depth} levels); give a folder diffprobe wrote"
        )
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    return sorted(found, key=lambda s: (order.get(s.kind, len(order)), s.kind, s.name))


def read_json(path: Path) -> dict | list | None:
    """A JSON file, or None where it is missing or broken (the report shows what it can)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
