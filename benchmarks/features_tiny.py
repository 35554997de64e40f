"""Ground truth for activity and steering on ``tiny``: does a channel separate a colour, and does
pushing it make images that colour?

1. ``capture_activity`` over the shapes world's captions (``shapes:N``, one seed each, CFG,
   conditional branch) at a few UNet sites, spatial-mean activity per denoiser step.
2. Selectivity: for each (site, channel, timestep window), the ROC AUC of the window's mean
   activity for "the caption says COLOUR" vs not. The best (site, channel, window) is chosen on
   the even-numbered captions and its AUC reported on the odd-numbered ones (held out), next to
   the chance level 0.5 and the 95th percentile of the best AUC over label permutations.
3. Steering: the chosen channel is pushed (``Steer``, mode add, sign of AUC - 0.5) inside its
   window on the empty prompt without CFG, for ``--steer-seeds`` seeds, at strengths
   ``--multiples`` × the channel's max activation over the captured items (the thesis uses
   50), once inside the selected window and once at every timestep; the attribute
   reader (``read_attributes``) reads every image's colour. Reported: the fraction read as
   COLOUR, steered vs unsteered (same seeds).

    PYTHONPATH=src .venv/bin/python benchmarks/features_tiny.py --captions 256 --steer-seeds 64

Writes ``benchmarks/results/features_tiny.json`` (``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--colour", default="red")
    parser.add_argument("--captions", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument(
        "--sites", default="unet.down_blocks.1,unet.mid_block,unet.up_blocks.1,unet.up_blocks.2"
    )
    parser.add_argument("--windows", default="0-333,334-666,667-1000")
    parser.add_argument("--steer-seeds", type=int, default=64)
    parser.add_argument("--multiples", default="5,20,50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/features_tiny.json"))
    args = parser.parse_args(argv)

    import diffprobe
    from diffprobe import features
    from diffprobe.data import shapes
    from diffprobe.data.attributes import read_attributes

    began = time.perf_counter()
    model = diffprobe.load(args.model, device=args.device)
    sites = args.sites.split(",")
    windows = [tuple(float(v) for v in w.split("-")) for w in args.windows.split(",")]
    colour = shapes.COLOUR_NAMES.index(args.colour)
    plan = features.ActivityPlan(sites=sites, seeds=[0], steps=args.steps,
                                 guidance_scale=args.guidance, chunk_items=32)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        root = features.capture_activity(model, f"shapes:{args.captions}", plan,
                                         Path(folder) / "run", batch_size=args.batch_size,
                                         progress=True)  # fmt: skip
        run = features.open_activity(root)
        labels = np.array([item["factors"]["colour"] == colour for item in run.items])
        activity = {site: run.get(site) for site in sites}
        timesteps = run.timesteps
        capture_seconds = time.perf_counter() - began
    fit, held = np.arange(0, len(labels), 2), np.arange(1, len(labels), 2)
    if not (0 < labels[fit].sum() < len(fit) and 0 < labels[held].sum() < len(held)):
        raise SystemExit(f"too few '{args.colour}' captions in each half: use more --captions")
    rng = np.random.default_rng(0)
    candidates = []
    for site in sites:
        for window in windows:
            scores = features.window_score(activity[site], timesteps, window)
            auc_fit = features.selectivity_auc(scores[fit], labels[fit])
            best = int(np.abs(auc_fit - 0.5).argmax())
            candidates.append((abs(auc_fit[best] - 0.5), site, window, best, float(auc_fit[best])))
    _, site, window, channel, auc_fit = max(candidates, key=lambda c: c[0])
    scores = features.window_score(activity[site], timesteps, window)
    auc_heldout = float(features.selectivity_auc(scores[held, channel:channel + 1],
                                                 labels[held])[0])  # fmt: skip
    all_auc = features.selectivity_auc(scores[held], labels[held])
    null = []
    for _ in range(args.permutations):
        shuffled = rng.permutation(labels[held])
        null.append(np.abs(features.selectivity_auc(scores[held], shuffled) - 0.5).max() + 0.5)
    sign = 1.0 if auc_fit >= 0.5 else -1.0
    top = float(np.abs(activity[site][:, :, channel]).max())

    seeds = list(range(args.steer_seeds))
    prompts = [""] * len(seeds)
    window_edit = features.TimestepWindow(*window)

    def fraction(steers) -> tuple[float, list[int]]:
        images = []
        for start in range(0, len(seeds), args.batch_size):
            part = slice(start, start + args.batch_size)
            images.append(features.steer(model, prompts[part], steers, seed=seeds[part],
                                         steps=args.steps, guidance_scale=1.0))  # fmt: skip
        pixels = (np.concatenate(images) * 255 + 0.5).clip(0, 255).astype(np.uint8)
        read = read_attributes(pixels)["colour"]
        counts = np.bincount(read + 1, minlength=len(shapes.COLOUR_NAMES) + 1)
        return float((read == colour).mean()), counts.tolist()

    unsteered, unsteered_counts = fraction([])
    steered = []
    for where, chosen in (("selected window", window_edit), ("all timesteps", None)):
        for multiple in [float(m) for m in args.multiples.split(",")]:
            strength = sign * multiple * top
            spec = features.Steer(site, channel=channel, strength=strength, window=chosen)
            share, counts = fraction([spec])
            steered.append({"window": where, "multiple_of_max": multiple, "strength": strength,
                            "fraction_colour": share, "colour_counts": counts})  # fmt: skip
            print(json.dumps(steered[-1]), file=sys.stderr)
    result = {
        "command": "python benchmarks/features_tiny.py " + " ".join(argv or sys.argv[1:]),
        "model": args.model, "colour": args.colour, "captions": args.captions,
        "positives": int(labels.sum()), "steps": args.steps, "guidance": args.guidance,
        "sites": sites, "windows": windows, "timesteps": timesteps.tolist(),
        "selection": "best |AUC - 0.5| over (site, channel, window) on the even captions",
        "site": site, "channel": channel, "window": list(window), "direction": sign,
        "auc_fit_even": auc_fit, "auc_heldout_odd": auc_heldout,
        "heldout_channels_auc_quantiles": np.quantile(all_auc, [0.05, 0.5, 0.95]).tolist(),
        "heldout_best_of_all_channels_under_permutation_p95": float(np.quantile(null, 0.95)),
        "chance": 0.5, "max_activation": top,
        "steer_seeds": len(seeds), "steer_prompt": "", "steer_guidance": 1.0,
        "unsteered_fraction_colour": unsteered, "unsteered_colour_counts": unsteered_counts,
        "colour_count_order": ["unread", *shapes.COLOUR_NAMES],
        "steered": steered, "capture_seconds": round(capture_seconds, 1),
        "seconds": round(time.perf_counter() - began, 1), "threads": torch.get_num_threads(),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
