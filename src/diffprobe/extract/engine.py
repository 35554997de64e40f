"""The grid engine: items × noise levels × conditions -> one denoiser pass each -> the store.

For every chunk of items: the images are encoded once (shared by all noise levels and
conditions); for every condition the prompts are encoded once; for every noise level each batch
gets one denoiser pass that captures all sites and stops after the deepest one. Features are
pooled on the model's device, then written to the chunk of every array, and the chunk is marked
done. Shards take every n-th chunk, so n processes fill disjoint chunks of one store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from diffprobe.data.sources import Source, read_captions
from diffprobe.determinism import batch_invariant
from diffprobe.extract.plan import (
    ExtractionError,
    ExtractionPlan,
    check_batching,
    check_denoiser_sites,
    check_schedule,
    pool_fn,
    protocol_info,
    protocol_latent_shape,
    protocol_noise,
    resolved_grid,
)
from diffprobe.extract.store import (
    FEATURES,
    PROGRESS,
    RUN_FORMAT,
    RUN_JSON,
    RunStore,
    array_path,
    run_format,
)
from diffprobe.hooks.compiled import is_compiled
from diffprobe.hooks.engine import capture
from diffprobe.io import check_output, claim_output, versions, write_json
from diffprobe.models.base import Model, item_noise

log = logging.getLogger(__name__)

EXTRACT_KIND = "extract"
RUN_ENTRIES = (RUN_JSON, FEATURES, PROGRESS)


def _versions() -> dict:
    return versions()


def _model_info(model: Model) -> dict:
    config = getattr(model.pipe, "config", {}) or {}
    info = {
        "name": model.name,
        "family": model.family,
        "pipeline": type(model.pipe).__name__,
        "source": model.spec.source if model.spec else config.get("_name_or_path"),
        "revision": config.get("_commit_hash") if hasattr(config, "get") else None,
        "dtype": str(model.dtype).removeprefix("torch."),
        "denoiser_parameters": sum(p.numel() for p in model.denoiser.parameters()),
        "weights_fingerprint": weights_fingerprint(model.denoiser),
    }
    # compiled kernels round differently: a run is not resumed across the switch (the key is
    # absent when eager, so earlier runs keep their identity)
    if is_compiled(model.denoiser):
        info["compiled"] = True
    return info


def weights_fingerprint(module: torch.nn.Module, values: int = 64) -> str:
    """SHA-256 over the first ``values`` numbers of every parameter: changes when the weights
    do (a retrained or fine-tuned model in the same folder), cheap for billions of parameters."""
    digest = hashlib.sha256()
    for name, parameter in module.named_parameters():
        head = parameter.detach().reshape(-1)[:values].float().cpu().numpy()
        digest.update(name.encode())
        digest.update(head.tobytes())
    return digest.hexdigest()[:16]


def identity(info: dict) -> str:
    """What must match for a run folder to be resumed (not batch size, device or shard)."""
    keys = (
        "model",
        "sites",
        "noise",
        "conditions",
        "pooling",
        "seed",
        "image_size",
        "chunk_items",
        "store_dtype",
        "batch_invariant",
        "items",
    )
    chosen = {k: info.get(k) for k in keys}
    if (info.get("protocol") or {}).get("name", "default") != "default":
        chosen["protocol"] = info["protocol"]  # default runs keep their earlier identity
    blob = json.dumps(chosen, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _prepare_run(root: Path, info: dict, overwrite: bool) -> None:
    """Claim ``root`` for this extraction (diffprobe.io's folder rule): resume the same
    extraction, replace a different one only with ``overwrite`` or when it finished no chunk."""
    check_output(root, EXTRACT_KIND, overwrite=overwrite)
    path = root / RUN_JSON
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except ValueError:
            existing = {}
        if existing.get("identity") == info["identity"]:
            if run_format(existing) == info["format"]:
                claim_output(root, EXTRACT_KIND, entries=RUN_ENTRIES)
                return
            if not overwrite:
                raise ExtractionError(
                    f"{root} holds this extraction in the store layout of "
                    f"{run_format(existing)} (an older diffprobe), this "
                    f"one writes {info['format']} (docs/store.md); finish it with the diffprobe "
                    "that started it, or pass --overwrite to start it again"
                )
        elif not overwrite and any((root / PROGRESS).glob("chunk-*.done")):
            raise ExtractionError(
                f"{root} already holds a different extraction (its run.json differs in model, "
                "sites, grid, conditions, pooling, seed or items); choose another --out or pass "
                "--overwrite to replace it"
            )
        # a different extraction that finished no chunk holds nothing to lose
        overwrite = True
    claim_output(root, EXTRACT_KIND, overwrite=overwrite, entries=RUN_ENTRIES)
    write_json(path, info)


def _check_inputs(model: Model, source: Source, plan: ExtractionPlan) -> int:
    """Refuse, before any work, a plan ``model`` cannot run on ``source``; returns the image
    size (the plan's or the model's native one)."""
    if len(source) == 0:
        raise ExtractionError(f"{source.description} has no items")
    size = plan.image_size or model.resolution
    model.check_size(size)
    check_denoiser_sites(model, plan.sites, ExtractionError,
                         "the grid extracts denoiser sites (text-encoder and VAE sites do not "
                         "depend on the noise level: read them with diffprobe.capture)")  # fmt: skip
    check_schedule(model, plan)
    return size


def extract_arrays(
    model: Model,
    source: Source,
    plan: ExtractionPlan,
    *,
    batch_size: int = 16,
    captions: list[str] | None = None,
    progress: bool = False,
) -> dict[tuple[str, str, str], np.ndarray]:
    """The grid of ``plan`` over ``source`` in memory, for analyses that need no run folder:
    ``{(site, noise key, stored condition): (items, ...) float32}``, the very arrays
    :func:`extract` would store (same noise, batching and pooling; ``plan.chunk_items`` items
    are computed at a time)."""
    from tqdm.auto import tqdm

    check_batching(batch_size, (0, 1))
    size = _check_inputs(model, source, plan)
    grid = resolved_grid(model, plan)
    keys = {
        array_path(site, g["key"], name): (site, g["key"], name)
        for site in plan.sites
        for g in grid
        for condition in plan.conditions
        for name in condition.stored_names()
    }
    parts: dict[tuple[str, str, str], list[np.ndarray]] = {key: [] for key in keys.values()}
    chunks = range(0, len(source), plan.chunk_items)
    bar = tqdm(total=len(chunks) * len(plan.conditions) * len(grid), disable=not progress,
               desc="features", unit="pass", file=sys.stderr)  # fmt: skip
    reduce = pool_fn(plan.pooling)
    for start in chunks:
        indices = list(range(start, min(start + plan.chunk_items, len(source))))
        with batch_invariant(plan.batch_invariant):
            pixels = _load_pixels(model, source, indices, size, pin=False)
            for group in _compute_chunk(model, source, plan, indices, pixels, size, batch_size,
                                        reduce, captions, grid, bar):  # fmt: skip
                for path, values in group.arrays().items():
                    parts[keys[path]].append(values)
    bar.close()
    dtype = np.dtype(plan.store_dtype)
    return {key: np.concatenate(values).astype(dtype, copy=False) for key, values in parts.items()}


def extract(
    model: Model,
    source: Source,
    plan: ExtractionPlan,
    out: str | Path,
    *,
    batch_size: int = 16,
    shard: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    captions_file: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Run the grid and fill the store at ``out``; returns the run folder.

    Re-running the same call resumes: chunks whose ``.done`` marker exists are skipped.
    """
    from tqdm.auto import tqdm

    shard_index, shard_count = shard
    check_batching(batch_size, shard)
    size = _check_inputs(model, source, plan)
    captions = read_captions(Path(captions_file), source) if captions_file else None
    grid = resolved_grid(model, plan)
    info = {
        "format": RUN_FORMAT,
        "model": _model_info(model),
        "sites": list(plan.sites),
        "noise": [
            {
                **g,
                "timestep": g.get(
                    "timestep", model.timestep_for(g["noise_level"]) if "noise_level" in g else None
                ),
            }
            for g in grid
        ],
        "noise_formula": (
            "docs/noise.md: item i noise ~ torch.Generator('cpu').manual_seed("
            "int(numpy.random.SeedSequence([seed, i]).generate_state(1)[0]))"
            if plan.protocol == "default"
            else protocol_info(plan)["noise_formula"]
        ),
        "protocol": protocol_info(plan),
        # CPU values depend on it (torchrun sets OMP_NUM_THREADS=1); not part of the identity
        "torch_threads": torch.get_num_threads(),
        "conditions": [asdict(c) for c in plan.conditions],
        "stored_conditions": [n for c in plan.conditions for n in c.stored_names()],
        "pooling": plan.pooling,
        "seed": plan.seed,
        "image_size": size,
        "chunk_items": plan.chunk_items,
        "store_dtype": plan.store_dtype,
        "batch_invariant": plan.batch_invariant,
        "data": {"kind": source.kind, "description": source.description, "skipped": source.skipped},
        "items": source.manifest(),
        "versions": _versions(),
    }
    info["identity"] = identity(info)
    root = Path(out)
    _prepare_run(root, info, overwrite)
    store = RunStore(root)

    n_items = len(source)
    chunks = [k for k in range(-(-n_items // plan.chunk_items)) if k % shard_count == shard_index]
    todo = [k for k in chunks if not store.is_done(k)]
    if len(todo) < len(chunks):
        log.info(
            "resuming %s: %d of %d chunks of this shard already done",
            root,
            len(chunks) - len(todo),
            len(chunks),
        )
    reduce = pool_fn(plan.pooling)
    bar = tqdm(
        total=len(todo) * len(plan.conditions) * len(grid),
        disable=not progress,
        desc="extract",
        unit="pass",
        file=sys.stderr,
    )
    # A chunk's marker is written after all of its writes, and only if every one succeeded: a
    # crash never marks a half-written chunk. On the CPU a chunk is computed whole and then
    # written by one thread per torch thread: while torch computes it keeps every core busy,
    # so writes beside it gain nothing, and creating files is kernel CPU work that two
    # threads do in about half the time. On a GPU each (condition, noise level) group goes to
    # a writer thread as soon as it is computed, and is written while the denoiser computes
    # the next one (docs/performance.md).
    from concurrent.futures import Future, ThreadPoolExecutor

    def mark(k: int, indices: list[int], writes: list[Future], began: float) -> None:
        for done in writes:
            done.result()  # finished already (same thread, earlier); re-raises a failed write
        store.mark_done(k, {"items": [indices[0], indices[-1] + 1],
                            "shard": f"{shard_index}/{shard_count}",
                            "seconds": round(time.perf_counter() - began, 3)})  # fmt: skip

    beside = _writes_beside_compute(model)

    def chunk_items(k: int) -> list[int]:
        return list(range(k * plan.chunk_items, min((k + 1) * plan.chunk_items, n_items)))

    pin = model.device.type == "cuda"

    def load(k: int) -> torch.Tensor:
        return _load_pixels(model, source, chunk_items(k), size, pin=pin)

    with (
        ThreadPoolExecutor(1, "diffprobe-store") as writer,
        ThreadPoolExecutor(1, "diffprobe-load") as loader,
    ):
        pending: Future | None = None
        # On a GPU the next chunk's images are decoded and resized while this one computes.
        upcoming = loader.submit(load, todo[0]) if beside and todo else None
        for position, k in enumerate(todo):
            began = time.perf_counter()
            indices = chunk_items(k)
            rows = (indices[0], n_items, plan.chunk_items, plan.store_dtype)
            writes = []
            if upcoming is not None:
                pixels = upcoming.result()
                following = todo[position + 1] if position + 1 < len(todo) else None
                upcoming = None if following is None else loader.submit(load, following)
            else:
                pixels = load(k)
            with batch_invariant(plan.batch_invariant):
                groups = _compute_chunk(model, source, plan, indices, pixels, size, batch_size,
                                        reduce, captions, grid, bar)  # fmt: skip
                if beside:
                    writes = [writer.submit(_write_group, store, group, rows) for group in groups]
                else:
                    chunk = {path: v for group in groups for path, v in group.arrays().items()}
                    store.write_rows(chunk, *rows, workers=torch.get_num_threads())
            if pending is not None:
                pending.result()  # one chunk in flight at most; re-raises a failed write
            pending = writer.submit(mark, k, indices, writes, began)
        if pending is not None:
            pending.result()
    bar.close()
    return root


def _load_pixels(model: Model, source: Source, indices: list[int], size: int, pin: bool):
    """A chunk's images decoded and resized on the CPU: float (items, 3, size, size) in [-1, 1],
    in pinned memory for an asynchronous copy to a GPU (``pin``)."""
    pixels = model.prepare_pixels(source.load(indices), size)
    return pixels.pin_memory() if pin else pixels


def _write_group(store: RunStore, group: _HostGroup, rows: tuple) -> None:
    store.write_rows(group.arrays(), *rows)


class _HostGroup:
    """One (condition, noise level) group of pooled features on its way to the host: all of its
    arrays copied in ONE transfer (a flat buffer; pinned and asynchronous from a GPU), split
    into numpy arrays when the writer asks (after the copy's event)."""

    def __init__(self, parts: dict[str, list[torch.Tensor]]) -> None:
        values = {path: torch.cat(v).float() for path, v in parts.items()}
        self.shapes = {path: tuple(v.shape) for path, v in values.items()}
        flat = torch.cat([v.reshape(-1) for v in values.values()])
        if flat.device.type == "cuda":
            self.host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self.host.copy_(flat, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host, self.ready = flat.cpu(), None

    def arrays(self) -> dict[str, np.ndarray]:
        if self.ready is not None:
            self.ready.synchronize()
        flat, out, start = self.host.numpy(), {}, 0
        for path, shape in self.shapes.items():
            count = int(np.prod(shape))
            out[path] = flat[start : start + count].reshape(shape)
            start += count
        return out


def _writes_beside_compute(model: Model) -> bool:
    """Whether store writes run on a writer thread while the denoiser computes (a GPU), rather
    than after each chunk on every core (the CPU)."""
    return model.device.type != "cpu"


# inference mode, not just no_grad: no version counters or view tracking; only numpy leaves
@torch.inference_mode()
def _compute_chunk(
    model, source, plan, indices, pixels, size, batch_size, reduce, captions, grid, bar
):
    """Compute one chunk from its prepared ``pixels`` (:func:`_load_pixels`), yielding each
    (condition, noise level) group as soon as it is queued on the device: a :class:`_HostGroup`
    whose ``arrays()`` are {array path: (items, ...) float32 numpy array}."""
    batches = [
        list(range(s, min(s + batch_size, len(indices))))
        for s in range(0, len(indices), batch_size)
    ]
    if plan.protocol == "alignment-paper":
        # one posterior draw and one noise tensor for every item (docs/alignment.md)
        shape = protocol_latent_shape(model, size)
        posterior, shared = protocol_noise(shape, plan.seed)
        x0 = torch.cat([
            model.encode_images(pixels[b[0] : b[-1] + 1], size, posterior_noise=posterior)
            for b in batches
        ])  # fmt: skip
        noise = shared.to(x0.device).expand(len(indices), *shape)
    else:
        x0 = torch.cat([model.encode_images(pixels[b[0] : b[-1] + 1], size) for b in batches])
        # an item's noise does not depend on the noise level: drawn once per chunk
        # (docs/noise.md)
        noise = item_noise(x0.shape[1:], plan.seed, indices, device=x0.device,
                           dtype=torch.float32)  # fmt: skip
    for condition in plan.conditions:
        prompts = condition.prompts(source, indices, captions)
        negative = "" if condition.uses_cfg else None
        # encoded per batch, as the denoiser runs: a text encoder's kernels, like the
        # denoiser's, round by batch size, so a chunk-sized encoding would tie the values to
        # --chunk-items (SD3's pooled projection differs by 4e-7 between batches of 2 and 3)
        conds = [model.encode_prompt([prompts[i] for i in b], negative=negative) for b in batches]
        guidance = condition.guidance_scale if condition.uses_cfg else None
        for g in grid:
            parts: dict[str, list[torch.Tensor]] = {}
            for b, cond in zip(batches, conds, strict=True):
                by_level = "noise_level" in g and plan.protocol == "default"
                x_t, t = model.add_noise(
                    x0[b],
                    noise_level=g["noise_level"] if by_level else None,
                    timestep=None if by_level else g["timestep"],
                    noise=noise[b],
                )
                with capture(model, plan.sites, stop_early=True, reduce=reduce) as cache:
                    model.denoise(x_t, t, cond, guidance_scale=guidance)
                for site in plan.sites:
                    for name, branch in zip(
                        condition.stored_names(),
                        ("uncond", "cond") if condition.uses_cfg else ("none",),
                        strict=True,
                    ):
                        value = cache.last(site, branch)
                        parts.setdefault(array_path(site, g["key"], name), []).append(value)
            # kept on the device until here: no synchronisation inside the batch loop, and
            # none here either (the writer waits for the copy)
            yield _HostGroup(parts)
            bar.update(1)
