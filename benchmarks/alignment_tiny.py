"""Human alignment on the shapes world with ``tiny``: the numbers of ``docs/alignment.md``.

Exports the shapes world in the THINGS layout (48 colour × shape concepts, simulated odd-one-out
triplets with a stored noise ceiling), extracts every site × noise level with ``tiny`` (empty
prompt, spatial mean), then runs ``diffprobe.analysis.alignment.demo``: zero-shot odd-one-out
accuracy per (site, noise level) on the test triplets, and on the best one a linear probe and a
ridge regression onto the true factors, K folds over objects.

    .venv/bin/python benchmarks/alignment_tiny.py                     # 12 images per concept
    .venv/bin/python benchmarks/alignment_tiny.py --images-per-concept 4 --folds 3   # = make demo

Prints the table and writes a JSON summary (``--result``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict:
    import torch

    import diffprobe
    from diffprobe.analysis.alignment import demo
    from diffprobe.data.sources import open_source
    from diffprobe.data.things_export import export_things
    from diffprobe.demo import DEMO_GRID_SITES, DEMO_NOISE
    from diffprobe.extract.engine import Condition, ExtractionPlan, extract

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images-per-concept", type=int, default=12)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=HERE / "out" / "alignment_tiny")
    parser.add_argument("--result", type=Path, default=HERE / "results" / "alignment_tiny.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    began = time.perf_counter()
    root = args.work / f"things-{args.images_per_concept}"
    if not (root / "things_concepts.tsv").exists():
        export_things(root, images_per_concept=args.images_per_concept)
    model = diffprobe.load("tiny")
    plan = ExtractionPlan(sites=DEMO_GRID_SITES, noise_levels=DEMO_NOISE,
                          conditions=[Condition("empty")], pooling="mean")  # fmt: skip
    run_dir = extract(model, open_source(str(root)), plan, args.work / f"run-{args.images_per_concept}",
                      batch_size=args.batch_size, progress=True)  # fmt: skip
    numbers = demo(run_dir, root, args.work / f"alignment-{args.images_per_concept}",
                   folds=args.folds)  # fmt: skip
    summary = {
        "command": "python benchmarks/alignment_tiny.py " + " ".join(argv or sys.argv[1:]),
        "images_per_concept": args.images_per_concept,
        "folds": args.folds,
        "sites": DEMO_GRID_SITES,
        "noise_levels": DEMO_NOISE,
        "chance": 1 / 3,
        "ceiling": numbers["ceiling"],
        "best": numbers["best"],
        "probe": {k: v for k, v in numbers["probe"].items()},
        "regression": numbers["regression"],
        "by_site_best_noise": _best_per_site(numbers["rows"]),
        "seconds": time.perf_counter() - began,
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(summary, indent=1, default=float))
    print(f"wrote {args.result} ({summary['seconds']:.0f} s)")
    return summary


def _best_per_site(rows: list[dict]) -> dict:
    best: dict = {}
    for row in rows:
        if row["site"] not in best or row["accuracy"] > best[row["site"]]["accuracy"]:
            best[row["site"]] = {"noise": row["noise"], "accuracy": row["accuracy"],
                                 "normalised": row["normalised"]}  # fmt: skip
    return best


if __name__ == "__main__":
    main()
