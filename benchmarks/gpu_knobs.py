"""Where a full-size extraction's GPU time goes, and which switches move it (issue 25).

One process, one random-weight full-size pipeline (``diffprobe.testing.full_size``), one batch.
For each configuration it times, after warm-ups and with the device synchronised:

- ``bare``: one full denoiser pass (no hooks), the ceiling;
- ``capture``: one pass through the hook engine capturing the 9 benchmark sites (mean pooled)
  with early stop after the deepest, as ``extract`` runs it;
- ``encode``: the VAE encoding of the batch (``Model.encode_images``);
- ``extract``: ``diffprobe.extract.extract`` of ``--items`` items × the 11 noise levels
  into a fresh run folder (store writes included), from which MFU is computed with and without
  the encoder's FLOPs.

``--variants``: ``eager`` and then at most one compiled variant per process (compiled graphs
are not undone): ``compiled`` (``Model.compile``), ``compiled+channels_last``,
``compiled+tuned`` (inductor's ``conv_1x1_as_mm`` and coordinate-descent tuning),
``compiled+channels_last+tuned``; the layout is set before compiling. ``--nnsight`` times
nnsight on an eager copy of the pipeline (nnsight replaces the wrapped blocks' ``forward``,
which ``Model.compile`` then leaves eager). Each row is written to ``--out`` as soon as it is
measured. FLOPs are counted once (``FlopCounterMode``) on the eager model. (The first run,
``benchmarks/results/gpu-knobs-sd1.5-h100-partial.json``, came from an earlier version that
toggled ``cudnn.benchmark`` and converted layouts in one process; its note says which rows
hold.)

    python3 benchmarks/gpu_knobs.py --full-size sd1.5 --size 512 --batch 32 --dtype bf16 \
        --items 128 --variants eager,compiled --nnsight --out knobs-sd15.json
    python3 benchmarks/gpu_knobs.py ... --variants compiled+channels_last+tuned --out k2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract import (  # noqa: E402
    DTYPES,
    NOISE_LEVELS,
    choose_sites,
    execution_order,
    nnsight_grid,
)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, repeats: int, warm: int = 2) -> float:
    """Seconds per call: ``warm`` warm-ups, then ``repeats`` calls between synchronisations."""
    for _ in range(warm):
        fn()
    _sync()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - began) / max(1, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-size", default="sd1.5")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--items", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument(
        "--variants",
        default="eager,compiled",
        help="eager, then at most one compiled variant: compiled, "
        "compiled+channels_last, compiled+tuned, compiled+channels_last+tuned",
    )
    parser.add_argument("--nnsight", action="store_true", help="time nnsight on an eager copy")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=540.0, help="stop before this many s")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    began = time.perf_counter()

    import diffprobe
    from diffprobe.data.sources import open_source
    from diffprobe.extract import Condition, ExtractionPlan, extract
    from diffprobe.extract.plan import pool_fn
    from diffprobe.hooks.engine import capture
    from diffprobe.testing.full_size import random_pipeline

    dtype = DTYPES[args.dtype]
    pipe = random_pipeline(args.full_size, args.device, dtype)
    model = diffprobe.from_pipeline(pipe, name=args.full_size)
    model.compiled_once = False
    source = open_source(f"shapes:{max(args.items, args.batch)}:0")
    images = source.load(range(args.batch))
    size = args.size
    noise_levels = list(NOISE_LEVELS)
    with torch.inference_mode():
        x0 = model.encode_images(images, size)
        cond = model.encode_prompt([""] * args.batch)
        x_t, t = model.add_noise(x0, noise_level=0.5, seed=0, items=range(args.batch))
    sites = execution_order(model, choose_sites(model), x0[:1], model.encode_prompt([""]))
    reduce = pool_fn("mean")
    kwargs = model.denoiser_kwargs(x_t, t, cond.cond)

    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            model.denoiser(**kwargs)
        pass_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.encode_images(images, size)
        encode_flops = counter.get_total_flops()
    peak = args.peak_tflops * 1e12
    result = {
        "config": {"model": args.full_size, "size": size, "batch": args.batch,
                   "dtype": args.dtype, "items": args.items, "noise_levels": noise_levels,
                   "sites": sites, "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "torch": torch.__version__, "pass_tflops": pass_flops / 1e12,
                   "encode_tflops": encode_flops / 1e12, "peak_tflops": args.peak_tflops,
                   "command": " ".join(sys.argv)},
        "rows": [],
    }  # fmt: skip

    def bare() -> None:
        with torch.inference_mode():
            model.denoiser(**kwargs)

    def captured() -> None:
        with torch.inference_mode():
            with capture(model, sites, stop_early=True, reduce=reduce):
                model.denoise(x_t, t, cond)

    def encode() -> None:
        with torch.inference_mode():
            model.encode_images(images, size)

    def run_extract() -> float:
        plan = ExtractionPlan(sites=sites, noise_levels=noise_levels,
                              conditions=[Condition("empty")], image_size=size,
                              chunk_items=args.batch)  # fmt: skip
        items = open_source(f"shapes:{args.items}:0")
        with tempfile.TemporaryDirectory() as folder:
            _sync()
            start = time.perf_counter()
            extract(model, items, plan, Path(folder) / "run", batch_size=args.batch,
                    progress=False)  # fmt: skip
            _sync()
            return time.perf_counter() - start

    def measure(label: str) -> None:
        if time.perf_counter() - began > args.budget:
            result.setdefault("skipped", []).append(label)
            return
        start = time.perf_counter()
        first = _time(captured, 1, warm=0)  # compiles, when compiled
        _time(encode, 1, warm=0)
        row = {"config": label, "warm_s": time.perf_counter() - start, "first": first}
        row["bare_ms"] = 1e3 * _time(bare, args.repeats)
        row["capture_ms"] = 1e3 * _time(captured, args.repeats)
        row["encode_ms"] = 1e3 * _time(encode, max(2, args.repeats // 2))
        run_extract()  # warm (a new chunk count compiles nothing, but allocates)
        row["extract_s"] = run_extract()
        passes = args.items / args.batch * len(noise_levels)
        unet = pass_flops * passes
        enc = encode_flops * args.items / args.batch
        row["mfu_bare"] = pass_flops / (row["bare_ms"] / 1e3) / peak
        row["mfu_capture"] = pass_flops / (row["capture_ms"] / 1e3) / peak
        row["mfu_encode"] = encode_flops / (row["encode_ms"] / 1e3) / peak
        row["mfu_extract"] = unet / row["extract_s"] / peak
        row["mfu_extract_with_encode"] = (unet + enc) / row["extract_s"] / peak
        row["extract_over_parts"] = row["extract_s"] / (
            (row["capture_ms"] * passes + row["encode_ms"] * args.items / args.batch) / 1e3
        )
        if "nnsight_s" in result:
            row["nnsight_over_extract"] = result["nnsight_s"] / row["extract_s"]
        row["elapsed_s"] = time.perf_counter() - began
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(result, indent=2))

    if args.nnsight:
        try:  # nnsight on an eager copy (it patches the modules it wraps), cudnn's default
            import copy

            peer_pipe = copy.deepcopy(model.pipe)
            every = open_source(f"shapes:{args.items}:0").load(range(args.items))

            def peer() -> None:
                nnsight_grid(peer_pipe, every, sites, noise_levels, batch_size=args.batch,
                             seed=0, size=size)  # fmt: skip

            nnsight_grid(peer_pipe, images, sites, noise_levels[:1], batch_size=args.batch,
                         seed=0, size=size)  # fmt: skip
            result["nnsight_s"] = _time(peer, 1, warm=0)
            print(f"nnsight {result['nnsight_s']:.2f} s", flush=True)
            del peer_pipe
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 - nnsight absent or failing: the rest runs
            result["nnsight_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    for variant in args.variants.split(","):
        if variant == "eager":
            measure("eager")
            continue
        if variant not in VARIANTS:
            raise SystemExit(
                f"unknown variant {variant!r}; choose from eager, {', '.join(VARIANTS)}"
            )
        if model.compiled_once:
            break  # one compiled variant per process: compiled graphs are not undone
        model.compiled_once = True
        channels_last, tuned = VARIANTS[variant]
        model.compile(channels_last=channels_last, tuned=tuned)
        measure(variant)
    args.out.write_text(json.dumps(result, indent=2))


VARIANTS = {  # name: (channels_last, tuned)
    "compiled": (False, False),
    "compiled+channels_last": (True, False),
    "compiled+tuned": (False, True),
    "compiled+channels_last+tuned": (True, True),
}


if __name__ == "__main__":
    main()
