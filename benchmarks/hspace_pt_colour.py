"""Does the colour of the early P_t predict the final colour, on generated and on inverted
chains of tiny-ddpm? Per timestep, the Pearson correlation over images between the whole-image
mean blueness (RGB on unit(blue − red)) of the unclipped P_t and that of the final image.

    python benchmarks/hspace_pt_colour.py --steps 20

48 chains from N(0, I) (seed 0) and 48 DDIM-inverted shapes-world images of every colour
(items 30,000–30,047, split "all"). Writes benchmarks/results/hspace_pt_colour_tiny-ddpm.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-ddpm")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import numpy as np
    import torch

    import diffprobe
    from diffprobe.data import shapes
    from diffprobe.interventions.hspace.process import sample, schedule
    from diffprobe.stages.hspace import invert

    torch.set_num_threads(1)
    model = diffprobe.load(args.model)
    rgb = {
        c: torch.tensor(shapes.COLOURS[c], dtype=torch.float32) / 127.5 - 1 for c in ("red", "blue")
    }
    axis = ((rgb["blue"] - rgb["red"]) / (rgb["blue"] - rgb["red"]).norm()).view(1, 3, 1, 1)

    def blueness(x: torch.Tensor) -> np.ndarray:
        return (x * axis).sum(1).flatten(1).mean(1).numpy()

    def correlations(x_T: torch.Tensor) -> list[float]:
        predicted = []
        with torch.no_grad():
            final = sample(model, x_T, steps=args.steps, clip_sample=False,
                           on_step=lambda t, x0: predicted.append(blueness(x0)))  # fmt: skip
        return [float(np.corrcoef(p, blueness(final))[0, 1]) for p in predicted]

    size = model.resolution
    generated = correlations(
        torch.randn(48, 3, size, size, generator=torch.Generator().manual_seed(0))
    )
    data = shapes.sample(48, seed=0, split="all", start=30_000)
    inverted = correlations(invert(model, data.images, args.steps, False)[1])
    result = {"model": args.model, "timesteps": schedule(model, args.steps).timesteps,
              "generated": generated, "inverted": inverted}  # fmt: skip
    print(json.dumps(result))
    out = Path(f"benchmarks/results/hspace_pt_colour_{args.model}.json")
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
