"""Quality of `tiny-ddpm`, read by the attribute reader.

1. unconditional samples (DDIM, `--steps`): the fraction the reader finds a shape in, and the
   spread of read colours and shapes (the training data is uniform over 8 colours, 6 shapes);
2. ground truth: held-out images noised to t (forward process, seeded) and denoised by DDIM
   (SDEdit): colour / shape / quadrant accuracy against the true factors, per t.

    python benchmarks/tiny_ddpm_quality.py --items 64 --steps 50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-ddpm")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--noise", default="300,500,700")
    args = parser.parse_args()

    import diffprobe
    from diffprobe.data import shapes
    from diffprobe.data.attributes import attribute_accuracy, read_attributes
    from diffprobe.interventions.hspace import sample, schedule
    from diffprobe.stages.hspace import to_uint8

    torch.set_num_threads(1)
    model = diffprobe.load(args.model)
    size = model.resolution
    result = {"model": args.model, "items": args.items, "steps": args.steps}
    x_T = torch.randn((args.items, 3, size, size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = to_uint8(sample(model, x_T, steps=args.steps, progress=True))
    read = read_attributes(images)
    found = read["shape"] >= 0
    result["unconditional"] = {
        "shape_found": float(found.mean()),
        "colour_counts": np.bincount(read["colour"][found], minlength=8).tolist(),
        "shape_counts": np.bincount(read["shape"][found], minlength=6).tolist(),
    }
    data = shapes.sample(args.items, seed=1, split="heldout")
    x0 = model.encode_images(data.images)
    plan = schedule(model, args.steps)
    result["sdedit"] = {}
    for t in [int(v) for v in args.noise.split(",")]:
        start = min(plan.timesteps, key=lambda s: abs(s - t))
        x_t, _ = model.add_noise(x0, timestep=start, seed=0)
        with torch.no_grad():
            x = x_t
            from diffprobe.interventions.hspace.process import asymmetric_step

            for index, timestep in enumerate(plan.timesteps):
                if timestep > start:
                    continue
                eps = model.denoise(x, torch.full((len(x),), float(timestep)),
                                    model.encode_prompt([""] * len(x)))  # fmt: skip
                x, _ = asymmetric_step(x, eps, eps, plan.alpha(timestep),
                                       plan.alpha(plan.previous(index)), clip=plan.clip_sample)  # fmt: skip
        accuracy = attribute_accuracy(to_uint8(x), data.factors)
        result["sdedit"][str(start)] = {k: accuracy[k] for k in ("colour", "shape", "quadrant",
                                                                 "size")}  # fmt: skip
        print(start, result["sdedit"][str(start)], flush=True)
    from PIL import Image

    grid = images[:32].reshape(4, 8, 64, 64, 3).transpose(0, 2, 1, 3, 4).reshape(256, 512, 3)
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(f"benchmarks/results/{args.model}_samples.png")
    out = Path(f"benchmarks/results/{args.model}_quality.json")
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
