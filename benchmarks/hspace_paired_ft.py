"""Collect a ``diffprobe hspace train --objective paired`` run and its ``hspace eval`` into one
result file and print the table of docs/hspace.md ("f_t trained on twins, as a library option").

    python benchmarks/hspace_paired_ft.py --train runs/hspace-paired-conv \
        --eval runs/hspace-paired-conv-eval --name tiny-ddpm-conv

Writes benchmarks/results/hspace_paired_ft_<name>.json: the eval.json, plus the training
record (config, seconds, loss history) under "train".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("target_colour", "source_colour", "shape_true", "shape_kept_reconstruction",
           "quadrant_true", "quadrant_kept_reconstruction", "s_dir", "frechet_clip",
           "psnr_to_original")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    train = json.loads((args.train / "train.json").read_text())
    result = json.loads((args.eval / "eval.json").read_text())
    result["train"] = {k: train[k] for k in ("kind", "objective", "config", "items", "seconds",
                                             "optimizer_steps", "seconds_per_step",
                                             "parameters", "history") if k in train}  # fmt: skip
    out = Path(f"benchmarks/results/hspace_paired_ft_{args.name}.json")
    out.write_text(json.dumps(result, indent=1))
    history = train["history"]
    print(
        f"{out}: {train['kind']}, {train['optimizer_steps']} steps, "
        f"{train['seconds_per_step']:.2f} s/step, twin loss {history[0]['twin']:.4f} -> "
        f"{history[-1]['twin']:.4f}, recon {history[-1]['recon']:.4f}"
    )
    print("reconstruction:", json.dumps(result["reconstruction"]))
    print("| α | " + " | ".join(COLUMNS) + " |")
    for row in result["rows"]:
        print(f"| {row['strength']:g} | " + " | ".join(f"{row[c]:.3f}" for c in COLUMNS) + " |")
    print(json.dumps({k: round(v["spearman"], 3) for k, v in result["linearity"].items()}))


if __name__ == "__main__":
    main()
