"""Ground truth of h-space editing on the embedded models: red → blue with the training-free
mean-difference direction and with trained f_t (conv DeltaBlock and transformer), judged by the
attribute reader (colour becomes blue, shape and quadrant kept), S_dir, CLIP-feature Fréchet
distance, KID and linearity over α ∈ [−2, 2].

    python benchmarks/hspace_ground_truth.py --model tiny --items 16 --steps 20
    python benchmarks/hspace_ground_truth.py --model tiny-ddpm --items 16 --steps 20

Writes benchmarks/results/hspace_<model>.json (folders with grids under runs/hspace-gt-<model>).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny", help="alias or pipeline folder")
    parser.add_argument("--name", default=None,
                        help="name in the result file and runs folder (default: --model)")  # fmt: skip
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--train-items", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", default="mean-difference,conv,transformer")
    parser.add_argument("--strengths", default="-2,-1,0,0.5,1,1.5,2")
    parser.add_argument("--t-edit", type=int, default=None)
    parser.add_argument("--runs", default=None)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lambda-recon", type=float, default=3.0)
    parser.add_argument("--label", default="", help="suffix of the result key and folders")
    args = parser.parse_args()

    import torch

    import diffprobe
    from diffprobe.interventions.hspace.training import TrainConfig
    from diffprobe.stages.hspace import evaluate, make_direction, train

    torch.set_num_threads(1)
    name = args.name or args.model
    runs = Path(args.runs or f"runs/hspace-gt-{name}")
    model = diffprobe.load(args.model)
    strengths = [float(v) for v in args.strengths.split(",")]
    out = Path(f"benchmarks/results/hspace_{name}.json")
    results = {"model": args.model, "items": args.items, "steps": args.steps, "methods": {}}
    if out.exists():  # methods measured by an earlier call stay
        results["methods"] = json.loads(out.read_text()).get("methods", {})
    for method in args.methods.split(","):
        began = time.perf_counter()
        key = f"{method}{args.label}"
        folder = runs / key
        for old in (folder, runs / f"{key}-eval"):
            shutil.rmtree(old, ignore_errors=True)
        if method == "mean-difference":
            make_direction(model, folder, source="red", target="blue", items=args.train_items,
                           steps=args.steps, progress=False)  # fmt: skip
            train_info = json.loads((folder / "direction.json").read_text())
        else:
            config = TrainConfig(
                steps=args.steps,
                optimizer=args.optimizer,
                learning_rate=args.lr,
                epochs=args.epochs,
                lambda_recon=args.lambda_recon,
            )
            train(model, folder, source="red", target="blue", kind=method,
                  items=args.train_items, config=config, t_edit=args.t_edit, t_boost=-1,
                  progress=True)  # fmt: skip
            train_info = json.loads((folder / "train.json").read_text())
            train_info.pop("history", None)
        t_edit = args.t_edit if args.t_edit is not None else train_info.get("t_edit", 0)
        result = evaluate(model, [folder / "delta.safetensors"], runs / f"{key}-eval",
                          source="red", target="blue", strengths=strengths, items=args.items,
                          steps=args.steps, t_edit=t_edit, t_boost=-1, progress=False)  # fmt: skip
        result["train"] = {k: v for k, v in train_info.items() if k not in ("curve",)}
        result["curve"] = train_info.get("curve")
        result["wall_seconds"] = time.perf_counter() - began
        result["train_options"] = {
            "optimizer": args.optimizer,
            "lr": args.lr,
            "epochs": args.epochs,
            "train_items": args.train_items,
            "lambda_recon": args.lambda_recon,
        }
        results["methods"][key] = result
        at_one = next(r for r in result["rows"] if r["strength"] == 1.0)
        print(key, json.dumps({k: at_one[k] for k in ("target_colour", "shape_kept",
                                                           "quadrant_kept", "s_dir",
                                                           "frechet_clip")}),
              json.dumps(result["linearity"]), flush=True)  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
