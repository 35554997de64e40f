"""Activation sources for SAE training and evaluation: every one yields token vectors
``(tokens, d_in)``.

- an array (numpy, torch, or a ``.npy`` file memory-mapped) of shape ``(tokens, d_in)``;
- zarr arrays of site activations: ``(items, channels, height, width)`` maps (every spatial
  position is a token), ``(items, tokens, channels)`` sequences or ``(items, channels)``
  vectors, such as a diffprobe run extracted with ``--pooling none`` (:func:`run_source`);
- any iterable of batches, each ``(tokens, d_in)`` (or a map or sequence as above), optionally
  as ``(batch, timestep)`` pairs; a function returning a fresh iterator makes it resumable.

A source hands out *blocks* in a seeded order per epoch; :class:`ShuffleBuffer` mixes blocks
(an image's tokens are alike) into training batches. Each token may carry a group label (its
timestep or noise key) so evaluation can report per timestep.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffprobe.sae.model import SAEError

Block = tuple[Tensor, Tensor | None]
"""``(tokens (n, d_in) float32, group index (n,) int64 or None)``."""


def to_tokens(activations: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Site activations -> ``(tokens, channels)`` and the function that puts token vectors
    back into the original layout. ``(items, channels, height, width)`` maps become
    channels-last tokens; ``(items, tokens, channels)`` and ``(tokens, channels)`` keep their
    last axis."""
    if activations.ndim == 4:
        items, channels, height, width = activations.shape
        tokens = activations.permute(0, 2, 3, 1).reshape(-1, channels)

        def back(values: Tensor) -> Tensor:
            return values.reshape(items, height, width, channels).permute(0, 3, 1, 2)

        return tokens, back
    if activations.ndim in (2, 3):
        shape = activations.shape
        return activations.reshape(-1, shape[-1]), lambda values: values.reshape(shape)
    raise SAEError(
        f"activations of shape {tuple(activations.shape)}: expected (items, channels, height, "
        "width), (items, tokens, channels) or (tokens, channels)"
    )


def channels_of(shape: tuple[int, ...]) -> int:
    """The channel count of a per-item activation ``shape`` as :func:`to_tokens` reads it."""
    return shape[1] if len(shape) == 4 else shape[-1]


def _as_tensor(values: Any, what: str) -> Tensor:
    if isinstance(values, Tensor):
        tensor = values.detach()
    else:
        array = np.asarray(values)
        if array.dtype.kind not in "fiu":
            raise SAEError(f"{what} holds {array.dtype} values; activations are numbers")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if not tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.to(torch.float32)


def _seeded(seed: int, *extra: int) -> torch.Generator:
    entropy = np.random.SeedSequence([seed, *extra]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(entropy))


@dataclass
class ActivationSource:
    """Base of the sources. ``n_tokens`` is None where unknown (an iterator)."""

    d_in: int = 0
    n_tokens: int | None = None
    groups: list[str] = field(default_factory=list)
    resumable: bool = True
    # True when blocks are already uniformly shuffled tokens (no buffer needed)
    shuffled: bool = False
    # what the activations are (model, site, branch, timesteps): the trained SAE's metadata
    metadata: dict = field(default_factory=dict)

    def blocks(self, epoch: int, seed: int, shuffle: bool = True) -> Iterator[Block]:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class ArraySource(ActivationSource):
    """Token vectors ``(tokens, d_in)`` in memory or memory-mapped; each epoch is a seeded
    permutation of all tokens (exact shuffling, no buffer)."""

    def __init__(
        self,
        array: Any,
        *,
        groups: list[str] | None = None,
        group_index: Any = None,
        name: str = "array",
        block_tokens: int = 4096,
    ):
        shape = tuple(getattr(array, "shape", ()))
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise SAEError(
                f"{name} has shape {shape}; training takes token vectors (tokens, d_in), or "
                "a run's (items, channels, height, width) maps through --run/--site"
            )
        dtype = getattr(array, "dtype", None)
        kind = getattr(dtype, "kind", None) or ("f" if isinstance(array, Tensor) else None)
        if kind is not None and kind not in "fiu":
            raise SAEError(f"{name} holds {dtype} values; activations are numbers")
        super().__init__(d_in=int(shape[1]), n_tokens=int(shape[0]), shuffled=True)
        self.array, self.name, self.block_tokens = array, name, block_tokens
        self.groups = list(groups or [])
        self.group_index = (
            None if group_index is None else torch.as_tensor(np.asarray(group_index)).long()
        )
        if self.group_index is not None and len(self.group_index) != self.n_tokens:
            raise SAEError(
                f"{name}: {len(self.group_index)} timestep labels for {self.n_tokens} tokens"
            )

    def blocks(self, epoch: int, seed: int, shuffle: bool = True) -> Iterator[Block]:
        order = (
            torch.randperm(self.n_tokens, generator=_seeded(seed, epoch))
            if shuffle
            else torch.arange(self.n_tokens)
        )
        for start in range(0, self.n_tokens, self.block_tokens):
            chosen = order[start : start + self.block_tokens]
            if isinstance(self.array, Tensor):
                values = self.array[chosen.to(self.array.device)]
            else:
                # numpy fancy indexing reads a memory-mapped file in index order: sort
                ascending, back = chosen.sort()
                values = np.asarray(self.array[ascending.numpy()])[back.argsort().numpy()]
            tags = None if self.group_index is None else self.group_index[chosen]
            yield _as_tensor(values, self.name), tags

    def describe(self) -> dict:
        return {"kind": "array", "name": self.name, "shape": [self.n_tokens, self.d_in]}


class MapSource(ActivationSource):
    """zarr (or numpy) arrays of per-item site activations, one per group (timestep or noise
    key); blocks of ``read_items`` items in a seeded order, converted to tokens."""

    def __init__(
        self,
        arrays: list[Any],
        groups: list[str] | None = None,
        *,
        name: str = "maps",
        read_items: int | None = None,
        describe: dict | None = None,
    ):
        if not arrays:
            raise SAEError(f"{name}: no arrays to read")
        shapes = {tuple(a.shape[1:]) for a in arrays}
        if len(shapes) != 1:
            raise SAEError(f"{name}: arrays of different per-item shapes {sorted(shapes)}")
        shape = shapes.pop()
        if len(shape) not in (1, 2, 3):
            raise SAEError(
                f"{name} has per-item shape {shape}; expected (channels, height, width), "
                "(tokens, channels) or (channels,)"
            )
        per_item = int(np.prod(shape)) // channels_of((0, *shape))
        total = sum(int(a.shape[0]) for a in arrays) * per_item
        super().__init__(d_in=channels_of((0, *shape)), n_tokens=total)
        self.arrays, self.name = arrays, name
        self.groups = list(groups) if groups else []
        self.read_items = read_items or _chunk_items(arrays[0])
        self._describe = describe or {"kind": "maps", "name": name}

    def blocks(self, epoch: int, seed: int, shuffle: bool = True) -> Iterator[Block]:
        pieces = [
            (g, start)
            for g, array in enumerate(self.arrays)
            for start in range(0, int(array.shape[0]), self.read_items)
        ]
        if shuffle:
            order = torch.randperm(len(pieces), generator=_seeded(seed, epoch)).tolist()
            pieces = [pieces[i] for i in order]
        for g, start in pieces:
            raw = np.asarray(self.arrays[g][start : start + self.read_items])
            if raw.dtype.kind == "f" and np.isnan(raw).any():
                raise SAEError(
                    f"{self.name}: items {start}-{start + len(raw) - 1} hold NaN (unfinished "
                    "extraction?); finish the run with the same extract command first"
                )
            tokens, _ = to_tokens(torch.from_numpy(np.ascontiguousarray(raw)))
            tags = torch.full((len(tokens),), g, dtype=torch.long) if self.groups else None
            yield tokens.to(torch.float32), tags

    def describe(self) -> dict:
        return {**self._describe, "tokens": self.n_tokens, "d_in": self.d_in}


def _chunk_items(array: Any) -> int:
    chunks = getattr(array, "chunks", None)
    return int(chunks[0]) if chunks else 32


class IterableSource(ActivationSource):
    """Batches from an iterable, for example activations captured during generation. Each
    element is ``(tokens, d_in)`` (or a map or sequence, :func:`to_tokens`), or a pair
    ``(batch, timestep)``. ``data`` may be a function returning a fresh iterator: then every
    epoch (and a resumed run) starts it again; a plain iterator gives one pass and cannot
    resume."""

    def __init__(self, data: Iterable | Callable[[], Iterable], *, name: str = "iterator"):
        super().__init__(d_in=0, n_tokens=None, resumable=callable(data))
        self.data, self.name = data, name
        self._used = False
        self._started: Iterator | None = None  # a one-pass iterator, its first batch read
        self._labels: dict[str, int] = {}

    def _iterator(self) -> Iterator:
        if callable(self.data):
            return iter(self.data())
        if self._used:
            raise SAEError(
                f"{self.name} is a one-pass iterator and was used up; pass a function that "
                "returns a fresh iterator to train more than one epoch or to resume"
            )
        self._used = True
        return self._started if self._started is not None else iter(self.data)

    def blocks(self, epoch: int, seed: int, shuffle: bool = True) -> Iterator[Block]:
        for element in self._iterator():
            timestep = None
            if isinstance(element, tuple):
                if len(element) != 2:
                    raise SAEError(
                        f"{self.name} yielded a tuple of {len(element)}; expected a batch or "
                        "(batch, timestep)"
                    )
                element, timestep = element
            tokens, _ = to_tokens(_as_tensor(element, self.name))
            if self.d_in == 0:
                self.d_in = tokens.shape[1]
            elif tokens.shape[1] != self.d_in:
                raise SAEError(
                    f"{self.name} yielded {tokens.shape[1]} channels after {self.d_in}; every "
                    "batch must come from the same site"
                )
            tags = None
            if timestep is not None:
                label = _label(timestep)
                if label not in self._labels:
                    self._labels[label] = len(self.groups)
                    self.groups.append(label)
                tags = torch.full((len(tokens),), self._labels[label], dtype=torch.long)
            yield tokens, tags

    def peek_d_in(self) -> int:
        """Read the first element to learn d_in (a one-pass iterator keeps it for later)."""
        if self.d_in == 0 and callable(self.data):
            for _ in self.blocks(0, 0):
                break
        elif self.d_in == 0:
            import itertools

            started = iter(self.data)
            first = next(started, None)
            if first is None:
                raise SAEError(f"{self.name} yielded nothing; it holds no activations")
            self._started = itertools.chain([first], started)
            element = first[0] if isinstance(first, tuple) else first
            self.d_in = int(to_tokens(_as_tensor(element, self.name))[0].shape[1])
        return self.d_in

    def describe(self) -> dict:
        return {"kind": "iterator", "name": self.name, "d_in": self.d_in}


def _label(timestep: Any) -> str:
    if isinstance(timestep, Tensor):
        timestep = timestep.item()
    if isinstance(timestep, float) and timestep.is_integer():
        timestep = int(timestep)
    return str(timestep)


def open_activations(path: str | Path) -> ArraySource:
    """A ``.npy`` file ``(tokens, d_in)``, memory-mapped; never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise SAEError(f"--activations {path}: no such file; pass a .npy file (tokens, d_in)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise SAEError(
            f"--activations {path} is not a readable .npy array ({' '.join(str(err).split())}); "
            "save one with numpy.save(path, array) of shape (tokens, d_in)"
        ) from None
    if not isinstance(array, np.ndarray):
        raise SAEError(f"--activations {path} holds several arrays; pass one .npy array")
    return ArraySource(array, name=f"--activations {path}")


def run_source(
    run: Any,
    site: str,
    noise: str | list[str] | None = None,
    condition: str | None = None,
) -> MapSource:
    """Every token of ``site`` in a diffprobe run extracted with ``--pooling none``: one
    group per noise key (all of the run's, or ``noise``), the ``condition`` stored (default:
    the conditional branch where guidance doubled the batch, else the only one)."""
    from diffprobe.extract.store import done_chunks, open_run

    run = open_run(run) if isinstance(run, (str, Path)) else run
    if run.info.get("pooling", "none") != "none":
        raise SAEError(
            f"run {run.root} was extracted with --pooling {run.info['pooling']}: one vector per "
            "item; SAE training needs every spatial token: extract with --pooling none"
        )
    if not run.complete:
        raise SAEError(
            f"run {run.root} is incomplete ({len(done_chunks(run.root))} of {run.n_chunks} "
            "chunks done); run the same extract command again to finish it"
        )
    if condition is None:
        conditional = [c for c in run.conditions if c.endswith(".cond")]
        condition = conditional[0] if conditional else run.conditions[0]
    keys = run.noise_keys if noise is None else [noise] if isinstance(noise, str) else noise
    arrays = [run.array(site, key, condition) for key in keys]
    branch = "cond" if condition.endswith(".cond") else "uncond" if condition.endswith(
        ".uncond") else "none"  # fmt: skip
    timesteps = {n["key"]: n.get("timestep") for n in run.info["noise"]}
    model = run.info.get("model", {})
    source = MapSource(
        arrays,
        groups=list(keys),
        name=f"run {run.root} site {site}",
        describe={
            "kind": "run",
            "run": str(run.root),
            "run_identity": run.info.get("identity"),
            "site": site,
            "condition": condition,
            "noise": list(keys),
        },
    )
    where = model.get("source")
    # SAELens's model_name is a hub id; a local pipeline folder is named by its alias
    local = where is None or Path(str(where)).exists()
    source.metadata = {
        "model_name": model.get("name") if local else where,
        "model_source": where,
        "site": site,
        "hook_name": site,
        "branch": branch,
        "timesteps": [timesteps.get(k) for k in keys],
        "noise_keys": list(keys),
        "scheduler": run.info.get("scheduler"),
        "site_semantics": "output",
    }
    return source


def as_source(data: Any, *, timesteps: Any = None) -> ActivationSource:
    """Any supported activation source -> an :class:`ActivationSource` (see the module)."""
    if isinstance(data, ActivationSource):
        return data
    if isinstance(data, (str, Path)):
        return open_activations(data)
    shape = getattr(data, "shape", None)
    if shape is not None:
        if len(shape) == 2:
            if timesteps is None:
                return ArraySource(data)
            labels = np.asarray(timesteps)
            groups, index = np.unique(labels.astype(str), return_inverse=True)
            return ArraySource(data, groups=list(groups), group_index=index)
        return MapSource([data], name="maps")
    if callable(data) or isinstance(data, Iterable):
        return IterableSource(data)
    raise SAEError(
        f"cannot read activations from {type(data).__name__}; pass an array (tokens, d_in), a "
        "zarr array of maps, a run through run_source(), or an iterable of batches"
    )


def fingerprint(payload: dict) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ShuffleBuffer:
    """Mix blocks into batches of exactly ``batch_size`` tokens: the buffer fills to
    ``capacity`` tokens, is permuted, and hands out its first half as batches (the rest waits
    for new blocks). With ``capacity`` 0 blocks are only re-cut into batches."""

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity, self.generator = capacity, generator

    def batches(self, blocks: Iterable[Block], batch_size: int) -> Iterator[Block]:
        values: list[Tensor] = []
        tags: list[Tensor | None] = []
        held = 0
        for block, tag in blocks:
            values.append(block)
            tags.append(tag)
            held += len(block)
            if held >= max(self.capacity, batch_size):
                pool, pool_tags = self._join(values, tags)
                if self.capacity:
                    order = torch.randperm(len(pool), generator=self.generator)
                    pool = pool[order]
                    pool_tags = None if pool_tags is None else pool_tags[order]
                keep = len(pool) - (len(pool) // 2 if self.capacity else len(pool))
                cut = ((len(pool) - keep) // batch_size) * batch_size
                for start in range(0, cut, batch_size):
                    yield pool[start : start + batch_size], _slice(pool_tags, start, batch_size)
                values, tags = [pool[cut:]], [None if pool_tags is None else pool_tags[cut:]]
                held = len(values[0])
        pool, pool_tags = self._join(values, tags) if values else (None, None)
        if pool is None or not len(pool):
            return
        if self.capacity:
            order = torch.randperm(len(pool), generator=self.generator)
            pool = pool[order]
            pool_tags = None if pool_tags is None else pool_tags[order]
        for start in range(0, len(pool) - batch_size + 1, batch_size):
            yield pool[start : start + batch_size], _slice(pool_tags, start, batch_size)

    @staticmethod
    def _join(values: list[Tensor], tags: list[Tensor | None]) -> tuple[Tensor, Tensor | None]:
        pool = torch.cat(values) if len(values) > 1 else values[0]
        if any(t is None for t in tags):
            return pool, None
        return pool, torch.cat(tags) if len(tags) > 1 else tags[0]


def _slice(tags: Tensor | None, start: int, size: int) -> Tensor | None:
    return None if tags is None else tags[start : start + size]


def batch_stream(
    source: ActivationSource,
    batch_size: int,
    seed: int,
    buffer_tokens: int,
    epochs: int | None,
) -> Iterator[Block]:
    """Batches over ``epochs`` passes (None: until the source ends, for a one-pass iterator;
    a re-creatable iterator is started again per epoch). Batches of consecutive epochs do not
    mix; the remainder of each epoch smaller than a batch is dropped."""
    epoch = 0
    while epochs is None or epoch < epochs:
        buffer = ShuffleBuffer(0 if source.shuffled else buffer_tokens, _seeded(seed, epoch, 1))
        count = 0
        for batch in buffer.batches(source.blocks(epoch, seed), batch_size):
            count += 1
            yield batch
        if count == 0 or (epochs is None and not source.resumable):
            return
        epoch += 1
