"""Peak RSS of attribution as the number of prompts grows x10: streamed to zarr vs kept in RAM.

Each configuration runs in a fresh process (`tiny`, STEPS DDIM steps, one thread) and reports
its peak resident set size (``ru_maxrss``) and the size of one prompt's maps:

    PYTHONPATH=src python benchmarks/attribution_memory.py [--prompts 4] [--steps 10]

runs PROMPTS and 10 x PROMPTS prompts, each with ``--store`` (maps streamed to maps.zarr,
float16, nothing kept) and without (every PromptAttribution kept in a list, as a notebook
would), and writes benchmarks/results/attribution_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, tempfile
import torch
torch.set_num_threads(1)
import diffprobe
from diffprobe.data import shapes
from diffprobe.stages.attribution import attribute
from diffprobe.stages.attribution_store import MapStore
count, steps, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
model = diffprobe.load("tiny")
prompts = shapes.sample(count, seed=1).captions
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
folder = tempfile.mkdtemp()
sizes = []
if mode == "store":
    store = MapStore(folder, count)
    attribute(model, prompts, steps=steps, store=store, progress=False,
              each=lambda i, r: sizes.append(r.maps.nbytes))
    kept = None
else:
    kept = attribute(model, prompts, steps=steps, progress=False)
    sizes = [r.maps.nbytes for r in kept]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"prompts": count, "mode": mode, "peak_rss_mib": peak / 1024,
                  "rss_after_load_mib": baseline / 1024,
                  "maps_mib_per_prompt": sum(sizes) / len(sizes) / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/attribution_memory.json")
    args = parser.parse_args()
    rows = []
    for mode in ("store", "ram"):
        for count in (args.prompts, 10 * args.prompts):
            with tempfile.TemporaryDirectory() as scratch:
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, str(count), str(args.steps), mode],
                    capture_output=True, text=True, check=True, cwd=scratch,
                )  # fmt: skip
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    by = {(r["mode"], r["prompts"]): r["peak_rss_mib"] for r in rows}
    small, large = args.prompts, 10 * args.prompts
    report = {
        "steps": args.steps,
        "rows": rows,
        "store_growth_mib": by[("store", large)] - by[("store", small)],
        "ram_growth_mib": by[("ram", large)] - by[("ram", small)],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))


if __name__ == "__main__":
    main()
