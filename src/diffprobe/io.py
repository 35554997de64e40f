"""Files and folders: the one atomic writer and the one rule for output folders.

**The writer.** Every file diffprobe writes goes to a temporary name in its folder and is renamed
into place, so it is either absent or complete whenever the process dies. Files get the mode
any tool's files get (0666 less the umask: 0644 by default), readable by colleagues on a shared
cluster; the temporary name is ``.<name>.<random>.partial``.

**The folder rule.** diffprobe writes into a folder only if it is new, empty, or carries
diffprobe's marker (``diffprobe-output.json``) for the same kind of output (an extraction run,
an alignment, a lens grid, ...). The marker lists every top-level entry diffprobe wrote there;
the writer adds an entry to the marker *before* it writes the entry, so a crash never leaves a
file of ours unlisted. ``overwrite`` removes only what the marker lists (and diffprobe's own
temporaries, and nested folders that are wholly diffprobe's), and refuses, deleting nothing, a
folder holding anything else, the home folder, ``/``, the current folder or a parent of it.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffprobe.errors import DiffprobeError

MARKER = "diffprobe-output.json"
PARTIAL = ".partial"


class OutputError(DiffprobeError):
    """An output folder diffprobe may not write into, or may not clear."""


# ----------------------------------------------------------------------------------- writer


def write_bytes(path: str | Path, data: bytes, *, record: bool = True) -> Path:
    """``data`` to ``path`` atomically. With ``record`` (the default) the parent folders are
    created and the top-level entry is first listed in the marker of the output folder that
    holds ``path``, if there is one; ``record=False`` is for writers that made the folder and
    listed it when they claimed the output (the store's chunk writes, thousands a run)."""
    with atomic_path(path, record=record) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, payload: Any, *, record: bool = True) -> Path:
    text = json.dumps(payload, indent=1, ensure_ascii=False, default=_json_default)
    return write_bytes(path, (text + "\n").encode("utf-8"), record=record)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)


def write_csv(
    path: str | Path,
    rows: list[dict],
    columns: list[str] | tuple[str, ...] | None = None,
    *,
    comments: list[str] | tuple[str, ...] = (),
    record: bool = True,
) -> Path:
    """Dict ``rows`` as a CSV file (atomically): ``columns`` in that order (default: the keys
    in first-seen order; keys outside ``columns`` are left out), floats with 6 significant
    digits, and each of ``comments`` first as a ``# ...`` line (read the file back with
    :func:`read_csv`, or ``pandas.read_csv(path, comment="#")``)."""
    rows = list(rows)
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    for line in comments:
        buffer.write(f"# {line}\n")
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore",
                            lineterminator="\n")  # fmt: skip
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return write_bytes(path, buffer.getvalue().encode("utf-8"), record=record)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) or getattr(getattr(value, "dtype", None), "kind", "") == "f":
        return f"{float(value):.6g}"
    return value


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file written by :func:`write_csv` (``#`` lines skipped; values as
    text)."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines()
             if not line.startswith("#")]  # fmt: skip
    return list(csv.DictReader(lines))


@contextlib.contextmanager
def atomic_path(path: str | Path, *, record: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` with the same suffix, for writers that take a file
    name (``figure.savefig``, ``image.save``, ``numpy.savez``); renamed to ``path`` when the
    block ends without an error, removed otherwise."""
    path = Path(path)
    if record:
        path.parent.mkdir(parents=True, exist_ok=True)
        _record(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{PARTIAL}{path.suffix}")
    try:
        yield temporary
        _widen_private(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def file_mode() -> int:
    """The mode any tool's new files get: 0666 less the process's umask (0644 under 022)."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def _widen_private(path: Path) -> None:
    """Give a file that nobody but its owner may read :func:`file_mode`: third-party writers
    make some privately (safetensors' ``save_file``, so ``save_pretrained``: 0600). Files
    opened the usual way already have that mode and cost one ``stat``."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode) and not mode & 0o077:
        os.chmod(path, file_mode())


def normalise_modes(folder: Path) -> None:
    """:func:`_widen_private` for every file under ``folder`` (a ``save_pretrained`` folder)."""
    for path in Path(folder).rglob("*"):
        _widen_private(path)


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and PARTIAL in name


def _record(path: Path) -> None:
    """List ``path``'s top-level entry in the marker of the nearest output folder above it."""
    for folder in path.parents:
        marker = read_marker(folder)
        if marker is None:
            continue
        name = path.relative_to(folder).parts[0]
        if name != MARKER and name not in marker["entries"]:
            marker["entries"] = sorted({*marker["entries"], name})
            _write_marker(folder, marker)
        return


# ----------------------------------------------------------------------------------- folders


def read_marker(folder: Path) -> dict | None:
    """The marker of ``folder``, or None where there is none (or it is not ours)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("entries"), list):
        return None
    if not isinstance(marker.get("kind"), str):
        return None
    return marker


def _write_marker(folder: Path, marker: dict) -> None:
    with atomic_path(folder / MARKER, record=False) as temporary:
        temporary.write_text(json.dumps(marker, indent=1) + "\n")


def _legacy_marker(folder: Path) -> dict | None:
    """Extraction runs written before markers existed: their run.json says what they are."""
    try:
        info = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or "identity" not in info or "sites" not in info:
        return None
    present = {p.name for p in folder.iterdir()} & {"run.json", "features.zarr", "progress"}
    return {"kind": "extract", "entries": sorted(present), "legacy": True}


def _marker_of(folder: Path) -> dict | None:
    return read_marker(folder) or _legacy_marker(folder)


def _foreign(folder: Path, marker: dict) -> list[str]:
    """Entries of ``folder`` that diffprobe did not write (its marker does not list them, and
    they are neither our temporaries nor nested folders wholly ours)."""
    found = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name == MARKER or _is_temporary(name):
            continue
        inner = _marker_of(entry) if entry.is_dir() and not entry.is_symlink() else None
        if inner is not None:
            # a nested output folder (listed here or not) is ours only if all it holds is
            if not _foreign(entry, inner):
                continue
        elif name in marker["entries"]:
            continue
        found.append(name)
    return found


def _show(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _protected(folder: Path) -> str | None:
    """Why ``folder`` may never be cleared, or None."""
    resolved = folder.resolve()
    if resolved == Path(resolved.anchor):
        return "it is the file system's root"
    if resolved == Path.home().resolve():
        return "it is your home folder"
    here = Path.cwd().resolve()
    if resolved == here:
        return "it is the current folder"
    if resolved in here.parents:
        return "it holds the current folder"
    return None


def check_output(
    folder: str | Path, kind: str, *, overwrite: bool = False, option: str = "--out"
) -> Path:
    """Raise :class:`OutputError` unless ``folder`` may receive an output of ``kind`` (and, with
    ``overwrite``, may be cleared of diffprobe's earlier output). Touches nothing: commands call
    it before any work, so a rejected command leaves nothing behind."""
    folder = Path(folder).expanduser()
    named = f"{option} {folder}"
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{named} is a file, not a folder; diffprobe writes a folder there: "
                          "choose a new folder path")  # fmt: skip
    if not folder.exists():
        parent = next((p for p in folder.absolute().parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise OutputError(f"{named}: {parent} is a file, so no folder can be made under it; "
                              "choose another path")  # fmt: skip
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{named}: cannot create it, {parent} is not writable for you; "
                              "choose a folder you can write to")  # fmt: skip
        return folder
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{named} is not writable for you; choose a folder you can write to")
    if overwrite:
        why = _protected(folder)
        if why is not None:
            raise OutputError(f"--overwrite refuses to clear {folder}: {why}; choose a folder "
                              "of its own for diffprobe's output")  # fmt: skip
    entries = [p.name for p in folder.iterdir()]
    if not entries:
        return folder
    marker = _marker_of(folder)
    if marker is None:
        raise OutputError(
            f"{named} already holds files diffprobe did not write ({_show(sorted(entries))}); "
            "diffprobe writes only into a new or empty folder or its own output of the same "
            "kind: choose another folder"
        )
    if marker["kind"] != kind:
        raise OutputError(
            f"{named} holds a diffprobe '{marker['kind']}' output, not '{kind}'; choose "
            "another folder"
        )
    if overwrite:
        foreign = _foreign(folder, marker)
        if foreign:
            raise OutputError(
                f"--overwrite refuses to clear {folder}: it holds entries diffprobe did not "
                f"write ({_show(foreign)}); nothing was deleted. Move them away or choose "
                "another folder"
            )
    return folder


def claim_output(
    folder: str | Path,
    kind: str,
    *,
    overwrite: bool = False,
    entries: tuple[str, ...] = (),
    option: str = "--out",
) -> Path:
    """Check ``folder`` (:func:`check_output`), clear diffprobe's earlier output from it with
    ``overwrite``, create it and write its marker listing ``entries`` (more are listed as they
    are written). Returns the folder."""
    folder = check_output(folder, kind, overwrite=overwrite, option=option)
    marker = _marker_of(folder) if folder.is_dir() else None
    if overwrite and marker is not None:
        for entry in sorted(folder.iterdir()):
            if entry.name == MARKER:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        marker = None
    if marker is None or marker.get("legacy"):
        marker = {
            "diffprobe": "output folder: diffprobe writes here only outputs of this kind, and "
            "--overwrite removes only the entries listed",
            "kind": kind,
            "version": _version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "entries": sorted(set(marker["entries"]) if marker else set()),
        }
    listed = sorted({*marker["entries"], *entries})
    if listed != marker["entries"] or not (folder / MARKER).is_file():
        if not folder.is_dir():
            # a folder made inside another diffprobe output is listed there (so that output's
            # --overwrite knows it as its own)
            folder.parent.mkdir(parents=True, exist_ok=True)
            _record(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_marker(folder, {**marker, "entries": listed})
    return folder


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffprobe")
    except PackageNotFoundError:  # run from a source tree (PYTHONPATH=src), not installed
        return "unknown (not installed)"


def versions() -> dict[str, str]:
    """The versions of diffprobe and the libraries whose numbers its outputs depend on, as
    recorded in every provenance file (``run.json``, ``lens.json``, SAE ``cfg.json``)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("diffprobe", "torch", "diffusers", "transformers", "zarr", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    import platform

    found["python"] = platform.python_version()
    return found
