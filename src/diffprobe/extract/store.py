"""The run folder: ``run.json`` (provenance) + ``features.zarr`` (zarr v3) + ``progress/``.

Layout (documented in docs/store.md)::

    RUN/
      run.json                      identity, provenance, item manifest
      features.zarr/                zarr v3 group
        <site>/<condition>/<noise>  one array per (site, noise level, condition), items on axis 0
      progress/chunk-000012.done    written after every array of item chunk 12 is complete

``<site>`` is the site name with ``:`` written as ``~`` (``unet.down_blocks.1~res_samples``);
``<noise>`` is ``p0.1`` for noise level 0.1 or ``t250`` for timestep 250; ``<condition>`` is the
condition's name, with ``.cond`` / ``.uncond`` appended when classifier-free guidance doubled the
batch. Every file is written atomically (temporary file, then rename; ``RunStore``), and
a chunk counts as finished only when its ``.done`` marker exists, so a run killed at any moment
resumes without recomputing finished chunks and never reads a half-written one.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffprobe.errors import DiffprobeError
from diffprobe.io import write_bytes, write_json

RUN_JSON = "run.json"
# run.json's "format"; each names where an array lives in features.zarr. Format 1 nested the
# noise level above the condition: a group per (site, noise level), 90 folders and documents
# more for the benchmark's 9 x 11 grid than a group per (site, condition) (docs/store.md).
RUN_FORMAT = "diffprobe-run/2"
ARRAY_PATHS = {
    "diffprobe-run/1": "{site}/{noise}/{condition}",
    "diffprobe-run/2": "{site}/{condition}/{noise}",
}
FEATURES = "features.zarr"
PROGRESS = "progress"
# zarr v3's default chunk keys, with "." between the parts: chunk k of an array is the file
# c.<k>.0 (more zeros for more dimensions) in the array's folder, two folders fewer per array
# than c/<k>/0; every file-system entry is slow to create on some disks (docs/store.md).
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}


class StoreError(DiffprobeError):
    pass


def site_key(site: str) -> str:
    return site.replace(":", "~")


def site_from_key(key: str) -> str:
    return key.replace("~", ":")


def noise_key(noise_level: float | None = None, timestep: float | None = None) -> str:
    if noise_level is not None:
        return f"p{noise_level:g}"
    return f"t{timestep:g}"


def run_format(info: dict) -> str:
    """The layout a run.json describes (the first runs wrote no ``format``)."""
    return info.get("format", "diffprobe-run/1")


def array_path(site: str, noise: str, condition: str, run_format: str = RUN_FORMAT) -> str:
    """Where the array of (site, noise key, stored condition) lives inside ``features.zarr``."""
    if run_format not in ARRAY_PATHS:
        raise StoreError(
            f"run format {run_format!r} is not one this diffprobe reads "
            f"({', '.join(ARRAY_PATHS)}); update diffprobe"
        )
    return ARRAY_PATHS[run_format].format(site=site_key(site), noise=noise, condition=condition)


class RunStore:
    """Writer side of a run folder (used by the extraction engine).

    zarr describes every file and the files are written here directly. Each array's metadata
    document and chunk keys come from an array of the same shape that zarr creates in memory,
    and the last chunk zarr encodes there is compared byte for byte with this module's
    encoding (uncompressed: the rows in C order, little-endian, a short last chunk padded with
    the fill value). Then a chunk of all arrays is plain file writes, each to a temporary name
    renamed into place, as zarr's local store does. Through zarr's API the 99 arrays of the
    benchmark grid took 80-87 ms to create and write on tmpfs (an event-loop round trip and a
    worker thread per file), more than a tenth of the denoiser passes of a small model; written
    here, 12-13 ms (docs/performance.md). Anything reads the result with zarr.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.features = self.root / FEATURES
        (self.root / PROGRESS).mkdir(parents=True, exist_ok=True)
        self._arrays: dict[str, _Layout] = {}
        self._folders: set[Path] = set()
        self._groups: set[str] = set()
        self._ensure_group("")

    def write_rows(
        self,
        features: dict[str, np.ndarray],
        first: int,
        n_items: int,
        chunk_items: int,
        dtype: str,
        workers: int = 1,
    ) -> None:
        """Write item chunk ``first // chunk_items`` (rows ``first ...``) of many arrays,
        creating the arrays that do not exist yet. ``first`` starts a chunk, and the rows fill it
        (the last chunk of the run may be shorter). ``workers`` threads share the arrays."""
        if first % chunk_items:
            raise StoreError(f"rows from {first} do not start a chunk of {chunk_items} items")
        if workers > 1 and len(features) > 1:
            from concurrent.futures import ThreadPoolExecutor

            items = list(features.items())
            shares = [dict(items[i::workers]) for i in range(min(workers, len(items)))]
            with ThreadPoolExecutor(len(shares), "diffprobe-store") as pool:
                for done in [pool.submit(self.write_rows, share, first, n_items, chunk_items,
                                         dtype) for share in shares]:  # fmt: skip
                    done.result()
            return
        chunk = first // chunk_items
        for path, values in features.items():
            layout = self._arrays.get(path) or self._open_or_create(
                path, values.shape[1:], n_items, chunk_items, dtype
            )
            if len(values) != min(chunk_items, n_items - first):
                raise StoreError(
                    f"{len(values)} rows for chunk {chunk} of {path}; it holds "
                    f"{min(chunk_items, n_items - first)}"
                )
            self._write(self.features / path / layout.chunk_key(chunk), layout.encode(values))

    def _open_or_create(
        self, path: str, shape: tuple[int, ...], n_items: int, chunk_items: int, dtype: str
    ) -> _Layout:
        """The array at ``path`` with per-item ``shape``: checked if it exists (resuming, or
        another shard made it), created otherwise, its parent groups too."""
        layout = _layout(tuple(shape), n_items, chunk_items, dtype)
        document = self.features / path / "zarr.json"
        if document.is_file():
            found = json.loads(document.read_text())
            if any(found.get(k) != v for k, v in layout.identity.items()):
                raise StoreError(
                    f"array {path} in {self.root} has shape {found.get('shape')} and chunks "
                    f"{found.get('chunk_grid', {}).get('configuration', {}).get('chunk_shape')}, "
                    f"expected {layout.identity['shape']} and {[chunk_items, *shape]} "
                    "(or other codecs); the run folder holds a different extraction "
                    "(--overwrite)"
                )
        else:
            parts = path.split("/")
            for depth in range(1, len(parts)):
                self._ensure_group("/".join(parts[:depth]))
            # two shards may both write it: the same bytes, renamed into place
            self._write(document, layout.document)
        self._arrays[path] = layout
        return layout

    def _ensure_group(self, path: str) -> None:
        if path in self._groups:
            return
        document = self.features / path / "zarr.json"
        if not document.is_file():
            self._write(document, _group_document())
        self._groups.add(path)

    def _write(self, path: Path, data: bytes) -> None:
        folder = path.parent
        if folder not in self._folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._folders.add(folder)
        write_bytes(path, data, record=False)

    def marker(self, chunk: int) -> Path:
        return self.root / PROGRESS / f"chunk-{chunk:06d}.done"

    def is_done(self, chunk: int) -> bool:
        return self.marker(chunk).is_file()

    def mark_done(self, chunk: int, info: dict) -> None:
        write_json(self.marker(chunk), info, record=False)


@functools.cache
def _group_document() -> bytes:
    import zarr

    files: dict = {}
    zarr.create_group(zarr.storage.MemoryStore(files), zarr_format=3)
    return files["zarr.json"].to_bytes()


@functools.lru_cache(maxsize=256)
def _layout(shape: tuple[int, ...], n_items: int, chunk_items: int, dtype: str) -> _Layout:
    return _Layout(shape, n_items, chunk_items, dtype)


class _Layout:
    """How zarr lays out an array of ``(n_items, *shape)`` in chunks of ``chunk_items`` items:
    its metadata document, chunk keys and chunk bytes, taken from an array zarr makes in memory.
    """

    def __init__(self, shape: tuple[int, ...], n_items: int, chunk_items: int, dtype: str):
        import zarr

        self.chunk_items = chunk_items
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.fill = np.nan if self.dtype.kind == "f" else 0
        files: dict = {}
        array = zarr.create_array(
            zarr.storage.MemoryStore(files),
            shape=(n_items, *shape),
            chunks=(chunk_items, *shape),
            dtype=dtype,
            fill_value=self.fill,
            # uncompressed: zstd saves about 8 % on float activations and costs CPU time that
            # the denoiser needs (docs/store.md)
            compressors=None,
            chunk_key_encoding=CHUNK_KEY_ENCODING,
        )
        self.document = files["zarr.json"].to_bytes()
        described = json.loads(self.document)
        self.identity = {k: described[k] for k in ("shape", "data_type", "chunk_grid", "codecs")}
        self._metadata = array.metadata
        self._tail = (0,) * len(shape)
        # the check: zarr's bytes for the last chunk (full, or short and padded) of the array
        last = (n_items - 1) // chunk_items
        count = n_items - last * chunk_items
        rows = (np.arange(count * int(np.prod(shape))) % 251).astype(dtype).reshape(count, *shape)
        array[last * chunk_items :] = rows
        if files[self.chunk_key(last)].to_bytes() != self.encode(rows):
            raise StoreError(
                f"zarr {zarr.__version__} encodes a {dtype} chunk differently from diffprobe's "
                "writer; please report this with your zarr version"
            )

    def chunk_key(self, chunk: int) -> str:
        return self._metadata.encode_chunk_key((chunk, *self._tail))

    def encode(self, rows: np.ndarray) -> bytes:
        if len(rows) == self.chunk_items:
            return np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        block = np.full((self.chunk_items, *rows.shape[1:]), self.fill, dtype=self.dtype)
        block[: len(rows)] = rows
        return block.tobytes()


def done_chunks(root: Path) -> set[int]:
    folder = Path(root) / PROGRESS
    if not folder.is_dir():
        return set()
    return {int(p.stem.split("-")[1].split(".")[0]) for p in folder.glob("chunk-*.done")}


@dataclass
class ChunkedRun:
    """What the readers of every chunked run folder share: its ``run.json`` (``info``) with
    ``sites``, ``items`` and ``chunk_items``, and the chunk markers under ``progress/``."""

    root: Path
    info: dict

    @property
    def sites(self) -> list[str]:
        return list(self.info["sites"])

    @property
    def n_chunks(self) -> int:
        return -(-len(self.info["items"]) // self.info["chunk_items"])

    @property
    def chunks_done(self) -> int:
        return len(done_chunks(self.root))

    @property
    def complete(self) -> bool:
        return self.chunks_done == self.n_chunks


@dataclass
class Run(ChunkedRun):
    """Reader side: ``diffprobe.open_run(RUN)``."""

    @property
    def noise_keys(self) -> list[str]:
        return [n["key"] for n in self.info["noise"]]

    @property
    def conditions(self) -> list[str]:
        return list(self.info["stored_conditions"])

    @property
    def manifest(self) -> list[dict]:
        return self.info["items"]

    @property
    def labels(self) -> list[str]:
        return [item["label"] for item in self.manifest]

    def keys(self) -> list[tuple[str, str, str]]:
        return [(s, n, c) for s in self.sites for n in self.noise_keys for c in self.conditions]

    @property
    def format(self) -> str:
        return run_format(self.info)

    def array(self, site: str, noise: str | float, condition: str | None = None):
        """The zarr array of one (site, noise, condition), read lazily (slice it to read rows);
        unfinished items read as NaN."""
        import zarr

        noise = noise if isinstance(noise, str) else noise_key(noise_level=noise)
        condition = condition or self.conditions[0]
        if site not in self.sites:
            raise StoreError(f"site '{site}' is not in {self.root}; it has {', '.join(self.sites)}")
        if noise not in self.noise_keys:
            raise StoreError(
                f"noise '{noise}' is not in {self.root}; it has {', '.join(self.noise_keys)}"
            )
        if condition not in self.conditions:
            raise StoreError(
                f"condition '{condition}' is not in {self.root}; it has {', '.join(self.conditions)}"
            )
        path = array_path(site, noise, condition, self.format)
        try:
            group = zarr.open_group(str(self.root / FEATURES), mode="r", zarr_format=3)
            return group[path]
        except Exception as err:  # noqa: BLE001 - zarr raises many kinds for damaged stores
            raise StoreError(
                f"cannot read array {path} of run {self.root} ({type(err).__name__}: "
                f"{' '.join(str(err).split())}); its {FEATURES} is damaged or was changed by "
                "hand: extract again into a new folder"
            ) from None

    def get(
        self,
        site: str,
        noise: str | float,
        condition: str | None = None,
        allow_incomplete: bool = False,
    ) -> np.ndarray:
        """Features (items, ...) of one (site, noise, condition) as a numpy array."""
        if not allow_incomplete and not self.complete:
            raise StoreError(
                f"run {self.root} is incomplete ({self.chunks_done} of {self.n_chunks} chunks done); run the "
                "same extract command again to finish it, or pass allow_incomplete=True "
                "(unfinished items are NaN)"
            )
        return np.asarray(self.array(site, noise, condition)[...])

    def xarray(self, site: str, noise: str | float, condition: str | None = None):
        """The same as :meth:`get`, as an ``xarray.DataArray`` labelled by item id and label."""
        import xarray as xr

        values = self.get(site, noise, condition)
        dims = ["item"] + [f"dim_{i}" for i in range(1, values.ndim)]
        if values.ndim == 2:
            dims[1] = "channel"
        elif values.ndim == 4:
            dims[1:] = ["channel", "height", "width"]
        elif values.ndim == 3:
            dims[1:] = ["token", "channel"]
        return xr.DataArray(
            values,
            dims=dims,
            coords={"item": [m["id"] for m in self.manifest], "label": ("item", self.labels)},
            name=f"{site}/{noise}/{condition or self.conditions[0]}",
        )


# what readers take from run.json, and the type each must have
RUN_JSON_FIELDS = {
    "sites": list,
    "noise": list,
    "stored_conditions": list,
    "items": list,
    "chunk_items": int,
}


def open_run(root: str | Path) -> Run:
    """Open a run folder written by ``diffprobe extract``; :class:`StoreError` naming the folder
    when it is missing, its ``run.json`` is malformed or its ``features.zarr`` is gone."""
    root = Path(root)
    path = root / RUN_JSON
    if not root.exists():
        raise StoreError(f"run folder {root} does not exist; pass a folder written by extract")
    if not root.is_dir():
        raise StoreError(f"{root} is a file, not a run folder; pass a folder written by extract")
    if not path.is_file():
        raise StoreError(f"{root} is not a diffprobe run folder (no {RUN_JSON})")
    damaged = f"run folder {root} is damaged: its {RUN_JSON}"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(
            f"{damaged} is not valid JSON ({err}); extract again into a new folder"
        ) from None
    if not isinstance(info, dict):
        raise StoreError(f"{damaged} holds {type(info).__name__}, not an object; extract again")
    wrong = [
        name
        for name, kind in RUN_JSON_FIELDS.items()
        if not isinstance(info.get(name), kind) or isinstance(info.get(name), bool)
    ]
    if not wrong:
        entries = {"noise": "key", "items": "id"}
        wrong = [f for f, key in entries.items() if not all(isinstance(e, dict) and key in e
                                                           for e in info[f])]  # fmt: skip
    if wrong or info["chunk_items"] < 1:
        raise StoreError(
            f"{damaged} lacks or has malformed {', '.join(wrong or ['chunk_items'])}; extract "
            "again into a new folder"
        )
    if run_format(info) not in ARRAY_PATHS:
        raise StoreError(
            f"run folder {root}: run format {run_format(info)!r} is not one this diffprobe "
            f"reads ({', '.join(ARRAY_PATHS)}); update diffprobe"
        )
    if not (root / FEATURES / "zarr.json").is_file():
        raise StoreError(
            f"run folder {root} has no {FEATURES} (its features store is missing or was "
            "deleted); extract again into a new folder"
        )
    return Run(root, info)
