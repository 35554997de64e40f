"""What the high-norm detector finds on `tiny` (issue 17): the share of detected windows that
overlap the drawn shape, against the share of the image the shapes cover (what random windows
would give), per site, with the default fixed 2x2 window and with the paper's site-scaled
window (labels on the 16x16 grid of up_blocks.1, as the paper labels SD's 32x32 one). 'random'
is the share of all windows of the same size in the same images that touch the shape.

    PYTHONPATH=src python benchmarks/anomalies_tiny_fidelity.py [--items 32] [--noise 0.2]

Prints one row per (site, window rule): detections, images with detections, share on the shape,
shape area share. CPU, about a minute on 2 cores.
"""

from __future__ import annotations

import argparse

import numpy as np

import diffprobe
from diffprobe.analysis.anomalies import detect_high_norm, norm_maps, to_grid
from diffprobe.data import shapes
from diffprobe.data.sources import open_source
from diffprobe.extract import ExtractionPlan
from diffprobe.extract.engine import extract_arrays

SITES = ["unet.down_blocks.0", "unet.down_blocks.1", "unet.mid_block", "unet.up_blocks.1",
         "unet.up_blocks.2"]  # fmt: skip


def shape_masks(n: int) -> np.ndarray:
    """(items, 64, 64) bool: the pixels of the drawn shape (they change with its colour)."""
    sample = shapes.sample(n)
    masks = np.zeros((n, 64, 64), dtype=bool)
    for i in range(n):
        f = sample.item(i)
        other = (int(f["colour"]) + 3) % len(shapes.COLOUR_NAMES)
        again = shapes.render(f["shape"], other, f["size"], f["x"], f["y"], f["background"],
                              f["rotation"])  # fmt: skip
        masks[i] = np.abs(again.astype(int) - sample.images[i].astype(int)).sum(-1) > 0
    return masks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--noise", type=float, default=0.2)
    args = parser.parse_args()
    model = diffprobe.load("tiny")
    plan = ExtractionPlan(sites=SITES, noise_levels=[args.noise], pooling="none")
    arrays = extract_arrays(model, open_source(f"shapes:{args.items}"), plan, batch_size=16)
    masks = shape_masks(args.items)
    area = masks.mean()
    print(f"tiny, {args.items} shapes images, noise {args.noise}; shape area share {area:.3f}")
    print(
        f"{'site':<22} {'grid':>5} {'window':>9} {'detections':>10} {'images':>6} {'on shape':>8} {'random':>6}"
    )
    for site in SITES:
        maps = to_grid(arrays[(site, plan.grid()[0]["key"], "empty")])
        height = maps.shape[1]
        norms = norm_maps(maps)
        for rule, group in (("2x2", 2), ("scaled", max(1, int(2 * height / 16)))):
            group = min(group, height)
            found = detect_high_norm(norms, 2.0, group)
            scale = 64 // height
            on = [masks[i, y * scale : (y + group) * scale, x * scale : (x + group) * scale].any()
                  for i, y, x in zip(found["item"], found["y"], found["x"], strict=True)]  # fmt: skip
            share = float(np.mean(on)) if on else float("nan")
            side = group * scale
            touching = [masks[i, y : y + side, x : x + side].any()
                        for i in set(found["item"].tolist())
                        for y in range(0, 64 - side + 1, scale)
                        for x in range(0, 64 - side + 1, scale)]  # fmt: skip
            random = float(np.mean(touching)) if touching else float("nan")
            print(
                f"{site:<22} {height:>5} {rule + f' {group}':>9} {len(on):>10} "
                f"{len(set(found['item'].tolist())):>6} {share:>8.2f} {random:>6.2f}"
            )


if __name__ == "__main__":
    main()
