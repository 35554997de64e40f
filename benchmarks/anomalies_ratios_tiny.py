"""Corner and border ratios on `tiny`: the paper's definition (crop not resized, extracted at
image_size - 2·border px) next to diffprobe's default corner ratio (crop resized back), at the
8x8 sites, where a 64 px image cropped by one token per side (48 px) is a size `tiny` takes
(issue 17; docs/anomalies.md).

    PYTHONPATH=src python benchmarks/anomalies_ratios_tiny.py [--items 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import diffprobe
from diffprobe.analysis.anomalies import corner_ratio, to_grid
from diffprobe.data.sources import open_source
from diffprobe.extract import ExtractionPlan, extract
from diffprobe.stages.anomaly_paper import token_group_ratios
from diffprobe.stages.crops import extract_cropped, load_run_images

SITES = ["unet.down_blocks.0", "unet.up_blocks.0"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    model = diffprobe.load("tiny")
    plan = ExtractionPlan(sites=SITES, noise_levels=[0.2], pooling="none")
    run = diffprobe.open_run(extract(model, open_source(f"shapes:{args.items}"), plan,
                                     work / "run", batch_size=32, progress=False))  # fmt: skip
    grids = {s: to_grid(run.get(s, 0.2)).shape[1:3] for s in SITES}
    images = load_run_images(run)
    rows = token_group_ratios(run, model, work / "out", SITES, run.noise_keys, run.conditions,
                              grids, images, progress=False)  # fmt: skip
    resized = extract_cropped(run, model, work / "out", SITES, grids, images=images,
                              progress=False)  # fmt: skip
    print(f"tiny, {args.items} shapes images, noise 0.2, empty prompt")
    for row in rows:
        site = row["site"]
        default = corner_ratio(to_grid(resized[site].get(site, 0.2)), to_grid(run.get(site, 0.2)))
        print(
            f"{site:<20} {row['grid']:>5}  paper corner {row['corner_ratio']:.3f}  border "
            f"{row['border_ratio']:.3f}  | default (resized) corner {default['ratio']:.3f}"
        )


if __name__ == "__main__":
    main()
