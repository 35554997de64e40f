"""Speed of diffprobe's grid extraction against the ways people did it before, in ONE run.

The grid: 9 denoiser sites × 11 noise levels, the empty prompt, mean pooling, over the same
items. Every method reads the same sites of the same inputs; values are checked against the
diffprobe store (``torch.equal``-style, with the max abs difference printed).

Methods (phases, ``--phases``):

- ``extract``: ``diffprobe.extract.engine.extract`` into a fresh store (zarr writes included,
  the real product path). Every ratio below is against this time.
- ``engine``: the engine's chunk computation alone, without run.json, zarr arrays and markers
  (where diffprobe's own time goes: extract minus engine is the store).
- ``hand``: a minimal hand-written loop in plain diffusers doing the same work (VAE encode,
  the documented noise formula, ``register_forward_hook`` on the 9 sites, early stop by
  exception after the deepest one, pooled features into numpy). Goal: diffprobe ≤ 1.1× it.
- ``nnsight``: ``nnsight.NNsight(denoiser)`` tracing the denoiser call, ``.output`` of the same
  sites pooled and ``.save()``d, ``tracer.stop()`` after the deepest. Goal: diffprobe at least
  as fast, values equal.
- ``baseline``: the seed repos' grid, one unit per (site, noise level) that loads the model,
  encodes the images, noises them, runs the full denoiser with a forward hook on that one site
  and saves with numpy. With a model folder each unit is a real fresh ``python`` process (this
  file with ``--worker seed``, which imports no diffprobe); with ``--full-size`` a unit is
  simulated in-process and "loading" is building the pipeline from its config on the device.
  99 units are too slow to run, so ``--seed-units K`` of them (spread over the grid) are
  timed and the mean × 99 is reported, marked as extrapolated. diffprobe's side of this ratio
  is a fresh process too (model folder) or build + extract (``--full-size``). Goal: ≥ 50×.
- ``memory``: diffprobe extraction in fresh processes with N and 10 N items; ``ru_maxrss`` of
  each (flat means the ratio stays near 1).
- ``mfu``: FLOPs of one early-stopped denoiser pass of a batch (``FlopCounterMode``, the work
  actually done) × passes / wall time / ``--peak-tflops``, for the whole extraction and for the
  bare early-stopped denoiser passes alone (timed in a loop, synchronised).
- ``maxbatch``: the largest batch whose extraction step (VAE encode + one captured pass) fits,
  by doubling then bisection with ``torch.OutOfMemoryError`` caught, up to ``--max-batch``.

CPU, a pipeline folder (``tiny`` by default; ``dummy`` saves a random
``diffprobe.testing.dummy_sd_pipeline()`` to a temporary folder)::

    .venv/bin/python benchmarks/extract.py --model dummy --items 32
    .venv/bin/python benchmarks/extract.py --model tiny --items 32 --out benchmarks/out/extract.json

GPU, random-weight full-size architectures (``diffprobe.testing.full_size``), runnable without
``pip install -e`` (``PYTHONPATH=src``)::

    python3 benchmarks/extract.py --full-size sd1.5 --size 512 --dtype bf16 --device cuda \\
        --items 256 --batch-size 32 --phases extract,nnsight,baseline,mfu,maxbatch

Defaults: phases ``extract,engine,hand,nnsight,baseline,memory`` on CPU and
``extract,nnsight,baseline,mfu,maxbatch`` with ``--full-size``; ``--time-budget`` (480 s on
CUDA) makes later phases shrink or skip once it is spent (extract itself always completes), and
a phase that fails is reported in ``notes`` without losing the others.

Prints a table on stdout and writes JSON (``--out``). Timings on a shared machine are noisy:
in-process methods are repeated (``--repeats``) and interleaved, and the minimum is used.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffprobe.io import write_json


def _quiet_libraries() -> None:
    """Offline, and the libraries' warnings off, for a benchmark run (set in ``main``, not at
    import: a test that imports this file must not change them for the rest of the session)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


# KEEP_UNTIL_END: run folders (and the file-creation probe) stay until every method has been
# timed. On ext4 without a journal (our VMs' disk) the kernel skips inodes freed in the last
# 60-360 s when it allocates one, checking each in turn, so creating files right after deleting
# hundreds costs up to 0.8 ms of kernel time apiece instead of 20 us (docs/performance.md):
# deleting each repeat's run folder slowed the next repeat's store, and only diffprobe's side.
NOISE_LEVELS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
N_SITES = 9
PHASES = ("extract", "engine", "invariant", "hand", "nnsight", "baseline", "memory", "mfu",
          "maxbatch")  # fmt: skip
CPU_PHASES = "extract,engine,invariant,hand,nnsight,baseline,memory"
GPU_PHASES = "extract,nnsight,baseline,mfu,maxbatch"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
T5_TOKENS = 256  # SD3's default max_sequence_length, as diffprobe's adapter uses


# ---------------------------------------------------------------------------------------------
# The plain-diffusers path: the hand-written loop and the seed-style unit. No diffprobe import
# here, so the seed worker process is what a seed script was: torch + diffusers + numpy.


class _Stop(Exception):
    """Raised by the hook on the deepest site to end the forward pass early."""


def plain_load(folder: str, dtype: torch.dtype, device: str):
    from diffusers import DiffusionPipeline
    from diffusers.utils import deprecation_utils

    keyword = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    pipe = DiffusionPipeline.from_pretrained(folder, **{keyword: dtype}).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_is_flow(pipe) -> bool:
    return getattr(pipe, "transformer", None) is not None


def plain_denoiser(pipe) -> torch.nn.Module:
    return pipe.transformer if plain_is_flow(pipe) else pipe.unet


def plain_module(pipe, site: str) -> torch.nn.Module:
    component, _, path = site.partition(".")
    root = getattr(pipe, component)
    return root.get_submodule(path) if path else root


def plain_element(module: torch.nn.Module, output):
    """The tensor a site reads: the stream that flows on (image tokens for MMDiT blocks)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[1] if type(module).__name__ == "JointTransformerBlock" else output[0]
    return output.sample


def plain_pool(value: torch.Tensor) -> torch.Tensor:
    """Mean over space (items, C, H, W) or tokens (items, tokens, C) -> (items, C) float32."""
    return value.float().mean(dim=(2, 3) if value.dim() == 4 else (1,))


def plain_pixels(images: np.ndarray, size: int, device, dtype) -> torch.Tensor:
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if pixels.shape[-2:] != (size, size):
        pixels = torch.nn.functional.interpolate(
            pixels, size=(size, size), mode="bicubic", align_corners=False, antialias=True
        ).clamp(-1, 1)
    return pixels.to(device=device, dtype=dtype)


def plain_encode(pipe, images: np.ndarray, size: int, batch_size: int) -> torch.Tensor:
    """Latents (items, C, size/f, size/f): VAE posterior mean, shifted and scaled."""
    vae, denoiser = pipe.vae, plain_denoiser(pipe)
    device, dtype = denoiser.device, denoiser.dtype
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    parts = []
    with torch.no_grad():
        for first in range(0, len(images), batch_size):
            pixels = plain_pixels(images[first : first + batch_size], size, device, dtype)
            mean = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
            parts.append(((mean - shift) * vae.config.scaling_factor).to(dtype))
    return torch.cat(parts)


def plain_prompt(pipe, n: int) -> dict:
    """Denoiser keyword arguments of the empty prompt for ``n`` items."""
    device = plain_denoiser(pipe).device
    with torch.no_grad():
        if plain_is_flow(pipe):
            embeds, _, pooled, _ = pipe.encode_prompt(
                [""] * n,
                None,
                None,
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=T5_TOKENS,
            )
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        embeds, _ = pipe.encode_prompt([""] * n, device, 1, False)
        return {"encoder_hidden_states": embeds}


def plain_noise(pipe, x0: torch.Tensor, noise_level: float, seed: int, items) -> tuple:
    """(x_t, timesteps): item i's noise from Generator('cpu').manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]));
    DDPM schedules: t = min(round(p T), T - 1) and the scheduler's add_noise; flow models:
    sigma = p, x_t = (1 - sigma) x_0 + sigma noise, timestep sigma T (docs/noise.md)."""
    from diffusers import DDPMScheduler

    steps = int(pipe.scheduler.config.num_train_timesteps)
    noise = torch.empty((len(items), *x0.shape[1:]), dtype=torch.float32)
    for row, item in enumerate(items):
        generator = torch.Generator("cpu").manual_seed(
            int(np.random.SeedSequence([seed, int(item)]).generate_state(1)[0])
        )
        noise[row] = torch.randn(tuple(x0.shape[1:]), generator=generator, dtype=torch.float32)
    noise = noise.to(x0.device)
    if plain_is_flow(pipe):
        t = noise_level * steps
        sigma = t / steps
        noisy = (1.0 - sigma) * x0.float() + sigma * noise
    else:
        t = float(min(round(noise_level * steps), steps - 1))
        schedule = DDPMScheduler.from_config(pipe.scheduler.config)
        index = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
        noisy = schedule.add_noise(x0.float(), noise, index)
    return noisy.to(x0.dtype), torch.full((x0.shape[0],), t, device=x0.device)


def plain_kwargs(pipe, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> dict:
    key = "hidden_states" if plain_is_flow(pipe) else "sample"
    return {key: x_t, "timestep": timesteps, **cond, "return_dict": False}


def _rows(pipe, encoded: dict, count: int) -> dict:
    """The empty prompt's denoiser inputs for a batch of ``count`` items, encoded at that batch
    size (as diffprobe does: a text encoder's kernels round by batch size) once per size."""
    if count not in encoded:
        encoded[count] = plain_prompt(pipe, count)
    return encoded[count]


def plain_grid(
    pipe,
    images: np.ndarray,
    sites: list[str],
    noise_levels,
    *,
    batch_size: int,
    seed: int,
    size: int,
    early_stop: bool = True,
) -> dict:
    """The hand-written loop: {(site, noise level): (items, C) float32}. ``sites`` must be in
    execution order when ``early_stop`` (the hook on the last one ends the pass)."""
    n = len(images)
    x0 = plain_encode(pipe, images, size, batch_size)
    cond: dict = {}  # batch size -> the empty prompt's inputs
    denoiser = plain_denoiser(pipe)
    out: dict = {}
    current: dict = {}

    def hook_for(site: str, last: bool):
        def hook(module, args, output):
            current[site] = plain_pool(plain_element(module, output).detach()).cpu()
            if last and early_stop:
                raise _Stop

        return hook

    handles = [plain_module(pipe, s).register_forward_hook(hook_for(s, i == len(sites) - 1))
               for i, s in enumerate(sites)]  # fmt: skip
    try:
        with torch.no_grad():
            for p in noise_levels:
                for first in range(0, n, batch_size):
                    items = list(range(first, min(first + batch_size, n)))
                    x_t, t = plain_noise(pipe, x0[first : items[-1] + 1], p, seed, items)
                    try:
                        denoiser(**plain_kwargs(pipe, x_t, t, _rows(pipe, cond, len(items))))
                    except _Stop:
                        pass
                    for site in sites:
                        values = current.pop(site).numpy()
                        array = out.setdefault((site, p), np.empty((n, *values.shape[1:]),
                                                                   np.float32))  # fmt: skip
                        array[first : first + len(items)] = values
    finally:
        for handle in handles:
            handle.remove()
    return out


def seed_unit(
    load,
    images: np.ndarray,
    site: str,
    noise_level: float,
    *,
    batch_size: int,
    seed: int,
    size: int,
    save: Path,
) -> np.ndarray:
    """One unit of the seed-style grid: load, encode, noise, full forward hooked at one site,
    save with numpy."""
    pipe = load()
    values = plain_grid(pipe, images, [site], [noise_level], batch_size=batch_size, seed=seed,
                        size=size, early_stop=False)[(site, noise_level)]  # fmt: skip
    np.save(save, values)
    return values


# ---------------------------------------------------------------------------------------------
# nnsight


def nnsight_grid(
    pipe,
    images: np.ndarray,
    sites: list[str],
    noise_levels,
    *,
    batch_size: int,
    seed: int,
    size: int,
) -> dict:
    """The same grid read through ``nnsight.NNsight(denoiser)``; inputs prepared as in the
    hand-written loop; ``tracer.stop()`` after the deepest site."""
    from nnsight import NNsight

    n = len(images)
    denoiser_name = "transformer" if plain_is_flow(pipe) else "unet"
    wrapped = NNsight(plain_denoiser(pipe))
    x0 = plain_encode(pipe, images, size, batch_size)
    cond: dict = {}  # batch size -> the empty prompt's inputs
    paths = [s.removeprefix(denoiser_name + ".") for s in sites]
    joint = {s: type(plain_module(pipe, s)).__name__ == "JointTransformerBlock" for s in sites}
    out: dict = {}

    def envoy_at(path: str):
        envoy = wrapped
        for part in path.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy

    with torch.no_grad():
        for p in noise_levels:
            for first in range(0, n, batch_size):
                items = list(range(first, min(first + batch_size, n)))
                x_t, t = plain_noise(pipe, x0[first : items[-1] + 1], p, seed, items)
                saved = {}
                with wrapped.trace(
                    **plain_kwargs(pipe, x_t, t, _rows(pipe, cond, len(items)))
                ) as tracer:
                    for site, path in zip(sites, paths, strict=True):
                        value = envoy_at(path).output
                        if isinstance(value, tuple):
                            value = value[1] if joint[site] else value[0]
                        saved[site] = plain_pool(value).save()
                    tracer.stop()
                for site in sites:
                    values = saved[site].detach().cpu().numpy()
                    array = out.setdefault((site, p), np.empty((n, *values.shape[1:]), np.float32))
                    array[first : first + len(items)] = values
    return out


# ---------------------------------------------------------------------------------------------
# diffprobe side


def choose_sites(model, count: int = N_SITES) -> list[str]:
    """UNets: every down block, the mid block and every up block, then attention sublayers
    spread over the network until ``count``; DiTs: ``count`` transformer blocks spread evenly."""
    import re

    names = model.site_names(model.denoiser_name)

    def spread(options: list[str], k: int) -> list[str]:
        if k <= 0 or not options:
            return []
        if k >= len(options):
            return list(options)
        if k == 1:
            return [options[len(options) // 2]]
        return [options[round(i * (len(options) - 1) / (k - 1))] for i in range(k)]

    if model.denoiser_name == "unet":
        blocks = [
            s
            for s in names
            if re.fullmatch(r"unet\.(down_blocks\.\d+|mid_block|up_blocks\.\d+)", s)
        ]
        attentions = [s for s in names
                      if re.fullmatch(r"unet\.(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+", s)]  # fmt: skip
        if len(blocks) >= count:
            return spread(blocks, count)
        return blocks + spread(attentions, count - len(blocks))
    blocks = [
        s for s in names if re.fullmatch(rf"{model.denoiser_name}\.transformer_blocks\.\d+", s)
    ]
    return spread(blocks, count)


def execution_order(model, sites: list[str], x0: torch.Tensor, cond) -> list[str]:
    """``sites`` sorted by when their outputs appear in one forward pass."""
    order: list[str] = []
    handles = [model.module(s).register_forward_hook(
        lambda module, args, output, s=s: order.append(s) if s not in order else None)
        for s in sites]  # fmt: skip
    try:
        x_t, t = model.add_noise(x0[:1], noise_level=0.5, seed=0, items=[0])
        model.denoise(x_t, t, cond.select([0]))
    finally:
        for handle in handles:
            handle.remove()
    missing = [s for s in sites if s not in order]
    if missing:
        raise SystemExit(f"sites {missing} never ran in a forward pass; choose others with --sites")
    return sorted(sites, key=order.index)


def diffprobe_extract(
    model,
    source,
    sites,
    noise_levels,
    *,
    batch_size,
    seed,
    size,
    chunk_items,
    root: Path,
    batch_invariant: bool = False,
) -> Path:
    from diffprobe.extract import Condition, ExtractionPlan, extract

    plan = ExtractionPlan(sites=list(sites), noise_levels=list(noise_levels),
                          conditions=[Condition("empty")], pooling="mean", seed=seed,
                          image_size=size, chunk_items=chunk_items,
                          batch_invariant=batch_invariant)  # fmt: skip
    return extract(model, source, plan, root, batch_size=batch_size, progress=False)


def engine_compute(model, source, sites, noise_levels, *, batch_size, seed, size, chunk_items):
    """The engine's chunk computation alone (no store): what ``extract`` does minus run.json,
    zarr arrays and markers. Uses the engine's private ``_compute_chunk``."""
    from diffprobe.extract import engine

    plan = engine.ExtractionPlan(sites=list(sites), noise_levels=list(noise_levels), seed=seed,
                                 image_size=size, chunk_items=chunk_items)  # fmt: skip
    reduce, grid, n = engine.pool_fn("mean"), plan.grid(), len(source)

    class _NoBar:
        def update(self, count: int) -> None:
            pass

    for first in range(0, n, chunk_items):
        indices = list(range(first, min(first + chunk_items, n)))
        pixels = engine._load_pixels(model, source, indices, size, pin=False)
        for group in engine._compute_chunk(model, source, plan, indices, pixels, size,
                                           batch_size, reduce, None, grid, _NoBar()):  # fmt: skip
            group.arrays()


def read_run(root: Path, sites, noise_levels) -> dict:
    import diffprobe

    run = diffprobe.open_run(root)
    return {(s, p): run.get(s, p) for s in sites for p in noise_levels}


def compare(reference: dict, other: dict, keys=None) -> dict:
    keys = list(reference) if keys is None else list(keys)
    equal, worst = True, 0.0
    for key in keys:
        a, b = reference[key], other[key]
        equal &= bool(np.array_equal(a, b))
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return {"equal": equal, "max_abs_diff": worst, "arrays": len(keys)}


# ---------------------------------------------------------------------------------------------
# timing helpers


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    # earlier phases' files (runs, then their deletion) are written back by the kernel in the
    # background; flush them first, so that no method pays for another's disk work
    os.sync()
    _sync(device)
    began = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - began, result


def _free(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


class Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if not seconds else time.perf_counter() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.perf_counter()


# ---------------------------------------------------------------------------------------------
# workers (fresh processes)


def _worker_seed(args) -> None:
    images = np.load(args.images, allow_pickle=False)
    seed_unit(lambda: plain_load(args.model, DTYPES[args.dtype], args.device), images, args.site,
              args.noise_level, batch_size=args.batch_size, seed=args.seed, size=args.size,
              save=Path(args.save))  # fmt: skip


def _worker_extract(args) -> None:
    import diffprobe
    from diffprobe.data.sources import open_source

    began = time.perf_counter()
    model = diffprobe.load(args.model, dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - began
    source = open_source(f"shapes:{args.items}:{args.seed}")
    began = time.perf_counter()
    sites = [s for entry in args.sites for s in entry.replace(",", " ").split()]
    diffprobe_extract(model, source, sites, [float(v) for v in args.noise.split(",")],
                      batch_size=args.batch_size, seed=args.seed, size=args.size,
                      chunk_items=args.chunk_items, root=Path(args.store))  # fmt: skip
    extract_s = time.perf_counter() - began
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"load_s": load_s, "extract_s": extract_s, "ru_maxrss_mb": rss / 1024}))


def _run_worker(argv: list[str]) -> tuple[float, str]:
    """Wall time of a fresh ``python`` running this file with ``argv`` (interpreter start and
    imports included) and its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    began = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env,
                          capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"worker {argv[:2]} failed:\n{done.stderr[-3000:]}")
    return wall, done.stdout


# ---------------------------------------------------------------------------------------------
# the benchmark


def file_creation_us(folder: Path, count: int = 200) -> float:
    """Microseconds to create a folder holding one 16 KB file, in ``folder``'s file system:
    the store's unit of disk work (an array is a folder with its metadata and chunk files)."""
    probe = Path(tempfile.mkdtemp(dir=folder, prefix="fs-probe-"))
    os.sync()
    began = time.perf_counter()
    for i in range(count):
        (probe / str(i)).mkdir()
        (probe / str(i) / "c").write_bytes(bytes(16384))
    seconds = time.perf_counter() - began
    return seconds / count * 1e6  # left for the end, with the run folders (see KEEP_UNTIL_END)


def _load(args, workdir: Path, log):
    """(diffprobe model, pipeline folder or None, seconds to load/build, loader for a unit)."""
    import diffprobe

    dtype = DTYPES[args.dtype]
    if args.full_size:
        from diffprobe.testing.full_size import random_pipeline

        def build():
            return random_pipeline(args.full_size, args.device, dtype)

        seconds, pipe = timed(build, args.device)
        log(f"built random {args.full_size} on {args.device} ({args.dtype}) in {seconds:.1f} s")
        return diffprobe.from_pipeline(pipe, name=args.full_size), None, seconds, build
    folder = args.model
    if folder == "dummy":
        from diffprobe.testing import dummy_sd_pipeline

        folder = str(workdir / "dummy-sd")
        dummy_sd_pipeline(args.seed).save_pretrained(folder)
        log(f"saved a random dummy_sd_pipeline({args.seed}) to {folder}")
    else:
        from diffprobe.registry import resolve

        spec = resolve(folder)
        if not spec.local:
            raise SystemExit(f"--model {folder}: give a local pipeline folder (or tiny / dummy)")
        folder = spec.source
        if not (Path(folder) / "model_index.json").is_file():
            raise SystemExit(
                f"--model {args.model}: no diffusers pipeline at {folder} (model_index.json "
                "missing); train it (`diffprobe train-tiny`) or pass --model dummy / a folder"
            )
    seconds, model = timed(lambda: diffprobe.load(folder, dtype=dtype, device=args.device),
                           args.device)  # fmt: skip
    return model, folder, seconds, lambda: plain_load(folder, dtype, args.device)


def run(args) -> dict:
    import diffprobe  # noqa: F401 - fail early when src is not importable
    from diffprobe.data.sources import open_source

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    phases = [
        p for p in (args.phases or (GPU_PHASES if args.full_size else CPU_PHASES)).split(",") if p
    ]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise SystemExit(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
    deadline = Deadline(args.time_budget)
    device = args.device
    workdir = Path(tempfile.mkdtemp(prefix="diffprobe-bench-", dir=args.workdir))
    notes: list[str] = []
    result: dict = {"notes": notes, "phases": {}}
    try:
        model, folder, load_s, unit_loader = _load(args, workdir, log)
        eager_model = None
        if args.compile:
            # the peers (hand, nnsight) and the eager reference run on an uncompiled copy with
            # the same weights; diffprobe's extraction and the bare passes on the compiled model
            import copy

            import diffprobe

            eager_model = diffprobe.from_pipeline(copy.deepcopy(model.pipe), name=model.name)
            options = {"mode": args.compile_mode} if args.compile_mode else {}
            regions = model.compile(**options)
            log(
                f"compiled {sum(len(v) for v in regions.values())} regions ({options or 'default'})"
            )
        size = args.size or model.resolution
        noise_levels = (
            [float(v) for v in args.noise.split(",")] if args.noise else list(NOISE_LEVELS)
        )
        source = open_source(f"shapes:{args.items}:{args.seed}")
        images = source.load(range(len(source)))
        chunk_items = args.chunk_items or max(32, args.batch_size)
        with torch.no_grad():
            x0 = model.encode_images(images[:1], size)
        cond = model.encode_prompt([""])
        sites = (
            [s for entry in args.sites for s in entry.replace(",", " ").split()]
            if args.sites
            else choose_sites(model)
        )
        sites = execution_order(model, sites, x0, cond)
        grid = len(sites) * len(noise_levels)
        passes = -(-args.items // args.batch_size) * len(noise_levels)
        result["config"] = {
            "model": args.full_size or args.model, "folder": folder, "full_size": bool(args.full_size),
            "family": model.family, "size": size, "dtype": args.dtype, "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine(),
            "items": args.items, "batch_size": args.batch_size, "chunk_items": chunk_items,
            "sites": sites, "noise_levels": noise_levels, "condition": "empty prompt",
            "pooling": "mean", "seed": args.seed, "denoiser_passes": passes,
            "denoiser_parameters": sum(p.numel() for p in model.denoiser.parameters()),
            "threads": torch.get_num_threads(), "repeats": args.repeats,
            "load_or_build_s": load_s, "versions": _versions(),
            "load_average_at_start": list(os.getloadavg()), "cpu_count": os.cpu_count(),
            "workdir": str(workdir), "folder_with_file_us": file_creation_us(workdir),
        }  # fmt: skip
        log(
            f"{len(sites)} sites × {len(noise_levels)} noise levels, {args.items} items, batch "
            f"{args.batch_size}, {size} px, {args.dtype} on {device}: {', '.join(sites)}"
        )

        # warm-up: one captured pass (lazy initialisation, kernel selection; the compilation)
        warm_s, _ = timed(lambda: _warm_up(model, images, sites, size, args, device), device)
        result["config"]["warm_up_s"] = warm_s
        if eager_model is not None:
            _warm_up(eager_model, images, sites, size, args, device)
            result["config"]["compile"] = {"mode": args.compile_mode or "default",
                                           "regions": regions, "first_pass_s": warm_s}  # fmt: skip
            log(f"first (compiling) pass {warm_s:.1f} s")

        timings: dict[str, list[float]] = {"extract": [], "engine": [], "invariant": [], "hand": [],
                                           "nnsight": [], "eager": []}  # fmt: skip
        peers = eager_model or model
        reference = None
        others: dict[str, dict] = {}
        peak_gpu = None
        nnsight_ok = "nnsight" in phases and _nnsight_available(notes)
        resident_gpu = torch.cuda.memory_allocated() if device.startswith("cuda") else None
        if nnsight_ok:
            try:  # warm nnsight up too (its first trace pays one-time costs)
                nnsight_grid(peers.pipe, images[: args.batch_size], sites, noise_levels[:1],
                             batch_size=args.batch_size, seed=args.seed, size=size)  # fmt: skip
            except Exception as err:  # noqa: BLE001 - report, keep the other figures
                notes.append(f"nnsight failed: {type(err).__name__}: {str(err)[:500]}")
                nnsight_ok = False
                _free(device)

        def run_extract(repeat: int) -> None:
            nonlocal reference, peak_gpu
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            root = workdir / f"run-{repeat}"
            seconds, _ = timed(lambda: diffprobe_extract(
                model, source, sites, noise_levels, batch_size=args.batch_size, seed=args.seed,
                size=size, chunk_items=chunk_items, root=root), device)  # fmt: skip
            if device.startswith("cuda"):
                peak_gpu = max(peak_gpu or 0, torch.cuda.max_memory_allocated())
            timings["extract"].append(seconds)
            if reference is None:
                reference = read_run(root, sites, noise_levels)
            log(f"[{repeat}] diffprobe extract: {seconds:.2f} s")

        def run_engine(repeat: int) -> None:
            seconds, _ = timed(lambda: engine_compute(
                model, source, sites, noise_levels, batch_size=args.batch_size, seed=args.seed,
                size=size, chunk_items=chunk_items), device)  # fmt: skip
            timings["engine"].append(seconds)
            log(f"[{repeat}] diffprobe engine without the store: {seconds:.2f} s")

        def run_invariant(repeat: int) -> None:
            root = workdir / f"invariant-{repeat}"
            seconds, _ = timed(lambda: diffprobe_extract(
                model, source, sites, noise_levels, batch_size=args.batch_size, seed=args.seed,
                size=size, chunk_items=chunk_items, root=root, batch_invariant=True), device)  # fmt: skip
            timings["invariant"].append(seconds)
            if "invariant" not in others:  # its values, read once
                others["invariant"] = read_run(root, sites, noise_levels)
            log(f"[{repeat}] diffprobe extract --batch-invariant: {seconds:.2f} s")

        def run_eager(repeat: int) -> None:
            root = workdir / f"eager-{repeat}"
            seconds, _ = timed(lambda: diffprobe_extract(
                eager_model, source, sites, noise_levels, batch_size=args.batch_size,
                seed=args.seed, size=size, chunk_items=chunk_items, root=root), device)  # fmt: skip
            timings["eager"].append(seconds)
            if "eager" not in others:
                others["eager"] = read_run(root, sites, noise_levels)
            log(f"[{repeat}] diffprobe extract, eager copy: {seconds:.2f} s")

        def run_other(name: str, fn, repeat: int) -> None:
            nonlocal nnsight_ok, phases
            if name == "nnsight" and not nnsight_ok or name not in phases:
                return
            if deadline.left() < 1.5 * min(timings["extract"]):
                notes.append(f"{name} repeat {repeat}: skipped, time budget")
                return
            try:
                seconds, values = timed(lambda: fn(
                    peers.pipe, images, sites, noise_levels, batch_size=args.batch_size,
                    seed=args.seed, size=size), device)  # fmt: skip
            except Exception as err:  # noqa: BLE001 - report, keep the other figures
                notes.append(f"{name} failed: {type(err).__name__}: {str(err)[:500]}")
                nnsight_ok = nnsight_ok and name != "nnsight"
                phases = [p for p in phases if p != name]
                _free(device)
                return
            timings[name].append(seconds)
            others.setdefault(name, values)
            log(f"[{repeat}] {name}: {seconds:.2f} s")
            _free(device)

        # Interleaved, and the order turns by one method each repeat: on a shared machine the
        # speed drifts within a repeat too, and no method should always run first or last.
        steps = [("extract", run_extract), ("engine", run_engine), ("invariant", run_invariant),
                 ("hand", lambda r: run_other("hand", plain_grid, r)),
                 ("nnsight", lambda r: run_other("nnsight", nnsight_grid, r))]  # fmt: skip
        steps = [(n, f) for n, f in steps if n in phases or n == "extract"]
        if eager_model is not None:
            steps.append(("eager", run_eager))
        for repeat in range(args.repeats):
            turn = repeat % len(steps)
            for name, step in steps[turn:] + steps[:turn]:
                if name == "extract" and "extract" not in phases and reference is not None:
                    continue
                step(repeat)
        extract_s = min(timings["extract"])
        result["timings_s"] = timings
        phase = result["phases"]
        if "extract" in phases:
            phase["extract"] = {
                "seconds": extract_s, "median_s": statistics.median(timings["extract"]),
                "images_per_s": args.items / extract_s, "passes_per_s": passes / extract_s,
                "peak_gpu_memory_gb": None if peak_gpu is None else peak_gpu / 2**30,
                "resident_gpu_memory_gb": None if resident_gpu is None else resident_gpu / 2**30,
            }  # fmt: skip
        if timings["engine"]:
            engine_s = min(timings["engine"])
            phase["engine"] = {
                "seconds": engine_s, "median_s": statistics.median(timings["engine"]),
                "store_and_bookkeeping_s": extract_s - engine_s,
                "what": "the engine's per-chunk compute (encode, prompts, captured passes, pooling, "
                "copies to numpy) without run.json, zarr arrays and markers",
            }  # fmt: skip
        if timings["invariant"]:
            best = min(timings["invariant"])
            check = compare(reference, others["invariant"])
            phase["invariant"] = {
                "seconds": best, "median_s": statistics.median(timings["invariant"]),
                "over_default": best / extract_s, "max_abs_diff_to_default": check["max_abs_diff"],
                "what": "extract with batch_invariant=True (conv, linear, group norm per item)",
            }  # fmt: skip
        if timings["eager"]:
            best = min(timings["eager"])
            check = compare(others["eager"], reference)
            phase["eager"] = {
                "seconds": best, "median_s": statistics.median(timings["eager"]),
                "compiled_speedup": best / extract_s, **check,
                "what": "the same extraction on an uncompiled copy (same weights); max_abs_diff: "
                "compiled vs eager values (rounding of fused kernels)",
            }  # fmt: skip
        for name in ("hand", "nnsight"):
            if timings[name]:
                best = min(timings[name])
                check = compare(reference, others[name])
                phase[name] = {"seconds": best, "median_s": statistics.median(timings[name]),
                               "diffprobe_over_it": extract_s / best, "it_over_diffprobe": best / extract_s,
                               **check}  # fmt: skip
        if "hand" in phase:
            phase["hand"]["goal"] = "diffprobe / hand <= 1.1"
            phase["hand"]["met"] = phase["hand"]["diffprobe_over_it"] <= 1.1
        if "nnsight" in phase:
            phase["nnsight"]["goal"] = "nnsight / diffprobe >= 1 and values equal"
            phase["nnsight"]["met"] = (
                phase["nnsight"]["it_over_diffprobe"] >= 1 and phase["nnsight"]["equal"]
            )

        later = {
            "baseline": lambda: _baseline(args, model, folder, unit_loader, images, sites,
                                          noise_levels, size, reference, load_s, extract_s,
                                          workdir, deadline, log),
            "memory": lambda: _memory(args, folder, sites, noise_levels, size, workdir,
                                      phase.get("baseline", {}).get("diffprobe_process"), log),
            "mfu": lambda: _mfu(args, model, images, sites, noise_levels, size, extract_s, passes,
                                deadline, log, eager_model),
            "maxbatch": lambda: _maxbatch(args, model, images, sites, size, deadline, log),
        }  # fmt: skip
        for name, measure in later.items():
            if name not in phases:
                continue
            try:  # one failing phase must not lose the others' figures
                phase[name] = measure()
            except Exception as err:  # noqa: BLE001
                notes.append(f"{name} phase failed: {type(err).__name__}: {str(err)[:500]}")
                log(notes[-1])
                _free(device)
        result["grid"] = {"sites": len(sites), "noise_levels": len(noise_levels), "units": grid}
        result["config"]["load_average_at_end"] = list(os.getloadavg())
    finally:  # KEEP_UNTIL_END: nothing is deleted while methods are timed
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "zarr", "nnsight"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional packages
            out[name] = None
    return out


def _nnsight_available(notes: list[str]) -> bool:
    try:
        import nnsight  # noqa: F401
    except Exception as err:  # noqa: BLE001 - missing, or broken against these versions
        notes.append(f"nnsight phase skipped: {err}")
        return False
    return True


def _warm_up(model, images, sites, size, args, device) -> None:
    from diffprobe.extract.plan import pool_fn
    from diffprobe.hooks.engine import capture

    batch = images[: args.batch_size]
    with torch.inference_mode():  # as the engine runs (a compiled graph per grad mode)
        x0 = model.encode_images(batch, size)
        x_t, t = model.add_noise(x0, noise_level=0.5, seed=args.seed, items=range(len(batch)))
        cond = model.encode_prompt([""] * len(batch))
        with capture(model, sites, stop_early=True, reduce=pool_fn("mean")):
            model.denoise(x_t, t, cond)
    _sync(device)


def _baseline(
    args,
    model,
    folder,
    unit_loader,
    images,
    sites,
    noise_levels,
    size,
    reference,
    load_s,
    extract_s,
    workdir,
    deadline,
    log,
) -> dict:
    units = [(s, p) for s in sites for p in noise_levels]
    k = max(1, min(args.seed_units, len(units)))
    chosen = (
        [units[round(i * (len(units) - 1) / (k - 1))] for i in range(k)]
        if k > 1
        else [units[len(units) // 2]]
    )
    measured, checks = [], []
    if folder is not None:
        how = ("real fresh processes (`python benchmarks/extract.py --worker seed`: imports torch, "
               "diffusers, numpy; loads the pipeline folder; encodes; noises; full forward with a "
               "forward hook on one site; np.save)")  # fmt: skip
        images_file = workdir / "images.npy"
        np.save(images_file, images)
    else:
        how = ("simulated in-process: each unit builds the pipeline from its config on the device "
               "(stands in for loading), encodes, noises, runs the full denoiser with a forward "
               "hook on one site, np.save; Python start-up and imports not included")  # fmt: skip
    for index, (site, p) in enumerate(chosen):
        if measured and deadline.left() < 1.5 * statistics.mean(measured):
            break
        save = workdir / f"seed-{index}.npy"
        if folder is not None:
            seconds, _ = _run_worker([
                "--worker", "seed", "--model", folder, "--site", site, "--noise-level", repr(p),
                "--images", str(images_file), "--save", str(save), "--batch-size", str(args.batch_size),
                "--seed", str(args.seed), "--size", str(size), "--dtype", args.dtype, "--device", args.device,
            ])  # fmt: skip
        else:
            seconds, _ = timed(lambda site=site, p=p, save=save: seed_unit(
                unit_loader, images, site, p, batch_size=args.batch_size, seed=args.seed,
                size=size, save=save), args.device)  # fmt: skip
            _free(args.device)
        measured.append(seconds)
        if folder is not None:  # same weights: the values must equal diffprobe's
            checks.append(
                compare({0: reference[(site, p)]}, {0: np.load(save, allow_pickle=False)})
            )
        log(f"seed-style unit {index + 1}/{k} ({site}, p={p}): {seconds:.2f} s")
    grid_s = statistics.mean(measured) * len(units)
    out = {
        "how": how, "units_total": len(units), "units_measured": len(measured),
        "units": [list(u) for u in chosen[: len(measured)]], "unit_s": measured,
        "extrapolated_grid_s": grid_s, "extrapolated": len(measured) < len(units),
        "values_equal": None if not checks else all(c["equal"] for c in checks),
        "max_abs_diff": None if not checks else max(c["max_abs_diff"] for c in checks),
        "goal": ">= 50x",
    }  # fmt: skip
    if folder is not None:
        wall, stdout = _run_worker(_extract_worker_argv(args, folder, sites, noise_levels, size,
                                                        args.items, workdir / "proc-run"))  # fmt: skip
        info = json.loads(stdout.strip().splitlines()[-1])
        out["diffprobe_process"] = {"items": args.items, "wall_s": wall, **info}
        out["diffprobe_s"] = wall
        out["diffprobe_side"] = "one fresh process: interpreter start, imports, load, extract"
        out["ratio_in_process"] = grid_s / (load_s + extract_s)
    else:
        out["diffprobe_s"] = load_s + extract_s
        out["diffprobe_side"] = "in-process: one build + extract"
    out["ratio"] = grid_s / out["diffprobe_s"]
    out["met"] = out["ratio"] >= 50
    return out


def _extract_worker_argv(args, folder, sites, noise_levels, size, items, store) -> list[str]:
    return ["--worker", "extract", "--model", folder, "--items", str(items),
            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--size", str(size),
            "--dtype", args.dtype, "--device", args.device, "--store", str(store),
            "--sites", ",".join(sites), "--noise", ",".join(repr(p) for p in noise_levels),
            "--chunk-items", str(args.chunk_items or max(32, args.batch_size))]  # fmt: skip


def _memory(args, folder, sites, noise_levels, size, workdir, first, log) -> dict:
    if folder is None:
        return {"skipped": "needs a pipeline folder (the GPU run reports peak GPU memory instead)"}
    rows = []
    base = args.memory_items or args.items
    for items in (base, 10 * base):
        if first is not None and items == first["items"]:
            rows.append(first)
            continue
        wall, stdout = _run_worker(_extract_worker_argv(args, folder, sites, noise_levels, size,
                                                        items, workdir / f"mem-{items}"))  # fmt: skip
        rows.append({"items": items, "wall_s": wall, **json.loads(stdout.strip().splitlines()[-1])})
        log(
            f"fresh-process extraction of {items} items: {wall:.1f} s, "
            f"ru_maxrss {rows[-1]['ru_maxrss_mb']:.0f} MiB"
        )
    return {"runs": rows, "rss_ratio": rows[1]["ru_maxrss_mb"] / rows[0]["ru_maxrss_mb"],
            "goal": "ru_maxrss(10 N) / ru_maxrss(N) close to 1"}  # fmt: skip


def _mfu(
    args, model, images, sites, noise_levels, size, extract_s, passes, deadline, log, eager=None
) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from diffprobe.extract.plan import pool_fn
    from diffprobe.hooks.engine import capture

    batch = images[: args.batch_size]
    counted = eager or model  # FLOPs are counted on the eager copy (same work, no recompiles)
    with torch.inference_mode():
        x0 = model.encode_images(batch, size)
        x_t, t = model.add_noise(x0, noise_level=0.5, seed=args.seed, items=range(len(batch)))
        cond = model.encode_prompt([""] * len(batch))
        with FlopCounterMode(display=False) as counter:
            with capture(counted, sites, stop_early=True, reduce=pool_fn("mean")):
                counted.denoise(x_t, t, cond)
        early = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            counted.denoise(x_t, t, cond)
        full = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            counted.encode_images(batch, size)
        encode = counter.get_total_flops()
    per_item = early / len(batch)
    total = per_item * args.items * len(noise_levels)
    kwargs = model.denoiser_kwargs(x_t, t, cond.cond)
    budget = max(1, min(passes, args.bare_passes))
    bare_per_pass, done = _bare_passes(model, sites[-1], kwargs, budget, deadline, args.device)
    bare_s = bare_per_pass * args.items / len(batch) * len(noise_levels)
    extra = {}
    if eager is not None:
        eager_per_pass, _ = _bare_passes(eager, sites[-1], kwargs, budget, deadline, args.device)
        extra["bare_eager_s"] = eager_per_pass * args.items / len(batch) * len(noise_levels)
        extra["mfu_bare_eager"] = None if not args.peak_tflops else (
            total / extra["bare_eager_s"] / (args.peak_tflops * 1e12))  # fmt: skip
    with_encode = total + encode / len(batch) * args.items
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    log(
        f"FLOPs per early-stopped pass of {len(batch)}: {early / 1e12:.3f} T "
        f"({early / full:.0%} of a full pass); bare passes {bare_s:.2f} s vs extract {extract_s:.2f} s"
    )
    return {
        "flops_per_pass": early, "batch": len(batch), "flops_full_pass": full,
        "early_stop_fraction": early / full, "total_flops": total,
        "extract_flops_per_s": total / extract_s, "bare_flops_per_s": total / bare_s,
        "peak_flops_per_s": peak,
        "mfu_extract": None if peak is None else total / extract_s / peak,
        "mfu_bare": None if peak is None else total / bare_s / peak,
        "bare_passes_timed": done, "bare_s": bare_s, "extract_s": extract_s,
        "bare_over_extract": bare_s / extract_s,
        "encode_flops_per_item": encode / len(batch),
        "mfu_extract_with_encode": None if peak is None else with_encode / extract_s / peak,
        "bare": "compiled" if eager is not None else "eager", **extra,
    }  # fmt: skip


def _bare_passes(model, deepest: str, kwargs, budget: int, deadline, device) -> tuple[float, int]:
    """Seconds per bare denoiser pass with the extraction's early stop (a hook on the deepest
    site only), over ``budget`` passes after two warm-ups; (seconds, passes timed)."""
    handle = model.module(deepest).register_forward_hook(_raise_stop)
    done = 0
    try:
        with torch.inference_mode():  # the extraction's grad mode: its compiled graphs
            for _ in range(2):  # warm-up
                _bare(model, kwargs)
            _sync(device)
            began = time.perf_counter()
            while done < budget:
                _bare(model, kwargs)
                done += 1
                if done >= 3 and deadline.left() < 0:
                    break
            _sync(device)
            return (time.perf_counter() - began) / done, done
    finally:
        handle.remove()


def _raise_stop(module, args, output):
    raise _Stop


def _bare(model, kwargs) -> None:
    try:
        model.denoiser(**kwargs)
    except _Stop:
        pass


def _maxbatch(args, model, images, sites, size, deadline, log) -> dict:
    """Largest batch whose extraction step (encode + one captured, early-stopped pass) fits."""
    from diffprobe.extract.plan import pool_fn
    from diffprobe.hooks.engine import capture

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    reduce = pool_fn("mean")
    tried: dict[int, bool] = {}

    def fits(batch: int) -> bool:
        chosen = np.resize(images, (batch, *images.shape[1:]))
        try:
            with torch.no_grad():
                x0 = model.encode_images(chosen, size)
                x_t, t = model.add_noise(x0, noise_level=0.5, seed=args.seed, items=range(batch))
                cond = model.encode_prompt([""] * batch)
                with capture(model, sites, stop_early=True, reduce=reduce):
                    model.denoise(x_t, t, cond)
            _sync(args.device)
            ok = True
        except oom:
            ok = False
        finally:
            x0 = x_t = cond = None
            _free(args.device)
        tried[batch] = ok
        log(f"maxbatch: batch {batch} {'fits' if ok else 'out of memory'}")
        return ok

    low, high = 0, None  # low fits; high does not
    batch = max(1, args.batch_size)
    while batch <= args.max_batch and deadline.left() > 0:
        if fits(batch):
            low = batch
            batch *= 2
        else:
            high = batch
            break
    if low and high is None and low < args.max_batch and deadline.left() > 0:
        high = args.max_batch + 1 if fits(args.max_batch) else args.max_batch
        low = args.max_batch if high > args.max_batch else low
    while high is not None and high - low > 1 and deadline.left() > 0:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return {"largest_batch": low, "first_failing": high if high and high <= args.max_batch else None,
            "bound": args.max_batch, "tried": {str(k): v for k, v in sorted(tried.items())},
            "complete": high is None or high - low <= 1}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# output


def table(result: dict) -> str:
    config, phase = result["config"], result["phases"]
    lines = [
        f"model {config['model']} ({config['family']}, {config['denoiser_parameters'] / 1e6:.1f} M "
        f"denoiser parameters), {config['size']} px, {config['dtype']} on {config['device']} "
        f"({config['device_name']}), {config['threads']} threads",
        f"grid: {len(config['sites'])} sites × {len(config['noise_levels'])} noise levels, "
        f"{config['items']} items, batch {config['batch_size']}, empty prompt, mean pooling",
        f"run folders in {config['workdir']}: a new folder with one file there takes "
        f"{config['folder_with_file_us']:.0f} µs",
        "",
        f"{'method':<34} {'seconds':>9} {'images/s':>9}  {'ratio':>22}  values",
    ]
    extract = phase.get("extract")
    if extract:
        lines.append(f"{'diffprobe extract (zarr store)':<34} {extract['seconds']:9.2f} "
                     f"{extract['images_per_s']:9.1f}  {'1.00':>22}  reference")  # fmt: skip
    if "engine" in phase:
        e = phase["engine"]
        lines.append(f"{'  of which engine without store':<34} {e['seconds']:9.2f} "
                     f"{config['items'] / e['seconds']:9.1f}  {'store ' + format(e['store_and_bookkeeping_s'], '.2f') + ' s':>22}")  # fmt: skip
    if "invariant" in phase:
        v = phase["invariant"]
        lines.append(f"{'  extract --batch-invariant':<34} {v['seconds']:9.2f} "
                     f"{config['items'] / v['seconds']:9.1f}  {'it/diffprobe ' + format(v['over_default'], '.2f'):>22}  "
                     f"maxdiff={v['max_abs_diff_to_default']:.2e}")  # fmt: skip
    if "hand" in phase:
        h = phase["hand"]
        lines.append(f"{'hand-written loop (diffusers)':<34} {h['seconds']:9.2f} "
                     f"{config['items'] / h['seconds']:9.1f}  {'diffprobe/it ' + format(h['diffprobe_over_it'], '.2f'):>22}  "
                     f"equal={h['equal']} maxdiff={h['max_abs_diff']:.2e}")  # fmt: skip
    if "nnsight" in phase:
        n = phase["nnsight"]
        lines.append(f"{'nnsight NNsight(denoiser)':<34} {n['seconds']:9.2f} "
                     f"{config['items'] / n['seconds']:9.1f}  {'it/diffprobe ' + format(n['it_over_diffprobe'], '.2f'):>22}  "
                     f"equal={n['equal']} maxdiff={n['max_abs_diff']:.2e}")  # fmt: skip
    if "baseline" in phase:
        b = phase["baseline"]
        label = (
            f"seed-style grid ({b['units_measured']}/{b['units_total']} units, ×{b['units_total']})"
        )
        lines.append(f"{label:<34} {b['extrapolated_grid_s']:9.1f} "
                     f"{config['items'] / b['extrapolated_grid_s']:9.2f}  {'it/diffprobe ' + format(b['ratio'], '.1f'):>22}  "
                     f"equal={b['values_equal']}")  # fmt: skip
        lines.append(f"   extrapolated from {b['units_measured']} units: {b['how']}")
        lines.append(f"   diffprobe side: {b['diffprobe_side']} = {b['diffprobe_s']:.2f} s")
    lines.append("")
    if "memory" in phase and "runs" in phase["memory"]:
        m = phase["memory"]
        cells = ", ".join(
            f"{r['items']} items {r['ru_maxrss_mb']:.0f} MiB ({r['wall_s']:.1f} s)"
            for r in m["runs"]
        )
        lines.append(f"peak RSS (fresh processes): {cells}; ratio {m['rss_ratio']:.3f}")
    if extract and extract.get("peak_gpu_memory_gb") is not None:
        lines.append(f"peak GPU memory (extract): {extract['peak_gpu_memory_gb']:.2f} GiB "
                     f"(of which resident before it, the pipeline: "
                     f"{extract['resident_gpu_memory_gb']:.2f} GiB)")  # fmt: skip
    if "mfu" in phase:
        f = phase["mfu"]
        mfu = (
            ""
            if f["mfu_extract"] is None
            else f"MFU extract {f['mfu_extract']:.1%}, bare passes {f['mfu_bare']:.1%}; "
        )
        lines.append(f"FLOPs/pass (batch {f['batch']}, early stop = {f['early_stop_fraction']:.0%} of full): "
                     f"{f['flops_per_pass'] / 1e12:.3f} T; {mfu}bare passes {f['bare_s']:.2f} s = "
                     f"{f['bare_over_extract']:.0%} of extract")  # fmt: skip
    if "maxbatch" in phase:
        mb = phase["maxbatch"]
        lines.append(
            f"largest batch (encode + captured pass): {mb['largest_batch']} "
            f"(bound {mb['bound']}, first failing {mb['first_failing']})"
        )
    goals = []
    if "baseline" in phase:
        goals.append(f"vs seed-style ≥50×: {'met' if phase['baseline']['met'] else 'NOT met'}")
    if "nnsight" in phase:
        goals.append(f"vs nnsight ≥1× and equal: {'met' if phase['nnsight']['met'] else 'NOT met'}")
    if "hand" in phase:
        goals.append(f"overhead ≤1.1×: {'met' if phase['hand']['met'] else 'NOT met'}")
    if goals:
        lines.append("goals: " + "; ".join(goals))
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="tiny",
        help="pipeline folder, 'tiny', or 'dummy' (a random dummy_sd_pipeline)",
    )
    parser.add_argument(
        "--full-size",
        choices=("sd1.5", "sd2.1-base", "sd2.1", "sdxl", "sd3", "sd3.5"),
        help="a random-weight full-size architecture instead of --model",
    )
    parser.add_argument("--size", type=int, help="image size in px (default: native)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-items", type=int, help="store chunk (default max(32, batch))")
    parser.add_argument("--sites", nargs="*", help="override the 9 chosen sites")
    parser.add_argument("--noise", help="comma-separated noise levels (default: 11 levels)")
    parser.add_argument(
        "--memory-items", type=int, help="N of the memory phase (N and 10 N items; default --items)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", help=f"comma-separated subset of {','.join(PHASES)} "
                        f"(default {CPU_PHASES}; with --full-size {GPU_PHASES})")  # fmt: skip
    parser.add_argument("--repeats", type=int, help="in-process repeats (default 3 CPU, 1 GPU)")
    parser.add_argument(
        "--seed-units", type=int, help="seed-style units timed (default 6 CPU, 3 GPU)"
    )
    parser.add_argument("--bare-passes", type=int, default=50, help="bare denoiser passes timed")
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="dense peak of the device (default 989 on CUDA: H100/H200 SXM bf16)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        help="seconds; later phases shrink or skip (default 480 on CUDA)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="diffprobe's model compiled (Model.compile); peers on an eager copy",
    )
    parser.add_argument(
        "--compile-mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--workdir", help="where temporary stores go (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary stores")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quiet", action="store_true")
    # fresh-process workers
    parser.add_argument("--worker", choices=("seed", "extract"), help=argparse.SUPPRESS)
    parser.add_argument("--site", help=argparse.SUPPRESS)
    parser.add_argument("--noise-level", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.repeats = args.repeats or (1 if cuda else 3)
    args.seed_units = args.seed_units or (3 if args.full_size else 6)
    if args.peak_tflops is None and cuda:
        args.peak_tflops = 989.0
    if args.time_budget is None and cuda:
        args.time_budget = 480.0
    if args.out is None and not args.worker:
        stem = f"extract-{args.full_size}-{args.size or 'native'}" if args.full_size else "extract"
        args.out = Path(__file__).resolve().parent / "out" / f"{stem}.json"
    return args


def main(argv: list[str] | None = None) -> None:
    _quiet_libraries()
    args = parse(argv)
    if args.worker == "seed":
        _worker_seed(args)
        return
    if args.worker == "extract":
        _worker_extract(args)
        return
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # also for the worker processes
        import diffusers.utils.logging
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    began = time.perf_counter()
    result = run(args)
    result["command"] = " ".join(
        ["benchmarks/extract.py", *(sys.argv[1:] if argv is None else argv)]
    )
    result["wall_s"] = time.perf_counter() - began
    write_json(args.out, result)
    print(table(result))
    print(f"wrote {args.out} ({result['wall_s']:.0f} s in all)", file=sys.stderr)


if __name__ == "__main__":
    main()
