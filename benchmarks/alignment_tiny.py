"""Human alignment on the shapes world with ``tiny``: the numbers of ``docs/alignment.md``.

Exports the shapes world in the THINGS layout (48 colour × shape concepts, simulated odd-one-out
triplets with a stored noise ceiling), extracts every site × noise level × condition with
``tiny`` (the empty prompt and the label prompt "a {label}", spatial mean), then runs
``diffprobe.stages.demo.alignment_demo``: zero-shot odd-one-out accuracy per (site, noise level,
condition) on the test triplets; on the best one a linear probe and a ridge regression onto the
true factors, K folds over objects; and the regression on the best site of each condition.

    .venv/bin/python benchmarks/alignment_tiny.py          # 12 images per concept, 5 folds: = make demo

Prints the table and writes a JSON summary (``--result``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict:
    import torch

    import diffprobe
    from diffprobe.data.sources import open_source
    from diffprobe.data.things_export import export_things
    from diffprobe.extract import Condition, ExtractionPlan, extract
    from diffprobe.stages.demo import DEMO_CONDITIONS, DEMO_GRID_SITES, DEMO_NOISE, alignment_demo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images-per-concept", type=int, default=12)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-shape-check", action="store_true", help="skip the image-level shape decoding check"
    )
    parser.add_argument("--work", type=Path, default=HERE / "out" / "alignment_tiny")
    parser.add_argument("--result", type=Path, default=HERE / "results" / "alignment_tiny.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    began = time.perf_counter()
    root = args.work / f"things-{args.images_per_concept}"
    if not (root / "things_concepts.tsv").exists():
        export_things(root, images_per_concept=args.images_per_concept)
    model = diffprobe.load("tiny")
    plan = ExtractionPlan(sites=DEMO_GRID_SITES, noise_levels=DEMO_NOISE, pooling="mean",
                          conditions=[Condition(**c) for c in DEMO_CONDITIONS])  # fmt: skip
    run_dir = args.work / f"run-{args.images_per_concept}"
    shutil.rmtree(run_dir, ignore_errors=True)  # extract afresh: the timing includes it
    extract(model, open_source(str(root)), plan, run_dir, batch_size=args.batch_size, progress=True)
    numbers = alignment_demo(run_dir, root, args.work / f"alignment-{args.images_per_concept}",
                   folds=args.folds)  # fmt: skip
    summary = {
        "command": "python benchmarks/alignment_tiny.py " + " ".join(argv or sys.argv[1:]),
        "images_per_concept": args.images_per_concept,
        "folds": args.folds,
        "sites": DEMO_GRID_SITES,
        "noise_levels": DEMO_NOISE,
        "conditions": DEMO_CONDITIONS,
        "chance": 1 / 3,
        "ceiling": numbers["ceiling"],
        "best": numbers["best"],
        "probe": {k: v for k, v in numbers["probe"].items()},
        "regression": numbers["regression"],
        "best_by_condition": numbers["best_by_condition"],
        "by_site_best_noise": _best_per_site(numbers["rows"]),
        "image_shape_decoding": None if args.no_shape_check else _shape_check(run_dir),
        "seconds": time.perf_counter() - began,
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(summary, indent=1, default=float))
    print(f"wrote {args.result} ({summary['seconds']:.0f} s)")
    return summary


def _shape_check(run_dir: Path) -> dict:
    """How much shape single images' pooled features carry: a logistic regression predicts each
    image's shape (6 kinds, chance 1/6) from one feature set, trained on 6 of the 8 colours and
    tested on the other 2 (4 folds over colours), for every (site, noise, condition), and from
    the image's own pixels (grey, 16×16, flattened) as a baseline."""
    import warnings

    import numpy as np
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import diffprobe

    run = diffprobe.open_run(run_dir)
    colour = np.array([label.split()[0] for label in run.labels])
    shape = np.array([label.split()[1] for label in run.labels])
    colours = sorted(set(colour))
    folds = [colours[i::4] for i in range(4)]

    def accuracy(x: np.ndarray) -> float:
        scores = []
        for held_out in folds:
            test = np.isin(colour, held_out)
            model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.fit(x[~test], shape[~test])
            scores.append(float((model.predict(x[test]) == shape[test]).mean()))
        return float(np.mean(scores))

    pixels = np.stack([
        np.asarray(Image.open(item["path"]).convert("L").resize((16, 16)), dtype=np.float64).ravel()
        for item in run.manifest
    ])  # fmt: skip
    by_set = {f"{site} {noise} {condition}": accuracy(run.get(site, noise, condition))
              for site, noise, condition in run.keys()}  # fmt: skip
    for condition in run.conditions:
        values = [v for k, v in by_set.items() if k.endswith(f" {condition}")]
        print(
            f"image-level shape decoding, condition {condition}: {min(values):.2f}-"
            f"{max(values):.2f} over {len(values)} feature sets (chance {1 / 6:.2f})"
        )
    result = {"chance": 1 / 6, "pixels_16px": accuracy(pixels), "features": by_set}
    print(f"image-level shape decoding from the pixels: {result['pixels_16px']:.2f}")
    return result


def _best_per_site(rows: list[dict]) -> dict:
    """{"site | condition": the best noise level's accuracy}."""
    best: dict = {}
    for row in rows:
        key = f"{row['site']} | {row['condition']}"
        if key not in best or row["accuracy"] > best[key]["accuracy"]:
            best[key] = {"noise": row["noise"], "accuracy": row["accuracy"],
                         "normalised": row["normalised"]}  # fmt: skip
    return best


if __name__ == "__main__":
    main()
