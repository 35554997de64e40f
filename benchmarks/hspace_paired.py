"""Does colour follow h when only colour differs? Paired red/blue chains on one model.

    python benchmarks/hspace_paired.py --model tiny-ddpm --items 16 --steps 20 --oracle-iters 150
    python benchmarks/hspace_paired.py --model tiny --items 16 --steps 20

A shapes-world item of the ``blue`` stream has the same shape, size, position, rotation and
background as the same item of the ``red`` stream (the colour filter only restricts the
combinations drawn from, and every colour has the same pool), so ``source_images("blue", n,
start)`` is the blue twin of ``source_images("red", n, start)``; the script checks this first.
16 red test images (items 20,000–20,015) and their blue twins are DDIM-inverted; the plain
chains give h_k(red), h_k(blue) at every step k.

- ``fraction_per_step``: on the plain red chain, P_t computed with h replaced by the twin's
  h_k (one step, nothing carried over), as a fraction of the way from the red chain's P_t to the
  blue chain's P_t, measured as *blueness* (RGB on unit(blue − red), mean over the true shape
  mask): 1 = h decides colour at that step, 0 = the skip connections and x_t do.
- ``swap``: the red test images sampled with Δh_k = α·(h_k(blue twin) − h_k), every step
  (and from t_edit), *asymmetric* (ε̃ in P_t only, Asyrp) and *symmetric* (ε̃ in P_t and D_t:
  plain DDIM of the edited UNet).
- ``mean_difference``: the stored per-step direction of ``diffprobe hspace direction`` (red and
  blue training chains of items 10,000+, which are twins, so this is the paired mean
  difference), at α, asymmetric and symmetric.
- ``oracle`` (``--oracle-iters`` > 0): a free Δh per image and per step, optimised by Adam
  through the whole asymmetric chain to make the output equal the blue twin's pixels
  (MSE): an upper bound of what h-space can do on this model, not a method.

Every reading is the attribute reader's: colour counts, blue fraction, shape and quadrant
kept against the unedited red reconstruction (``*_kept``) and equal to the generator's
factors (``*_true``, the measure a perfect recolouring scores 100 % on; the reconstructions'
own ``*_true`` are stored). Writes benchmarks/results/hspace_paired_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:  # noqa: PLR0915 - one linear experiment script
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-ddpm", help="alias or pipeline folder")
    parser.add_argument("--name", default=None, help="name of the result file (default: --model)")
    parser.add_argument("--items", type=int, default=16, help="training pairs of the direction")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--oracle-iters", type=int, default=0)
    parser.add_argument("--oracle-lr", type=float, default=0.05)
    args = parser.parse_args()

    import numpy as np
    import torch

    import diffprobe
    from diffprobe.data import shapes
    from diffprobe.data.attributes import read_attributes
    from diffprobe.hooks.editing import edit as edit_context
    from diffprobe.interventions.hspace import HSpaceEdit, decode
    from diffprobe.interventions.hspace.process import (
        _conditioning,
        asymmetric_step,
        denoise_pair,
        predicted_x0,
        schedule,
    )
    from diffprobe.stages.hspace import capture_h, invert, make_direction, source_images, to_uint8

    torch.set_num_threads(1)
    began = time.perf_counter()
    steps = args.steps
    model = diffprobe.load(args.model)
    plan = schedule(model, steps)
    red, blue = source_images("red", 16, start=20_000), source_images("blue", 16, start=20_000)
    paired = all(np.array_equal(red.factors[k], blue.factors[k]) for k in red.factors
                 if k not in ("colour", "template"))  # fmt: skip
    assert paired, "the blue stream is not the red stream's twin"
    x_T, h = {}, {}
    for name, group in (("red", red), ("blue", blue)):
        _, x_T[name] = invert(model, group.images, steps, False)
        h[name] = capture_h(model, x_T[name], steps)  # (steps, items, C, H, W)
    cond = _conditioning(model, None, 16)
    size = decode(model, x_T["red"][:1]).shape[-1]
    mask = torch.nn.functional.interpolate(torch.from_numpy(red.masks).float()[:, None],
                                           size=(size, size), mode="area")  # fmt: skip
    rgb = {
        c: torch.tensor(shapes.COLOURS[c], dtype=torch.float32) / 127.5 - 1 for c in ("red", "blue")
    }
    axis = ((rgb["blue"] - rgb["red"]) / (rgb["blue"] - rgb["red"]).norm()).view(1, 3, 1, 1)

    def blueness(x0: torch.Tensor) -> torch.Tensor:
        pixels = decode(model, x0)
        return ((pixels * axis).sum(1, keepdim=True) * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3))

    class Toward(torch.nn.Module):
        """Δh_k = α · (h_k(blue twin) − h)."""

        kind = "constant"

        def __init__(self, target: torch.Tensor, alpha: float = 1.0) -> None:
            super().__init__()
            self.target, self.alpha, self.shape = target, alpha, tuple(target.shape[2:])

        def forward(self, current, timestep, step_index=0):
            return self.alpha * (self.target[step_index] - current)

    class Scaled(torch.nn.Module):
        kind = "constant"

        def __init__(self, rows: torch.Tensor, alpha: float) -> None:
            super().__init__()
            self.rows, self.alpha, self.shape = rows, alpha, tuple(rows.shape[1:])

        def forward(self, current, timestep, step_index=0):
            return (self.alpha * self.rows[step_index]).expand_as(current)

    # one step at a time on the plain chains: how much of P_t's colour does h decide?
    fraction, x_red, x_blue = [], x_T["red"], x_T["blue"]
    swap = HSpaceEdit([Toward(h["blue"])], t_edit=0)
    with torch.no_grad():
        for index, timestep in enumerate(plan.timesteps):
            swap.step_index = index
            eps, eps_swap = denoise_pair(model, x_red, timestep, cond, None, swap, steps)
            eps_blue, _ = denoise_pair(model, x_blue, timestep, cond, None, None, steps)
            alpha, alpha_prev = plan.alpha(timestep), plan.alpha(plan.previous(index))
            b_red = blueness(predicted_x0(x_red, eps, alpha, None))
            b_swap = blueness(predicted_x0(x_red, eps_swap, alpha, None))
            b_blue = blueness(predicted_x0(x_blue, eps_blue, alpha, None))
            fraction.append({"timestep": int(timestep), "blueness_red": float(b_red.mean()),
                             "blueness_swapped": float(b_swap.mean()),
                             "blueness_blue": float(b_blue.mean()),
                             "fraction": float(((b_swap - b_red) / (b_blue - b_red)).median())})  # fmt: skip
            print(json.dumps(fraction[-1]), flush=True)
            x_red, _ = asymmetric_step(x_red, eps, eps, alpha, alpha_prev)
            x_blue, _ = asymmetric_step(x_blue, eps_blue, eps_blue, alpha, alpha_prev)
        reference = read_attributes(to_uint8(decode(model, x_red)))
        twin_reading = read_attributes(to_uint8(decode(model, x_blue)))

    def summary(pixels: torch.Tensor) -> dict:
        reading = read_attributes(to_uint8(pixels.detach()))
        colours = reading["colour"]
        return {
            "colours": {name: int((colours == i).sum())
                        for i, name in enumerate(shapes.COLOUR_NAMES) if (colours == i).any()},
            "blue": float(np.mean(colours == shapes.COLOUR_NAMES.index("blue"))),
            "shape_kept": float(np.mean(reading["shape"] == reference["shape"])),
            "quadrant_kept": float(np.mean(reading["quadrant"] == reference["quadrant"])),
            "shape_true": float(np.mean(reading["shape"] == red.factors["shape"])),
            "quadrant_true": float(np.mean(reading["quadrant"] == red.factors["quadrant"])),
        }  # fmt: skip

    def run(source, symmetric: bool, t_edit: int = 0) -> dict:
        edit = HSpaceEdit([source], t_edit=t_edit)
        x = x_T["red"]
        with torch.no_grad():
            for index, timestep in enumerate(plan.timesteps):
                edit.step_index = index
                eps, eps_edit = denoise_pair(model, x, timestep, cond, None, edit, steps)
                x, _ = asymmetric_step(x, eps_edit if symmetric else eps, eps_edit,
                                       plan.alpha(timestep), plan.alpha(plan.previous(index)))  # fmt: skip
        return summary(decode(model, x))

    result = {"model": args.model, "steps": steps, "paired_streams": paired,
              "test_items": "16 red, items 20,000-20,015, and their blue twins",
              "reconstruction_red": {
                  "shape_true": float(np.mean(reference["shape"] == red.factors["shape"])),
                  "quadrant_true": float(np.mean(reference["quadrant"] == red.factors["quadrant"]))},
              "reconstruction_blue_twin": {
                  "blue": float(np.mean(twin_reading["colour"] == 5)),
                  "shape_true": float(np.mean(twin_reading["shape"] == blue.factors["shape"])),
                  "quadrant_true": float(np.mean(twin_reading["quadrant"] == blue.factors["quadrant"]))},
              "fraction_per_step": fraction, "swap": {}, "mean_difference": {}}  # fmt: skip
    for alpha in (1.0, 2.0, 4.0):
        for symmetric in (False, True):
            key = f"alpha={alpha:g} {'symmetric' if symmetric else 'asymmetric'}"
            result["swap"][key] = run(Toward(h["blue"], alpha), symmetric)
            print("swap", key, json.dumps(result["swap"][key]), flush=True)
    for t_edit in (501, 701):
        key = f"alpha=1 asymmetric t_edit={t_edit}"
        result["swap"][key] = run(Toward(h["blue"]), False, t_edit)
        print("swap", key, json.dumps(result["swap"][key]), flush=True)

    folder = Path(f"runs/hspace-paired-{args.name or args.model}/md")
    make_direction(model, folder, source="red", target="blue", items=args.items, steps=steps,
                   progress=False, overwrite=True)  # fmt: skip
    from diffprobe.interventions.hspace import load_delta

    rows = load_delta(folder / "delta.safetensors")[0].delta.detach()
    for alpha, symmetric in ((1, False), (2, False), (4, False), (8, False), (1, True), (4, True)):
        key = f"alpha={alpha:g} {'symmetric' if symmetric else 'asymmetric'}"
        result["mean_difference"][key] = run(Scaled(rows, alpha), symmetric)
        print("mean difference", key, json.dumps(result["mean_difference"][key]), flush=True)

    if args.oracle_iters > 0:
        for parameter in model.denoiser.parameters():
            parameter.requires_grad_(False)
        free = torch.nn.Parameter(torch.zeros(steps, *h["red"].shape[1:]))

        class PerImage(torch.nn.Module):
            kind, shape = "constant", tuple(h["red"].shape[2:])

            def forward(self, current, timestep, step_index=0):
                return free[step_index]

        edit = HSpaceEdit([PerImage()], t_edit=0)
        with torch.no_grad():
            target = decode(model, model.encode_images(blue.images))
        optimiser = torch.optim.Adam([free], lr=args.oracle_lr)
        norm_h = h["red"].flatten(2).norm(dim=2)
        log = []
        for iteration in range(args.oracle_iters + 1):
            x = x_T["red"]
            for index, timestep in enumerate(plan.timesteps):
                edit.step_index = index
                t = torch.full((16,), float(timestep))
                with torch.no_grad():
                    eps = model.denoise(x, t, cond, None)
                with edit_context(model, edit.hook(model, steps)):
                    eps_edit = model.denoise(x, t, cond, None)
                x, _ = asymmetric_step(x, eps, eps_edit, plan.alpha(timestep),
                                       plan.alpha(plan.previous(index)))  # fmt: skip
            pixels = decode(model, x)
            loss = ((pixels - target) ** 2).mean()
            if iteration % 25 == 0 or iteration == args.oracle_iters:
                relative = float((free.detach().flatten(2).norm(dim=2) / norm_h).mean())
                log.append({"iteration": iteration, "mse": float(loss.detach()),
                            "relative_norm": relative, **summary(pixels)})  # fmt: skip
                print("oracle", json.dumps(log[-1]), flush=True)
            if iteration == args.oracle_iters:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        result["oracle"] = {"lr": args.oracle_lr, "optimiser": "Adam", "log": log}
    result["seconds"] = time.perf_counter() - began
    out = Path(f"benchmarks/results/hspace_paired_{args.name or args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
