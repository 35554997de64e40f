"""Ground truth for attribution on `tiny`: do the shape and colour words' maps cover the shape?

For N shapes-world captions (train split, seed 0) `tiny` generates one image each (seed i,
the family's default guidance, STEPS DDIM steps); the ground-truth mask of each generated
image is the attribute reader's foreground (diffprobe.data.attributes.foreground_masks). For
each layer group (all, down, mid, up) x timestep range (all, early, middle, late) it reports
the mIoU (threshold 0.4 on min-max normalised maps, and the best threshold of a sweep) of

- the shape word's map and the colour word's map,
- a centred Gaussian (sigma = 0.25 of the side), the same for every image,
- a random token of the prompt (uniform over its non-special tokens that are not the word),

and the fraction of images whose position phrase ("top left", ...) map has its centre of mass
in the captioned quadrant (chance 0.25). Also: the fraction of images the reader reads with the
captioned shape and colour, and the mIoU on those alone.

    PYTHONPATH=src python benchmarks/attribution_tiny.py [--items 128] [--steps 20]

writes benchmarks/results/attribution_tiny.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import diffprobe
from diffprobe.analysis import attribution as maths
from diffprobe.data import shapes
from diffprobe.data.attributes import foreground_masks, read_attributes
from diffprobe.stages.attribution import attribute_prompt

GROUPS = (None, ("down",), ("mid",), ("up",))
RANGES = (None, ("early",), ("middle",), ("late",))
THRESHOLD = 0.4
TAUS = np.round(np.arange(0.05, 0.951, 0.05), 2)


def _name(choice):
    return "all" if choice is None else choice[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/attribution_tiny.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = diffprobe.load("tiny")
    sample = shapes.sample(args.items, seed=0, split="train")
    rng = np.random.default_rng(0)
    gaussian = maths.centred_gaussian(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    keys = [(g, r) for g in GROUPS for r in RANGES]
    maps = {k: {"shape": [], "colour": [], "random": [], "position": []} for k in keys}
    images, quadrants = [], []
    started = time.perf_counter()
    for i in range(args.items):
        factors = sample.item(i)
        prompt = sample.captions[i]
        result = attribute_prompt(model, prompt, seed=i, steps=args.steps)
        images.append(result.image)
        quadrants.append(factors["quadrant"])
        words = {
            "shape": shapes.SHAPES[factors["shape"]],
            "colour": shapes.COLOUR_NAMES[factors["colour"]],
            "position": shapes.QUADRANTS[factors["quadrant"]],
        }
        positions = {k: result.positions(w, model) for k, w in words.items()}
        others = [
            j
            for j, t in enumerate(result.tokens)
            if not t.special and j not in positions["shape"] and j not in positions["colour"]
        ]
        random_token = [int(rng.choice(others))]
        for group, ranges in keys:
            table = maps[(group, ranges)]
            for k in ("shape", "colour", "position"):
                table[k].append(result.map_of(positions[k], group, ranges))
            table["random"].append(result.map_of(random_token, group, ranges))
        print(f"{i + 1}/{args.items} {prompt!r}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - started
    images = np.stack(images)
    masks = foreground_masks(images)
    read = read_attributes(images)
    faithful = (read["shape"] == sample.factors["shape"]) & (
        read["colour"] == sample.factors["colour"]
    )
    quadrants = np.array(quadrants)

    def scores(values: np.ndarray, chosen: np.ndarray) -> dict:
        taus, curve = maths.threshold_sweep(values[chosen], masks[chosen], TAUS)
        best = int(np.argmax(curve))
        return {
            "mIoU@0.4": maths.mean_iou(values[chosen], masks[chosen], THRESHOLD),
            "best_threshold": float(taus[best]),
            "mIoU@best": float(curve[best]),
        }

    rows = []
    everyone = np.ones(args.items, dtype=bool)
    for group, ranges in keys:
        table = {k: np.stack(v) for k, v in maps[(group, ranges)].items()}
        gauss = np.broadcast_to(gaussian, table["shape"].shape)
        x, y = maths.centre_of_mass(table["position"])
        hits = shapes.quadrant_of(x, y) == quadrants
        sx, sy = maths.centre_of_mass(table["shape"])
        row = {"layers": _name(group), "timesteps": _name(ranges)}
        for subset, chosen in (("all", everyone), ("faithful", faithful)):
            row[subset] = {
                "shape_word": scores(table["shape"], chosen),
                "colour_word": scores(table["colour"], chosen),
                "gaussian": scores(gauss, chosen),
                "random_token": scores(table["random"], chosen),
            }
        row["position_word_quadrant_fraction"] = float(hits.mean())
        row["shape_word_quadrant_fraction"] = float(
            (shapes.quadrant_of(sx, sy) == quadrants).mean()
        )
        rows.append(row)
    report = {
        "items": args.items,
        "steps": args.steps,
        "guidance_scale": model.default_guidance_scale,
        "threshold": THRESHOLD,
        "faithful_fraction": float(faithful.mean()),
        "faithful_items": int(faithful.sum()),
        "mask_mean_area": float(masks.mean()),
        "seconds": seconds,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        a = row["all"]
        print(
            f"{row['layers']:>5} {row['timesteps']:>6}  shape {a['shape_word']['mIoU@0.4']:.3f}"
            f"  colour {a['colour_word']['mIoU@0.4']:.3f}  gauss {a['gaussian']['mIoU@0.4']:.3f}"
            f"  random {a['random_token']['mIoU@0.4']:.3f}"
            f"  position CoM {row['position_word_quadrant_fraction']:.3f}"
        )


if __name__ == "__main__":
    main()
