"""Why an h-space colour edit does or does not move colour: is colour linearly present in h,
and is the direction the decoder reads colour from the direction in which h differs?

    python benchmarks/hspace_diagnose.py --model tiny --items 8 --steps 20
    python benchmarks/hspace_diagnose.py --model tiny-ddpm --items 8 --steps 20

Per DDIM step of the plain chains of inverted shapes-world images (red and blue, items
10,000–10,000+items of each colour stream):

- ``separation``: the mean-difference direction u = mean h(blue) − mean h(red) and the gap of the
  two groups' projections on it over their pooled standard deviation (d'); ``relative_norm``
  |mean difference| / mean |h|;
- along the red test chains (items 20,000+): the gradient g of the *blueness* of P_t (the
  mean over the true shape mask of the decoded P_t's RGB projected on unit(blue − red), values in
  [−1, 1] pixels) with respect to Δh at Δh = 0, and ``cosine`` cos(g, u): +1 means adding the
  mean difference is the steepest way to make P_t bluer, 0 that it does not move colour, < 0
  that it moves it towards red; ``gain_mean_difference`` = g·u/|u| and ``gain_best`` = |g| the
  blueness change per unit norm of Δh along u and along g;
- ``replacement``: the red test images edited with h *replaced* by the h of the blue chains at
  every step (Δh = h_blue,k − h): the colours the attribute reader reads, and shape / quadrant
  kept against the unedited reconstruction. A decoder that takes colour from h turns them blue;
  one that takes it from the skip connections leaves them red;
- ``sweeps``: 16 held-out red images (items 20,000–20,015) edited at each ``--strengths`` α by
  the mean difference, by the mean difference only at t ≤ ``--late-from``, and by the
  *steepest* direction (g per step, scaled to the mean difference's norm: the best a
  per-step linear Δh can do to first order; a diagnostic, not a shipped method).

Writes benchmarks/results/hspace_diagnose_<model>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny", help="alias or pipeline folder")
    parser.add_argument("--name", default=None, help="name of the result file (default: --model)")
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--source", default="red")
    parser.add_argument("--target", default="blue")
    parser.add_argument("--strengths", type=lambda v: [float(x) for x in v.split(",")],
                        default=[1.0, 3.0, 10.0, 20.0])  # fmt: skip
    parser.add_argument("--late-from", type=int, default=751,
                        help="the windowed sweep edits only timesteps ≤ this")  # fmt: skip
    args = parser.parse_args()

    import numpy as np
    import torch

    import diffprobe
    from diffprobe.data import shapes
    from diffprobe.data.attributes import read_attributes
    from diffprobe.interventions.hspace import HSpaceEdit, decode
    from diffprobe.interventions.hspace.deltas import FreeDelta
    from diffprobe.interventions.hspace.process import (
        _conditioning,
        asymmetric_step,
        denoise_pair,
        predicted_x0,
        schedule,
    )
    from diffprobe.stages.hspace import capture_h, edit_images, invert, source_images, to_uint8

    torch.set_num_threads(1)
    model = diffprobe.load(args.model)
    h, x_T, groups = {}, {}, {}
    for colour in (args.source, args.target):
        groups[colour] = source_images(colour, args.items, start=10_000)
        _, x_T[colour] = invert(model, groups[colour].images, args.steps, False)
        h[colour] = capture_h(model, x_T[colour], args.steps)  # (steps, items, C, H, W)
    difference = h[args.target].mean(1) - h[args.source].mean(1)

    x = x_T[args.source]
    size = decode(model, x[:1]).shape[-1]
    mask = torch.nn.functional.interpolate(
        torch.from_numpy(groups[args.source].masks).float()[:, None],
        size=(size, size),
        mode="area",
    )
    rgb = {
        c: torch.tensor(shapes.COLOURS[c], dtype=torch.float32) / 127.5 - 1 for c in shapes.COLOURS
    }
    axis = rgb[args.target] - rgb[args.source]
    axis = (axis / axis.norm()).view(1, 3, 1, 1)

    plan = schedule(model, args.steps)
    cond = _conditioning(model, None, len(x))
    free = FreeDelta(*difference.shape[1:], args.steps)
    edit = HSpaceEdit([free], t_edit=0)
    rows, steepest = [], torch.zeros_like(difference)
    for index, timestep in enumerate(plan.timesteps):
        source_h = h[args.source][index].flatten(1)
        target_h = h[args.target][index].flatten(1)
        u = difference[index].flatten()
        unit = u / u.norm()
        projected_source, projected_target = source_h @ unit, target_h @ unit
        pooled = ((projected_source.var() + projected_target.var()) / 2).sqrt()
        edit.step_index = index
        free.delta.grad = None
        eps, eps_edit = denoise_pair(model, x, timestep, cond, None, edit, args.steps, grad=True)
        alpha = plan.alpha(timestep)
        pixels = decode(model, predicted_x0(x, eps_edit, alpha, plan.clip_sample))
        blueness = ((pixels.float() * axis).sum(1, keepdim=True) * mask).sum() / mask.sum()
        blueness.backward()
        gradient = free.delta.grad[index].flatten()
        steepest[index] = (gradient / gradient.norm() * u.norm()).reshape(difference.shape[1:])
        rows.append({
            "timestep": int(timestep),
            "separation": float((projected_target.mean() - projected_source.mean()) / pooled),
            "relative_norm": float(u.norm() / source_h.norm(dim=1).mean()),
            "blueness": float(blueness.detach()),
            "cosine": float(gradient @ unit / gradient.norm().clamp_min(1e-12)),
            "gain_mean_difference": float(gradient @ unit),
            "gain_best": float(gradient.norm()),
        })  # fmt: skip
        with torch.no_grad():
            x, _ = asymmetric_step(x, eps, eps, alpha, plan.alpha(plan.previous(index)),
                                   clip=plan.clip_sample)  # fmt: skip
        print(" ".join(f"{k} {v:.4g}" for k, v in rows[-1].items()), flush=True)

    class Replace(torch.nn.Module):
        kind = "constant"

        def __init__(self, target_h: torch.Tensor) -> None:
            super().__init__()
            self.target_h, self.shape = target_h, tuple(target_h.shape[2:])

        def forward(self, h, timestep, step_index=0):
            # test image i gets the h of target chain i mod (target chains)
            chains = torch.arange(len(h)) % self.target_h.shape[1]
            return self.target_h[step_index][chains] - h

    test = source_images(args.source, 16, start=20_000)
    test_x_T = invert(model, test.images, args.steps, False)[1]

    def read(sources, strength):
        pixels = edit_images(model, test_x_T, sources, strength=strength, steps=args.steps,
                             t_edit=0, t_boost=-1, train_steps=None)  # fmt: skip
        return read_attributes(to_uint8(pixels))

    def summary(reading, reference):
        colours = reading["colour"]
        return {
            "colours": {name: int((colours == i).sum())
                        for i, name in enumerate(shapes.COLOUR_NAMES) if (colours == i).any()},
            "shape_kept": float(np.mean(reading["shape"] == reference["shape"])),
            "quadrant_kept": float(np.mean(reading["quadrant"] == reference["quadrant"])),
        }  # fmt: skip

    def per_step(directions):
        source = FreeDelta(*difference.shape[1:], args.steps)
        source.delta.data.copy_(directions)
        return [source]

    reconstruction = read(per_step(difference), 0.0)
    replacement = summary(read([Replace(h[args.target])], 1.0), reconstruction)
    print("replacement", json.dumps(replacement), flush=True)
    late = difference.clone()
    late[torch.tensor(plan.timesteps) > args.late_from] = 0
    sweeps = {}
    for label, directions in (("mean_difference", difference),
                              (f"mean_difference_t<={args.late_from}", late),
                              ("steepest", steepest)):  # fmt: skip
        for strength in args.strengths:
            row = summary(read(per_step(directions), strength), reconstruction)
            sweeps.setdefault(label, {})[str(strength)] = row
            print(label, strength, json.dumps(row), flush=True)
    result = {"model": args.model, "replacement": replacement, "sweeps": sweeps,
              "test_items": "16 red, items 20,000-20,015", "items": args.items, "steps": args.steps,
              "source": args.source, "target": args.target, "rows": rows,
              "mean_cosine": float(np.mean([r["cosine"] for r in rows]))}  # fmt: skip
    out = Path(f"benchmarks/results/hspace_diagnose_{args.name or args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
