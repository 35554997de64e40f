"""The run folder: ``run.json`` (provenance) + ``features.zarr`` (zarr v3) + ``progress/``.

Layout (documented in docs/store.md)::

    RUN/
      run.json                      identity, provenance, item manifest
      features.zarr/                zarr v3 group
        <site>/<noise>/<condition>  one array per (site, noise level, condition), items on axis 0
      progress/chunk-000012.done    written after every array of item chunk 12 is complete

``<site>`` is the site name with ``:`` written as ``~`` (``unet.down_blocks.1~res_samples``);
``<noise>`` is ``p0.1`` for noise level 0.1 or ``t250`` for timestep 250; ``<condition>`` is the
condition's name, with ``.cond`` / ``.uncond`` appended when classifier-free guidance doubled the
batch. Chunk files are written atomically by zarr's LocalStore (temporary file, then rename), and
a chunk counts as finished only when its ``.done`` marker exists, so a run killed at any moment
resumes without recomputing finished chunks and never reads a half-written one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffprobe.errors import DiffprobeError

RUN_JSON = "run.json"
FEATURES = "features.zarr"
PROGRESS = "progress"


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


def array_path(site: str, noise: str, condition: str) -> str:
    return f"{site_key(site)}/{noise}/{condition}"


def write_json_atomic(path: Path, payload: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1, sort_keys=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class RunStore:
    """Writer side of a run folder (used by the extraction engine)."""

    def __init__(self, root: str | Path):
        import zarr

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / PROGRESS).mkdir(exist_ok=True)
        path = str(self.root / FEATURES)
        try:
            self.group = zarr.open_group(path, mode="a", zarr_format=3)
        except zarr.errors.ContainsGroupError:
            # another shard created the group between our look and our create: open theirs
            self.group = zarr.open_group(path, mode="r+", zarr_format=3)
        self._async_arrays: dict[str, Any] = {}

    def write_rows(
        self,
        features: dict[str, np.ndarray],
        first: int,
        n_items: int,
        chunk_items: int,
        dtype: str,
    ) -> None:
        """Write rows ``first ...`` of many arrays, creating missing ones, in at most two round
        trips to zarr's event loop: missing arrays are created together with ``create_hierarchy`` (one
        existence check and one metadata document per node), then all rows are written
        concurrently. A chunk's store time is mostly zarr's per-call overhead, so batching
        is what keeps it small (docs/performance.md)."""
        import asyncio

        from zarr.core.sync import sync

        missing = {
            path: values.shape[1:]
            for path, values in features.items()
            if path not in self._async_arrays
        }
        if missing:
            self._async_arrays.update(self._open_or_create(missing, n_items, chunk_items, dtype))

        async def write_all() -> None:
            await asyncio.gather(*[
                self._async_arrays[path].setitem(slice(first, first + len(values)),
                                                 values.astype(dtype, copy=False))
                for path, values in features.items()
            ])  # fmt: skip

        sync(write_all())

    def _open_or_create(
        self, shapes: dict[str, tuple[int, ...]], n_items: int, chunk_items: int, dtype: str
    ) -> dict[str, Any]:
        """The arrays ``shapes`` names (path -> per-item shape), opened or created."""
        import asyncio

        import zarr
        from zarr.core.sync import sync

        group = self.group._async_group

        def options(shape: tuple[int, ...]) -> dict[str, Any]:
            return dict(
                shape=(n_items, *shape),
                chunks=(chunk_items, *shape),
                dtype=dtype,
                fill_value=np.nan if np.dtype(dtype).kind == "f" else 0,
                # uncompressed: zstd saves about 8 % on float activations and costs CPU time
                # that the denoiser needs (docs/store.md)
                compressors=None,
            )

        # the metadata document of a new array of each shape, built once in memory
        templates = {
            shape: zarr.create_array(zarr.storage.MemoryStore(), **options(shape)).metadata
            for shape in set(shapes.values())
        }

        async def create_all() -> dict[str, Any]:
            nodes = {path: templates[shape] for path, shape in shapes.items()}
            return {
                path: node async for path, node in group.create_hierarchy(nodes) if path in shapes
            }  # (the parent groups it creates are yielded too)

        async def open_or_create(path: str):
            try:
                return await group.getitem(path)
            except KeyError:
                try:
                    return await group.create_array(path, **options(shapes[path]))
                except zarr.errors.ContainsArrayError:  # another shard was first
                    return await group.getitem(path)

        async def open_or_create_all() -> dict[str, Any]:
            return dict(
                zip(shapes, await asyncio.gather(*map(open_or_create, shapes)), strict=True)
            )

        try:
            arrays = sync(create_all())
        except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError):
            # resuming, or another shard created some: open what exists, create what does not
            arrays = sync(open_or_create_all())
        for path, array in arrays.items():
            if tuple(array.shape) != (n_items, *shapes[path]) or array.chunks[0] != chunk_items:
                raise StoreError(
                    f"array {path} in {self.root} has shape {tuple(array.shape)}, expected "
                    f"{(n_items, *shapes[path])}; the run folder holds a different extraction "
                    "(--overwrite)"
                )
        # every chunk is written whole, so zarr's check for chunks that equal the fill value
        # (a NaN-aware comparison of every value) is pure cost
        return {
            path: array.with_config({"write_empty_chunks": True}) for path, array in arrays.items()
        }

    def marker(self, chunk: int) -> Path:
        return self.root / PROGRESS / f"chunk-{chunk:06d}.done"

    def is_done(self, chunk: int) -> bool:
        return self.marker(chunk).is_file()

    def mark_done(self, chunk: int, info: dict) -> None:
        write_json_atomic(self.marker(chunk), info)


def done_chunks(root: Path) -> set[int]:
    folder = Path(root) / PROGRESS
    if not folder.is_dir():
        return set()
    return {int(p.stem.split("-")[1].split(".")[0]) for p in folder.glob("chunk-*.done")}


@dataclass
class Run:
    """Reader side: ``diffprobe.open_run(RUN)``."""

    root: Path
    info: dict

    @property
    def sites(self) -> list[str]:
        return list(self.info["sites"])

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

    @property
    def n_chunks(self) -> int:
        return -(-len(self.manifest) // self.info["chunk_items"])

    @property
    def complete(self) -> bool:
        return len(done_chunks(self.root)) == self.n_chunks

    def keys(self) -> list[tuple[str, str, str]]:
        return [(s, n, c) for s in self.sites for n in self.noise_keys for c in self.conditions]

    def _array(self, site: str, noise: str | float, condition: str | None):
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
        group = zarr.open_group(str(self.root / FEATURES), mode="r", zarr_format=3)
        return group[array_path(site, noise, condition)]

    def get(
        self,
        site: str,
        noise: str | float,
        condition: str | None = None,
        allow_incomplete: bool = False,
    ) -> np.ndarray:
        """Features (items, ...) of one (site, noise, condition) as a numpy array."""
        if not allow_incomplete and not self.complete:
            done = len(done_chunks(self.root))
            raise StoreError(
                f"run {self.root} is incomplete ({done} of {self.n_chunks} chunks done); run the "
                "same extract command again to finish it, or pass allow_incomplete=True "
                "(unfinished items are NaN)"
            )
        return np.asarray(self._array(site, noise, condition)[...])

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


def open_run(root: str | Path) -> Run:
    """Open a run folder written by ``diffprobe extract``."""
    root = Path(root)
    path = root / RUN_JSON
    if not path.is_file():
        raise StoreError(f"{root} is not a diffprobe run folder (no {RUN_JSON})")
    return Run(root, json.loads(path.read_text()))
