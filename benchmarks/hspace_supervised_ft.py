"""A conv f_t (Asyrp's DeltaBlock) trained on colour twins instead of CLIP, judged by the
ground-truth evaluation.

    python benchmarks/hspace_supervised_ft.py --model tiny-ddpm --items 16 --steps 20 --iters 100

Training data: ``--items`` red images (items 10,000+) and their blue twins (the same items of
the blue stream: same shape, size, position, rotation, background). Loss: the mean squared
error between the output of the whole asymmetric chain from the inverted red image (Δh =
f_t(h_t, t) at every step, ε̃ in P_t, ε in D_t, no clipping) and the blue twin's pixels,
back-propagated through every step (Asyrp detaches x_t per step and uses a CLIP loss; this is
the supervised upper reference for an h-dependent f_t, not Asyrp's recipe). Adam, full batch.
The f_t is saved as a Δh file and judged by ``stages.hspace.evaluate`` on 16 held-out red
images (items 20,000–20,015): blue %, shape / quadrant kept, S_dir, Fréchet, linearity.

Writes benchmarks/results/hspace_supervised_ft_<name>.json (folders under runs/).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-ddpm")
    parser.add_argument("--name", default=None)
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--kind", default="conv")
    parser.add_argument("--strengths", default="-2,-1,0,0.5,1,1.5,2")
    args = parser.parse_args()

    import torch

    import diffprobe
    from diffprobe.hooks.editing import edit as edit_context
    from diffprobe.interventions.hspace import HSpaceEdit, decode, h_shape, save_delta
    from diffprobe.interventions.hspace.deltas import build_delta
    from diffprobe.interventions.hspace.process import _conditioning, asymmetric_step, schedule
    from diffprobe.stages.hspace import evaluate, invert, paired_groups, source_images

    torch.set_num_threads(1)
    began = time.perf_counter()
    name = args.name or args.model
    model = diffprobe.load(args.model)
    for parameter in model.denoiser.parameters():
        parameter.requires_grad_(False)
    plan = schedule(model, args.steps)
    red = source_images("red", args.items, start=10_000)
    blue = source_images("blue", args.items, start=10_000)
    assert paired_groups(red, blue)
    _, x_T = invert(model, red.images, args.steps, False)
    with torch.no_grad():
        target = decode(model, model.encode_images(blue.images))
    torch.manual_seed(0)
    delta = build_delta(args.kind, h_shape(model), args.steps)
    edit = HSpaceEdit([delta], t_edit=0)
    cond = _conditioning(model, None, len(x_T))
    optimiser = torch.optim.Adam(delta.parameters(), lr=args.lr)
    history = []
    for iteration in range(args.iters):
        x = x_T
        for index, timestep in enumerate(plan.timesteps):
            edit.step_index = index
            t = torch.full((len(x),), float(timestep))
            with torch.no_grad():
                eps = model.denoise(x, t, cond, None)
            with edit_context(model, edit.hook(model, args.steps)):
                eps_edit = model.denoise(x, t, cond, None)
            x, _ = asymmetric_step(x, eps, eps_edit, plan.alpha(timestep),
                                   plan.alpha(plan.previous(index)))  # fmt: skip
        loss = ((decode(model, x) - target) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(float(loss.detach()))
        if iteration % 10 == 0 or iteration == args.iters - 1:
            print(f"iteration {iteration} mse {history[-1]:.4f}", flush=True)
    train_seconds = time.perf_counter() - began
    runs = Path(f"runs/hspace-supervised-{name}")
    info = {"model": model.name, "source": "red", "target": "blue", "kind": args.kind,
            "train_steps": args.steps, "t_edit": 0, "t_boost": -1,
            "objective": "MSE(chain output, blue twin), full back-propagation"}  # fmt: skip
    save_delta(runs / "delta.safetensors", delta, info)
    strengths = [float(v) for v in args.strengths.split(",")]
    result = evaluate(model, [runs / "delta.safetensors"], runs / "eval", source="red",
                      target="blue", strengths=strengths, items=16, steps=args.steps, t_edit=0,
                      t_boost=-1, progress=False, overwrite=True)  # fmt: skip
    result["train"] = {"items": args.items, "iters": args.iters, "lr": args.lr,
                       "optimiser": "Adam", "history": history,
                       "seconds_per_iteration": train_seconds / args.iters}  # fmt: skip
    result["wall_seconds"] = time.perf_counter() - began
    for row in result["rows"]:
        print(json.dumps({k: row[k] for k in ("strength", "target_colour", "shape_kept",
                                               "quadrant_kept", "shape_true", "s_dir")}))  # fmt: skip
    print(json.dumps(result["linearity"]))
    out = Path(f"benchmarks/results/hspace_supervised_ft_{name}.json")
    out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
