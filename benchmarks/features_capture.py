"""Cost of capturing activity during generation, as a ratio to the plain pipeline's generation
of the same prompts and seeds, in one process (issue 18's goal: <= 1.1x).

Three ways to produce the same images, interleaved ``--repeats`` times (minimum kept):

- ``plain``: ``model.generate(prompts, seed=[...])``, no hooks;
- ``capture``: the same inside the feature capture (``generate_batch``: hooks on every site,
  the spatial mean (and max with ``--reduce mean,max``) per call on the device, copied to the
  host at the end);
- ``capture_to_disk``: ``capture_activity`` into a fresh folder (the above plus the zarr
  arrays, PNGs, run.json and progress markers).

CPU, the embedded model::

    PYTHONPATH=src .venv/bin/python benchmarks/features_capture.py --items 16 --steps 20

GPU, the full-size SD1.5 architecture with random weights (``diffprobe.testing.full_size``;
FLOPs and memory of the real model, no weights needed)::

    PYTHONPATH=src python3 benchmarks/features_capture.py --full-size sd1.5 --device cuda \\
        --dtype bf16 --size 512 --items 16 --batch-size 8 --steps 25 \\
        --sites unet.up_blocks.1.attentions.1,unet.mid_block,unet.down_blocks.2

Issue 25's setting (4 sites, 50 steps, batch 8, compiled both)::

    PYTHONPATH=src python3 benchmarks/features_capture.py --full-size sd1.5 --device cuda \\
        --dtype bf16 --size 512 --items 16 --batch-size 8 --steps 50 --compile \\
        --sites unet.down_blocks.2,unet.mid_block,unet.up_blocks.1,unet.up_blocks.2

Writes JSON (``--out``, default ``benchmarks/results/features_capture-<model>-<device>.json``)
and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--full-size", default=None, help="e.g. sd1.5: random weights")
    parser.add_argument("--sites", default="unet.down_blocks.1,unet.mid_block,unet.up_blocks.1")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--reduce", default="mean")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Model.compile() first: plain and capture both run compiled",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import diffprobe
    from diffprobe import features

    if args.full_size:
        from diffprobe.testing.full_size import random_pipeline

        pipe = random_pipeline(args.full_size, args.device, DTYPES[args.dtype])
        model = diffprobe.from_pipeline(pipe, name=args.full_size)
    else:
        model = diffprobe.load(args.model, dtype=args.dtype, device=args.device)
    name = args.full_size or args.model
    if args.compile:
        model.compile()
    sites = args.sites.split(",")
    prompts = [f"a photo of object number {i}" for i in range(args.items)]
    seeds = list(range(args.items))
    plan = features.ActivityPlan(
        sites=sites, seeds=[0], steps=args.steps, guidance_scale=args.guidance, size=args.size,
        reductions=tuple(args.reduce.split(",")), chunk_items=args.batch_size,
    )  # fmt: skip
    uses_cfg = model.generation_uses_cfg(args.guidance)
    branches = ["cond"] if uses_cfg else ["none"]
    reduce = {site: features.reducer(plan.reductions) for site in sites}
    batches = [slice(s, s + args.batch_size) for s in range(0, args.items, args.batch_size)]

    def plain() -> None:
        with torch.inference_mode():
            for part in batches:
                model.generate(prompts[part], steps=args.steps, guidance_scale=args.guidance,
                               seed=seeds[part], size=args.size)  # fmt: skip

    def capture() -> None:
        with torch.inference_mode():
            for part in batches:
                features.generate_batch(model, prompts[part], seeds[part], plan, reduce, branches)

    def to_disk() -> None:
        with tempfile.TemporaryDirectory() as folder:
            features.capture_activity(model, prompts, plan, Path(folder) / "run",
                                      batch_size=args.batch_size, progress=False)  # fmt: skip

    plain()  # warm-up: kernels, allocator, lazy imports
    times: dict[str, list[float]] = {"plain": [], "capture": [], "capture_to_disk": []}
    for _ in range(args.repeats):
        for key, fn in (("plain", plain), ("capture", capture), ("capture_to_disk", to_disk)):
            _sync(args.device)
            began = time.perf_counter()
            fn()
            _sync(args.device)
            times[key].append(time.perf_counter() - began)
    best = {k: min(v) for k, v in times.items()}
    result = {
        "model": name, "full_size": bool(args.full_size), "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype, "sites": sites, "items": args.items, "batch_size": args.batch_size,
        "steps": args.steps, "guidance": args.guidance, "cfg": uses_cfg, "size": args.size,
        "reductions": list(plan.reductions), "compiled": args.compile, "threads": torch.get_num_threads(),
        "seconds": times, "best_seconds": best,
        "ratio_capture": best["capture"] / best["plain"],
        "ratio_capture_to_disk": best["capture_to_disk"] / best["plain"],
        "goal": "capture <= 1.1 x plain",
    }  # fmt: skip
    out = args.out or Path(f"benchmarks/results/features_capture-{name}-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
