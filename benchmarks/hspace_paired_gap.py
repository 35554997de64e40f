"""Train/held-out gap of ``hspace train --objective paired`` runs: the same f_t at one strength
on its own training pairs (items 0…) and on the held-out pairs ``hspace eval`` uses (items
20,000…), with the training loss's twin term recomputed on both.

    python benchmarks/hspace_paired_gap.py --runs runs/hsl-l001-e300 runs/hsl-l003-e300 \
        --items 16 --steps 20 --strength 1 --name lambda-sweep

For each run and split: ``twin_mse`` = mean((X − Y)²) with X the edited output (α =
``--strength``, t_edit 0, no boosting, unclipped) and Y the twin's unedited reconstruction
(what the trainer fits at α = 1); ``plain_twin_mse`` the same with X the unedited
reconstruction R (the loss before training); ``recon_l1`` = Σ keep·|X − R| / Σ keep; the
attribute reader on X: ``read_blue`` (target colour), ``shape_kept_reconstruction`` (reader on X
== reader on R), ``shape_true`` (== the generator's factor), ``quadrant_kept_reconstruction``.
Writes benchmarks/results/hspace_paired_gap_<name>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--model", default="tiny-ddpm")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--name", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffprobe.data import shapes
    from diffprobe.data.attributes import read_attributes
    from diffprobe.interventions import hspace as H
    from diffprobe.interventions.hspace.paired import _kept_l1, plain_chain
    from diffprobe.loading import load
    from diffprobe.stages.hspace import (
        edit_images,
        invert,
        keep_mask,
        paired_groups,
        source_images,
        to_uint8,
    )

    model = load(args.model)
    runs = [(run, *H.load_delta(run / "delta.safetensors", H.h_shape(model))) for run in args.runs]
    source, target = runs[0][2]["source"], runs[0][2]["target"]
    target_index = shapes.COLOUR_NAMES.index(target)
    result = {"model": args.model, "items": args.items, "steps": args.steps,
              "strength": args.strength, "source": source, "target": target,
              "splits": {"train": 0, "held_out": 20_000}, "runs": {}}  # fmt: skip
    for split, start in result["splits"].items():
        red = source_images(source, args.items, start=start)
        blue = source_images(target, args.items, start=start)
        assert paired_groups(red, blue)
        x0, x_T = invert(model, red.images, args.steps, False)
        _, twin_T = invert(model, blue.images, args.steps, False)
        plain, _ = plain_chain(model, x_T, args.steps)
        twin, _ = plain_chain(model, twin_T, args.steps)
        keep = keep_mask(model, red.masks, x0)
        read_plain = read_attributes(to_uint8(plain))
        for run, delta, info in runs:
            edited = edit_images(model, x_T, [delta], strength=args.strength, steps=args.steps,
                                 t_edit=0, t_boost=-1, train_steps=info["train_steps"])  # fmt: skip
            read = read_attributes(to_uint8(edited))
            row = {
                "twin_mse": float(((edited - twin) ** 2).mean()),
                "plain_twin_mse": float(((plain - twin) ** 2).mean()),
                "recon_l1": float(_kept_l1(edited, plain, keep)),
                "read_blue": float(np.mean(read["colour"] == target_index)),
                "shape_kept_reconstruction": float(np.mean(read["shape"] == read_plain["shape"])),
                "shape_true": float(np.mean(read["shape"] == red.factors["shape"])),
                "quadrant_kept_reconstruction": float(
                    np.mean(read["quadrant"] == read_plain["quadrant"])
                ),
            }
            result["runs"].setdefault(str(run), {"config": info.get("config"),
                                                 "items": info.get("items")})[split] = row  # fmt: skip
            print(run, split, json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
    out = Path(f"benchmarks/results/hspace_paired_gap_{args.name}.json")
    out.write_text(json.dumps(result, indent=1))
    print(out)


if __name__ == "__main__":
    main()
