"""An SAE on ``tiny``, trained on every timestep of 20-step generations over shapes captions,
and its features as features: FVU / L0 / dead fraction per timestep, the SAE spliced into
generation, the feature that best separates a shapes-world factor against the best single
channel (AUC side by side), and steering with that feature judged by the attribute reader.

    PYTHONPATH=src python benchmarks/sae_tiny.py                 # all stages, CPU
    PYTHONPATH=src python benchmarks/sae_tiny.py --stage train   # one stage (train, auc, splice,
                                                                 # steer); later ones reuse it

Stages keep their results in ``--work`` (default runs/sae-tiny) and the summary goes to
``--out`` (default benchmarks/results/sae_tiny.json).

1. **train**: ``--captions`` captions of the shapes ``train`` split (seed 0), generated with 20
   DDIM steps at tiny's default guidance (7.5), seeds ``chunk index``; every token of the
   conditional branch of ``--site`` at every timestep is a training vector, streamed from
   generation (kept in memory, not on disk, for the later epochs); SAE x16, k 8.
2. **auc**: the activity of a latent (or channel) for an item at a timestep is its mean over
   the 16 x 16 tokens (SAeUron's concept score). For each value of colour, shape and quadrant,
   one-vs-rest ROC AUC. Features count in one direction (the feature is *higher* for the
   value); channels in either (max(AUC, 1 - AUC)), which favours the channels. The best
   (feature, timestep) and best (channel, timestep) are chosen on the first half of the items
   and their AUC reported on the second half, so the 16x more candidate features gain nothing
   from selection on the reported numbers.
3. **splice**: ``--splice-items`` captions generated plainly, with the SAE reconstruction in
   place of the site (both CFG branches), and with reconstruction + error (must be identical).
4. **steer**: the chosen feature's decoder row added to every token at every timestep with
   strength = scale x the feature's max activity at that timestep (the thesis, scale 500), on
   ``--seeds`` captions that name another value of the factor; the attribute reader tells how
   many images show the target value, steered against unsteered.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FACTORS = ("colour", "shape", "quadrant")


def auc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC AUC of ``scores`` (items, ...) for the boolean ``positive`` (items,), for every
    trailing index at once (the features analysis's ``selectivity_auc``)."""
    from diffprobe.analysis.activity import selectivity_auc

    scores = np.asarray(scores)
    flat = selectivity_auc(scores.reshape(len(scores), -1), positive)
    return flat.reshape(scores.shape[1:])


def load_model(device: str):
    import diffprobe

    return diffprobe.load("tiny", device=device)


def stage_train(args, model) -> dict:
    from diffprobe.data import shapes
    from diffprobe.sae import evaluate_sae, train_sae
    from diffprobe.sae.generation import feature_activity, generation_source

    sample = shapes.sample(args.captions, seed=0, split="train")
    source = generation_source(model, args.site, sample.captions, steps=args.steps, seed=0,
                               batch_items=16, progress=True, keep_in_memory=True)  # fmt: skip
    began = time.perf_counter()
    sae = train_sae(source, args.work / "sae", expansion=args.expansion, k=args.k,
                    batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                    dead_tokens=args.dead_tokens, device=args.device, overwrite=True)  # fmt: skip
    seconds = time.perf_counter() - began
    evaluation = evaluate_sae(sae, source)
    activity = feature_activity(sae, source.data())
    np.savez(args.work / "activity.npz", codes=activity["codes"], channels=activity["channels"],
             frequency=activity["frequency"], max_activation=activity["max_activation"],
             timesteps=np.asarray(activity["timesteps"]),
             **{f"factor_{k}": v for k, v in sample.factors.items()})  # fmt: skip
    return {
        "captions": args.captions,
        "tokens_per_epoch": source.n_tokens,
        "epochs": args.epochs,
        "seconds_generation_and_training": round(seconds, 1),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "fvu": evaluation.fvu,
        "l0": evaluation.l0,
        "dead_fraction": evaluation.dead_fraction,
        "per_timestep": evaluation.groups,
    }


def stage_auc(args) -> dict:
    data = np.load(args.work / "activity.npz")
    codes, channels = data["codes"], data["channels"]  # (items, T, d)
    items = codes.shape[0]
    pick, held = np.arange(items) < items // 2, np.arange(items) >= items // 2
    rows = []
    for factor in FACTORS:
        labels = data[f"factor_{factor}"]
        for value in np.unique(labels):
            positive = labels == value
            if positive[pick].sum() < 2 or positive[held].sum() < 2:
                continue
            f_sel = auc(codes[pick], positive[pick])
            c_sel = auc(channels[pick], positive[pick])
            c_sel = np.maximum(c_sel, 1 - c_sel)
            t_f, f = np.unravel_index(np.nanargmax(f_sel), f_sel.shape)
            t_c, c = np.unravel_index(np.nanargmax(c_sel), c_sel.shape)
            f_auc = float(auc(codes[held][:, t_f, f], positive[held]))
            c_raw = float(auc(channels[held][:, t_c, c], positive[held]))
            c_dir = c_raw if c_sel[t_c, c] == auc(channels[pick][:, t_c, c], positive[pick]) else (
                1 - c_raw)  # fmt: skip
            rows.append({
                "factor": factor, "value": int(value), "positives": int(positive.sum()),
                "feature": int(f), "feature_timestep": float(data["timesteps"][t_f]),
                "feature_auc_selection": float(f_sel[t_f, f]), "feature_auc": f_auc,
                "channel": int(c), "channel_timestep": float(data["timesteps"][t_c]),
                "channel_auc_selection": float(c_sel[t_c, c]), "channel_auc": c_dir,
            })  # fmt: skip
    rows.sort(key=lambda r: r["feature_auc"] - r["channel_auc"], reverse=True)
    wins = [r for r in rows if r["feature_auc"] > r["channel_auc"]]
    return {"rows": rows, "feature_beats_channel": len(wins), "compared": len(rows)}


def _name(factor: str, value: int) -> str:
    from diffprobe.data import shapes

    names = {"colour": shapes.COLOUR_NAMES, "shape": shapes.SHAPES, "quadrant": shapes.QUADRANTS}
    return names[factor][value]


def _generate(model, prompts, steps, batch=16):
    out = [model.generate(prompts[i : i + batch], steps=steps, seed=i // batch)
           for i in range(0, len(prompts), batch)]  # fmt: skip
    return (np.concatenate(out) * 255).round().astype(np.uint8)


def stage_splice(args, model) -> dict:
    from diffprobe.data import shapes
    from diffprobe.sae import load_sae
    from diffprobe.sae.generation import splice_test

    sae = load_sae(args.work / "sae", device=args.device)
    sample = shapes.sample(args.splice_items, seed=2, split="heldout")
    return splice_test(model, sae, args.site, sample.captions, steps=args.steps,
                       factors=sample.factors)  # fmt: skip


def stage_steer(args, model, chosen: dict) -> dict:
    from diffprobe.data import shapes
    from diffprobe.data.attributes import read_attributes
    from diffprobe.sae import load_sae
    from diffprobe.sae.generation import steer_feature, steering_strengths

    sae = load_sae(args.work / "sae", device=args.device)
    data = np.load(args.work / "activity.npz")
    factor, value, feature = chosen["factor"], chosen["value"], chosen["feature"]
    pool = shapes.sample(args.seeds * 8, seed=3, split="all")
    others = np.flatnonzero(pool.factors[factor] != value)[: args.seeds]
    prompts = [pool.captions[i] for i in others]
    baseline = _generate(model, prompts, args.steps)
    read = read_attributes(baseline)[factor]
    result = {"factor": factor, "value": _name(factor, value), "feature": feature,
              "prompts": len(prompts), "baseline_rate": float(np.mean(read == value)),
              "baseline_stated_accuracy": float(np.mean(read == pool.factors[factor][others])),
              "scales": {}}  # fmt: skip
    for scale in args.scales:
        strengths = steering_strengths(data["max_activation"][:, feature], data["timesteps"], scale)
        branch = None if args.steer_branch == "both" else args.steer_branch
        with steer_feature(model, sae, args.site, feature, strengths, branch=branch):
            steered = _generate(model, prompts, args.steps)
        read = read_attributes(steered)[factor]
        result["scales"][str(scale) + ("" if branch is None else f"@{branch}")] = {
            "rate": float(np.mean(read == value)),
            "stated_accuracy": float(np.mean(read == pool.factors[factor][others])),
            "pixel_mse": float(((steered / 255.0 - baseline / 255.0) ** 2).mean()),
            "max_strength": max(strengths.values()),
        }
        print(factor, value, scale, branch, file=sys.stderr)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--stage", default="all",
                        choices=["all", "train", "auc", "splice", "steer"])  # fmt: skip
    parser.add_argument("--site", default="unet.up_blocks.1")
    parser.add_argument("--captions", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dead-tokens", type=int, default=200_000)
    parser.add_argument("--splice-items", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--scales", type=float, nargs="+", default=[500.0])
    parser.add_argument(
        "--steer-branch",
        default="both",
        choices=["both", "cond"],
        help="CFG halves the steering edits (cond: amplified by the guidance)",
    )
    parser.add_argument(
        "--target",
        default=None,
        help="factor:value index to steer, e.g. "
        "colour:0; default the row where the feature beats the channel most",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda (model and SAE training)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "sae-tiny")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sae_tiny.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    summary = json.loads(args.out.read_text()) if args.out.exists() else {}
    summary.update({"benchmark": "sae_tiny", "site": args.site, "steps": args.steps,
                    "torch": torch.__version__, "device": args.device})  # fmt: skip
    model = None if args.stage == "auc" else load_model(args.device)
    if args.stage in ("all", "train"):
        summary["train"] = stage_train(args, model)
    if args.stage in ("all", "auc"):
        summary["auc"] = stage_auc(args)
    if args.stage in ("all", "splice"):
        summary["splice"] = stage_splice(args, model)
    if args.stage in ("all", "steer"):
        rows = summary["auc"]["rows"]
        if args.target:
            factor, value = args.target.split(":")
            chosen = next(r for r in rows if r["factor"] == factor and r["value"] == int(value))
        else:
            chosen = rows[0]
        key = f"{chosen['factor']}:{chosen['value']}"
        result = stage_steer(args, model, chosen)
        earlier = summary.setdefault("steer", {}).get(key, {})
        if earlier.get("prompts") == result["prompts"]:  # the same prompts: keep earlier scales
            result["scales"] = {**earlier.get("scales", {}), **result["scales"]}
        summary["steer"][key] = result
    from diffprobe.io import write_json

    write_json(args.out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "train"}, indent=1)[:3000])
    return summary


if __name__ == "__main__":
    main()
