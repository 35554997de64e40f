"""Cost growth of ``extract``: images/s as the number of items grows (256 -> 4096), one process.

The model is built (and, with ``--compile``, compiled and warmed up) once; then the same grid is
extracted over N items for each N of ``--items`` into a fresh run folder, in the order given and
again in reverse (so a warm-up or a slow first run does not favour one N). A per-item or
per-array overhead that grows with N shows as falling images/s. Goal: within 10 % from the
smallest to the largest N.

    python3 benchmarks/growth.py --full-size sd1.5 --size 512 --dtype bf16 --device cuda \\
        --items 256,1024,4096 --noise 0.5 --batch-size 32 --compile --out growth.json

On the CPU (``--model tiny --device cpu --items 64,256``) it runs in a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import extract as bench  # noqa: E402  (benchmarks/extract.py: shared helpers)

from diffprobe.data.sources import open_source  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--full-size")
    parser.add_argument("--size", type=int)
    parser.add_argument("--dtype", default="fp32", choices=sorted(bench.DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--items", default="256,1024,4096")
    parser.add_argument("--noise", default="0.5")
    parser.add_argument("--sites", nargs="*")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    args.worker, args.compile_mode = None, None

    def log(message: str) -> None:
        print(f"[growth] {message}", file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="diffprobe-growth-"))
    model, _, build_s, _ = bench._load(args, workdir, log)
    if args.compile:
        model.compile()
    size = args.size or model.resolution
    counts = [int(v) for v in args.items.split(",")]
    noise = [float(v) for v in args.noise.split(",")]
    source_all = open_source(f"shapes:{max(counts)}:{args.seed}")
    images = source_all.load(range(args.batch_size))
    with torch.no_grad():
        x0 = model.encode_images(images[:1], size)
    cond = model.encode_prompt([""])
    sites = args.sites or bench.choose_sites(model)
    sites = bench.execution_order(model, sites, x0, cond)
    warm_s, _ = bench.timed(
        lambda: bench._warm_up(model, images, sites, size, args, args.device), args.device
    )
    log(f"{len(sites)} sites x {len(noise)} noise levels; warm-up {warm_s:.1f} s")
    rows: dict[int, list[float]] = {n: [] for n in counts}
    for order in (counts, counts[::-1]):
        for n in order:
            source = open_source(f"shapes:{n}:{args.seed}")
            root = workdir / f"run-{n}-{len(rows[n])}"
            seconds, _ = bench.timed(lambda source=source, root=root: bench.diffprobe_extract(
                model, source, sites, noise, batch_size=args.batch_size, seed=args.seed,
                size=size, chunk_items=max(32, args.batch_size), root=root), args.device)  # fmt: skip
            rows[n].append(seconds)
            log(f"{n} items: {seconds:.2f} s = {n / seconds:.1f} images/s")
    best = {n: n / min(times) for n, times in rows.items()}
    result = {
        "config": {
            "model": args.full_size or args.model,
            "size": size,
            "dtype": args.dtype,
            "device": torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else args.device,
            "sites": sites,
            "noise_levels": noise,
            "batch_size": args.batch_size,
            "compile": args.compile,
            "build_s": build_s,
            "warm_up_s": warm_s,
        },  # fmt: skip
        "seconds": {str(n): t for n, t in rows.items()},
        "images_per_s_best": {str(n): v for n, v in best.items()},
        "largest_vs_smallest": best[max(counts)] / best[min(counts)],
    }
    log(f"images/s largest/smallest N: {result['largest_vs_smallest']:.3f}")
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
