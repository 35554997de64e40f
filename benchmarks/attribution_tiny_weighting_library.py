"""End to end: the held-out numbers of ``--weighting output-rollout-words --layers all`` (and
``attention`` with the default layers) through the library's own path, not the benchmark's
recomputation.

For the report half (items N/2 .. N-1 of the same shapes-world captions, seed i, 10 DDIM
steps) :func:`diffprobe.stages.attribution.attribute_prompt` generates each image with the
weighting; the shape word's and the random token's maps come from
``PromptAttribution.map_of`` (the path ``diffprobe attribution`` takes), are thresholded at
the τ that ``benchmarks/attribution_tiny_weighting.py`` chose on the selection half (read
from its JSON) and scored against the reader's foreground. The random token is drawn exactly
as there (``default_rng(0)`` over every item in order).

    PYTHONPATH=src python benchmarks/attribution_tiny_weighting_library.py \
        [--out benchmarks/results/attribution_tiny_weighting_library.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution_tiny import role_of  # noqa: E402

import diffprobe  # noqa: E402
from diffprobe.analysis import attribution as maths  # noqa: E402
from diffprobe.data import shapes  # noqa: E402
from diffprobe.data.attributes import foreground_masks  # noqa: E402
from diffprobe.stages.attribution import attribute_prompt, prompt_tokens  # noqa: E402

RUNS = {  # weighting -> (layers, timesteps, the benchmark's method name)
    "output-rollout-words": (["all"], None, "output_dot_projected+rollout_prompt_words", "all"),
    "attention": (None, None, "raw", "down+up"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scores", default="benchmarks/results/attribution_tiny_weighting.json")
    parser.add_argument(
        "--out", default="benchmarks/results/attribution_tiny_weighting_library.json"
    )
    parser.add_argument(
        "--fresh",
        type=int,
        default=0,
        help="score items --items .. --items + FRESH instead: captions and images the study never "
        "saw (the shapes sample is prefix-stable; the random token continues the same draws)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = diffprobe.load("tiny")
    sample = shapes.sample(args.items + args.fresh, seed=0, split="train")
    scores = json.loads(Path(args.scores).read_text())
    rng = np.random.default_rng(0)
    shape_at, random_at = [], []
    for i, caption in enumerate(sample.captions):
        tokens = prompt_tokens(model, caption)
        shape = shapes.SHAPES[sample.factors["shape"][i]]
        colour = shapes.COLOUR_NAMES[sample.factors["colour"][i]]
        roles = [role_of(t.piece, t.special, j == 0, shape, colour) for j, t in enumerate(tokens)]
        others = [j for j, r in enumerate(roles) if r not in ("start", "end", "shape", "colour")]
        random_at.append(int(rng.choice(others)))
        shape_at.append([j for j, r in enumerate(roles) if r == "shape"])
    chosen = (
        range(args.items, args.items + args.fresh) if args.fresh
        else range(args.items // 2, args.items)
    )  # fmt: skip
    report = {"items": list(chosen), "runs": {}}
    for weighting, (layers, ranges, method, layer_set) in RUNS.items():
        row = next(
            r
            for r in scores["rows"]
            if r["method"] == method and r["layers"] == layer_set and r["timesteps"] == "all"
        )
        taus = {"shape": row["shape"]["tau"], "random_token": row["random_token"]["tau"]}
        ious: dict[str, list[float]] = {"shape": [], "random_token": []}
        for i in report["items"]:
            result = attribute_prompt(
                model, sample.captions[i], seed=i, steps=args.steps, weighting=weighting
            )
            mask = foreground_masks(result.image[None])[0]
            for name, indices in (("shape", shape_at[i]), ("random_token", [random_at[i]])):
                values = result.map_of(indices, layers, ranges, weighting)
                hit = maths.normalise(values) >= taus[name]
                ious[name].append(float(maths.iou(hit, mask)))
            print(f"{weighting} {i}", file=sys.stderr, flush=True)
        diff = np.array(ious["shape"]) - np.array(ious["random_token"])
        report["runs"][weighting] = {
            "layers": layers or "default",
            "taus": taus,
            "shape_mIoU": float(np.mean(ious["shape"])),
            "random_token_mIoU": float(np.mean(ious["random_token"])),
            "shape-random_token": float(diff.mean()),
            "ci95": float(1.96 * diff.std(ddof=1) / np.sqrt(len(diff))),
            "benchmark_shape_mIoU": row["shape"]["report_mIoU@tau"],
            "benchmark_random_token_mIoU": row["random_token"]["report_mIoU@tau"],
        }
        print(weighting, report["runs"][weighting])
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
