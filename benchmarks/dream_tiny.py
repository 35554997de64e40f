"""Deep dream on ``tiny``: does the objective rise, and does a colour channel dream its colour?

Part 1 (rise). 16 channels of ``unet.up_blocks.1`` (64 channels; every 4th) dreamt with the
thesis defaults (100 steps, AdamW 0.05, TV 0.5, range 0.5, jitter 1, rotate 5°, scale 1.1,
spectral filter, blur σ 0.5 -> 0, renoise) at timestep 0 from seeded noise. Initial and final
activation by :func:`diffprobe.interventions.dream.measure` (z noised to t=0 with seeded noise,
no random transforms); the channel's max over 64 images generated from held-out captions is
the same measure on their final latents. Goal: final > initial and final > max, every channel.

Part 2 (ground truth). Images generated from colour captions (``--captions`` per colour, 8
colours, ``--gen-steps`` DDIM steps, guidance 5) with ``unet.up_blocks.1`` captured at every
step (conditional branch, mean over space). Selectivity of channel c for colour k at timestep t:
the ROC AUC of its mean activity separating captions of colour k from the rest. The (channel,
colour, timestep) of highest AUC is dreamt with ``--seeds`` seeds at that timestep, against
``--seeds`` random other channels (one seed each), with and without renoise; the attribute
reader reads the colour of every decoded dream. Goal: the selective channel's dreams are read
as its colour more often than the random channels' dreams.

    nice .venv/bin/python benchmarks/dream_tiny.py --out benchmarks/results/dream_tiny.json \
        --figures docs/figures
    nice .venv/bin/python benchmarks/dream_tiny.py --parts colour --init prior \
        --min-timestep 200 --out benchmarks/results/dream_tiny_prior.json --figures docs/figures

``--init prior`` starts both arms of part 2 from the same images generated from the empty
prompt without guidance (the thesis starts dreams from priors: empty-prompt generations,
steered); ``--min-timestep`` restricts the choice of the selective channel to timesteps where
the schedule's noise (and so renoise) matters.

Writes JSON (``--out``) and, with ``--figures DIR``, the grid and the objective curves.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SITE = "unet.up_blocks.1"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def auc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC AUC of ``scores`` (items, features) for boolean labels ``positive`` (items,), by
    the Mann-Whitney rank sum (ties get their mean rank)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=0)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@torch.no_grad()
def channel_means(model, z: torch.Tensor, timestep: float, noise_seed: int = 0) -> torch.Tensor:
    """(items, channels) spatial means at SITE of z noised to ``timestep`` with
    ``item_noise(shape, noise_seed, items)``: what ``dream.measure`` computes, all channels."""
    import diffprobe
    from diffprobe.models.noise import item_noise

    noise = item_noise(z.shape[1:], noise_seed, range(len(z)))
    x_t, t = model.add_noise(z, timestep=timestep, noise=noise)
    cond = model.encode_prompt([""] * len(z))
    with diffprobe.capture(model, SITE, stop_early=True) as cache:
        model.denoise(x_t, t, cond)
    return cache.last(SITE).float().mean((2, 3))


def part_rise(model, args, dream) -> dict:
    from diffprobe.data import shapes

    channels = list(range(0, 64, 4))[: args.channels]
    sample = shapes.sample(args.images, seed=1, split="heldout")
    log(f"generating {args.images} images for the max activation")
    latents = model.generate(sample.captions, steps=25, guidance_scale=5.0, seed=0,
                             output_type="latent")  # fmt: skip
    data_means = channel_means(model, latents.float(), 0.0)  # (images, 64)
    check, _ = dream.measure(model, dream.channel(SITE, channels[1]), latents[:4], timestep=0)
    torch.testing.assert_close(check, data_means[:4, channels[1]], rtol=1e-4, atol=1e-4)
    objective = dream.thesis_objective(dream.channel(SITE, channels))
    init = dream.noise_init(dream.input_shape(model), [0] * len(channels))
    log(f"dreaming {len(channels)} channels, {args.steps} steps")
    result = dream.render(model, objective, init, timestep=0, seeds=[0] * len(channels),
                          steps=args.steps, progress=True)  # fmt: skip
    activation = dream.channel(SITE, channels)
    initial, _ = dream.measure(model, activation, init, timestep=0)
    final, _ = dream.measure(model, activation, result.latents, timestep=0)
    rows = []
    for i, c in enumerate(channels):
        best = float(data_means[:, c].max())
        rows.append({"channel": c, "initial": float(initial[i]), "final": float(final[i]),
                     "max_over_images": best, "final_above_initial": bool(final[i] > initial[i]),
                     "final_above_max": bool(final[i] > best)})  # fmt: skip
    return {
        "site": SITE, "images": args.images, "steps": args.steps,
        "seconds_per_step": result.seconds_per_step, "rows": rows,
        "all_above_initial": all(r["final_above_initial"] for r in rows),
        "all_above_max": all(r["final_above_max"] for r in rows),
        "curves": {str(c): result.values(result.leaves[0])[:, i].tolist()
                   for i, c in enumerate(channels)},
        "_images": result.images, "_channels": channels,
    }  # fmt: skip


def part_colour(model, args, dream) -> dict:
    import diffprobe
    from diffprobe.data import shapes
    from diffprobe.data.attributes import read_attributes

    colours = shapes.COLOUR_NAMES
    captions, labels = [], []
    for k, name in enumerate(colours):
        sample = shapes.sample(args.captions, seed=10 + k, colour=name, split="all")
        captions.extend(sample.captions)
        labels.extend([k] * args.captions)
    labels = np.array(labels)
    log(f"generating {len(captions)} colour captions with {SITE} captured")
    with diffprobe.capture(model, SITE, reduce=lambda v: v.float().mean((2, 3))) as cache:
        images = model.generate(captions, steps=args.gen_steps, guidance_scale=5.0, seed=0)
    view = cache.view(SITE)
    activity = view.branch("cond").numpy()  # (calls, items, channels)
    timesteps = [float(t) for t in view.timesteps]
    read = read_attributes((images * 255).round().astype(np.uint8))["colour"]
    aucs = np.stack(
        [
            np.stack([auc(activity[s], labels == k) for k in range(len(colours))])
            for s in range(len(timesteps))
        ]
    )  # (timesteps, colours, channels)
    # renoise matters only where the schedule's noise is not negligible
    eligible = np.array([t >= args.min_timestep for t in timesteps])
    masked = np.where(eligible[:, None, None], aucs, -np.inf)
    s, k, c = np.unravel_index(np.argmax(masked), aucs.shape)
    t_best, colour, best = timesteps[s], int(k), int(c)
    log(f"most selective: channel {best} for {colours[colour]} at t={t_best:g}, "
        f"AUC {aucs[s, k, c]:.3f}")  # fmt: skip
    rng = np.random.default_rng(0)
    others = [ch for ch in range(activity.shape[-1]) if ch != best]
    random_channels = [int(v) for v in rng.choice(others, size=args.seeds, replace=False)]
    seeds = list(range(args.seeds))
    targets = [best] * args.seeds + random_channels
    dream_seeds = seeds + seeds
    out: dict = {
        "colour": colours[colour], "channel": best, "timestep": t_best,
        "auc": float(aucs[s, k, c]), "generation_colour_accuracy": float(np.mean(read == labels)),
        "best_auc_per_colour": {colours[j]: float(aucs[:, j].max()) for j in range(len(colours))},
        "random_channels": random_channels, "seeds": seeds, "variants": {},
    }  # fmt: skip
    if args.init == "prior":
        # the thesis starts dreams from priors (empty-prompt images); both arms share them
        log(f"generating {args.seeds} empty-prompt start latents")
        starts = model.generate([""] * args.seeds, steps=25, guidance_scale=1.0, seed=0,
                                output_type="latent").float().cpu()  # fmt: skip
        init = torch.cat([starts, starts])
        out["_starts"] = dream.decode(model, starts)
        start_colours = read_attributes(out["_starts"])["colour"]
        out["start_hits"] = int((start_colours == colour).sum())
        out["start_colours"] = [colours[i] if i >= 0 else "none" for i in start_colours]
    else:
        init = dream.noise_init(dream.input_shape(model), dream_seeds)
    out["init"] = args.init
    for renoise in (True, False):
        objective = dream.thesis_objective(dream.channel(SITE, targets))
        log(f"dreaming {len(targets)} dreams at t={t_best:g}, renoise={renoise}")
        result = dream.render(model, objective, init, timestep=t_best, seeds=dream_seeds,
                              transforms=dream.default_transforms(renoise), steps=args.steps,
                              progress=True)  # fmt: skip
        colours_read = read_attributes(result.images)["colour"]
        hits = colours_read == colour
        n = args.seeds
        out["variants"]["renoise" if renoise else "no_renoise"] = {
            "selective_hits": int(hits[:n].sum()), "random_hits": int(hits[n:].sum()),
            "dreams_each": n, "selective_rate": float(hits[:n].mean()),
            "random_rate": float(hits[n:].mean()),
            "colours_read_selective": [colours[i] if i >= 0 else "none" for i in colours_read[:n]],
            "colours_read_random": [colours[i] if i >= 0 else "none" for i in colours_read[n:]],
            "_images": result.images,
        }  # fmt: skip
    return out


def figures(rise: dict, colour: dict, folder: Path) -> None:
    from diffprobe.io import atomic_path
    from diffprobe.report.dream import dream_grid, plot_objective

    folder.mkdir(parents=True, exist_ok=True)
    if colour is not None:
        colour_grid(colour, folder)
    if rise is None:
        return
    curves = {f"ch {c}": np.array(v) for c, v in list(rise["curves"].items())}
    plot_objective(curves, folder / "dream_objective.png", ylabel="channel mean activation",
                   title=f"tiny {SITE}: activation during the dream (t=0)")  # fmt: skip
    rows = [(f"ch {c}", [img]) for c, img in zip(rise["_channels"], rise["_images"], strict=True)]
    side = dream_grid([("t=0", [img for _, (img,) in rows])],
                      [f"ch {c}" for c in rise["_channels"]], "channel dreams, t=0")  # fmt: skip
    with atomic_path(folder / "dream_channels.png", record=False) as temporary:
        side.save(temporary, format="PNG")


def colour_grid(colour: dict, folder: Path) -> None:
    from diffprobe.io import atomic_path
    from diffprobe.report.dream import dream_grid

    n = len(colour["seeds"])
    grid_rows = [("start", list(colour["_starts"]))] if "_starts" in colour else []
    for name, variant in colour["variants"].items():
        images = variant["_images"]
        grid_rows.append((f"{name}: ch {colour['channel']}", list(images[:n])))
        grid_rows.append((f"{name}: random", list(images[n:])))
    grid = dream_grid(grid_rows, [f"seed {s}" for s in colour["seeds"]],
                      f"dreams of channel {colour['channel']} ({colour['colour']}, "
                      f"t={colour['timestep']:g}) vs random channels")  # fmt: skip
    with atomic_path(folder / f"dream_colour_grid_{colour['init']}.png", record=False) as temporary:
        grid.save(temporary, format="PNG")


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if not k.startswith("_")}
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--captions", type=int, default=16, help="captions per colour")
    parser.add_argument("--gen-steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--init", default="noise", help="noise | prior (empty-prompt images)")
    parser.add_argument(
        "--min-timestep",
        type=float,
        default=0.0,
        help="choose the selective channel among timesteps >= this",
    )
    parser.add_argument("--parts", default="rise,colour")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--figures", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import diffprobe
    from diffprobe.interventions import dream

    model = diffprobe.load(args.model)
    started = time.perf_counter()
    parts = args.parts.split(",")
    rise = part_rise(model, args, dream) if "rise" in parts else None
    colour = part_colour(model, args, dream) if "colour" in parts else None
    result = {"model": args.model, "args": {k: str(v) for k, v in vars(args).items()},
              "rise": strip(rise), "colour": strip(colour),
              "seconds": time.perf_counter() - started,
              "torch": torch.__version__, "threads": args.threads}  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from diffprobe.io import write_text

        write_text(args.out, text + "\n")
    if args.figures:
        figures(rise, colour, args.figures)


if __name__ == "__main__":
    main()
