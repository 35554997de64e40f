"""Cold and warm load time of ``tiny``, against plain diffusers loading the same folder.

Each measurement is a fresh Python process (the interpreter's start is not counted; imports
are). Three ways, interleaved, ``--repeats`` times each:

- ``torch``: ``import torch`` alone, the floor under everything else;
- ``diffusers``: ``import torch``, ``from diffusers import StableDiffusionPipeline``, then
  ``StableDiffusionPipeline.from_pretrained(<tiny folder>)``: what plain diffusers needs to
  build the same pipeline, with no diffprobe code at all;
- ``diffprobe``: ``import diffprobe``, then ``diffprobe.load("tiny")``, and a second
  ``diffprobe.load("tiny")`` in the same process (warm).

    .venv/bin/python benchmarks/load_time.py            # 3 repeats

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

PROGRAMS = {
    "torch": """
import json, time; began = time.perf_counter()
import torch
print(json.dumps({"import_torch": time.perf_counter() - began}))
""",
    "diffusers": """
import json, time; began = time.perf_counter()
import torch
torch_s = time.perf_counter() - began
from diffusers import StableDiffusionPipeline
import_s = time.perf_counter() - began - torch_s
mark = time.perf_counter()
StableDiffusionPipeline.from_pretrained(FOLDER)
print(json.dumps({"import_torch": torch_s, "import_diffusers_pipeline": import_s,
                  "from_pretrained": time.perf_counter() - mark,
                  "total": time.perf_counter() - began}))
""",
    "diffprobe": """
import json, time; began = time.perf_counter()
import diffprobe
import_s = time.perf_counter() - began
mark = time.perf_counter()
diffprobe.load("tiny")
load_s = time.perf_counter() - mark
mark = time.perf_counter()
diffprobe.load("tiny")
print(json.dumps({"import_diffprobe": import_s, "load_cold": load_s,
                  "load_warm": time.perf_counter() - mark, "total": import_s + load_s}))
""",
}


def measure(name: str, folder: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", PROGRAMS[name].replace("FOLDER", repr(folder))],
                          capture_output=True, text=True, env=env, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    from diffprobe.registry import resolve

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "load_time.json")
    args = parser.parse_args(argv)
    folder = str(resolve("tiny").source)
    runs: dict[str, list[dict]] = {name: [] for name in PROGRAMS}
    for _ in range(args.repeats):
        for name in PROGRAMS:
            runs[name].append(measure(name, folder))
    summary = {
        name: {key: {"median": statistics.median(r[key] for r in rows),
                     "min": min(r[key] for r in rows), "max": max(r[key] for r in rows)}
               for key in rows[0]}
        for name, rows in runs.items()
    }  # fmt: skip
    print(f"fresh processes, {args.repeats} each (seconds: median, min-max)")
    for name, figures in summary.items():
        for key, value in figures.items():
            print(f"  {name:<10} {key:<26} {value['median']:6.2f}   "
                  f"{value['min']:.2f}-{value['max']:.2f}")  # fmt: skip
    gap = summary["diffprobe"]["total"]["median"] - summary["diffusers"]["total"]["median"]
    print(f"diffprobe (import + cold load) minus plain diffusers (imports + from_pretrained): "
          f"{gap:+.2f} s")  # fmt: skip
    result = {"command": "python benchmarks/load_time.py " + " ".join(argv or sys.argv[1:]),
              "load_average": os.getloadavg(), "summary": summary, "runs": runs,
              "diffprobe_minus_diffusers_s": gap}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
