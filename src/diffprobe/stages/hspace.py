"""h-space stages: train a Δh source, build a training-free direction, evaluate edits.

Images are shapes-world items of the source colour (``shapes.sample(..., colour=source)``),
DDIM-inverted by the model; every folder follows the folder rule (``claim_output``) and holds
``delta.safetensors`` (train / direction) or ``eval.json`` + plots (eval)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffprobe.analysis.edits import frechet_distance, kernel_inception_distance, linearity, psnr
from diffprobe.analysis.edits import s_dir as s_dir_metric
from diffprobe.interventions.hspace import (
    HSpaceEdit,
    HSpaceError,
    ddim_invert,
    decode,
    h_shape,
    load_delta,
    sample,
    save_delta,
)
from diffprobe.interventions.hspace.clip import ClipScorer, load_clip
from diffprobe.interventions.hspace.deltas import ConstantDelta, FreeDelta, build_delta
from diffprobe.interventions.hspace.paired import train_paired
from diffprobe.interventions.hspace.process import SITE
from diffprobe.interventions.hspace.training import (
    OBJECTIVES,
    TrainConfig,
    choose_timesteps,
    distance_curve,
    train_delta,
)
from diffprobe.io import claim_output, write_json

__all__ = [
    "HSPACE_KIND",
    "edit_images",
    "evaluate",
    "make_direction",
    "paired_data",
    "paired_groups",
    "source_images",
    "train",
]

HSPACE_KIND = "hspace"


def check_texts(source: str, target: str) -> None:
    if source.strip().lower() == target.strip().lower():
        raise HSpaceError(f"--source and --target are the same text ({source!r}); an edit needs "
                          "two different texts, e.g. --source red --target blue")  # fmt: skip


def source_images(colour: str, items: int, seed: int = 0, start: int = 0):
    """Shapes-world items of one colour (all combinations), as a ``ShapesSample``."""
    from diffprobe.data import shapes

    if colour not in shapes.COLOUR_NAMES:
        raise HSpaceError(f"the shapes world has no colour {colour!r}; use one of "
                          f"{', '.join(shapes.COLOUR_NAMES)}")  # fmt: skip
    return shapes.sample(items, seed=seed, split="all", start=start, colour=colour)


def paired_groups(first, second) -> bool:
    """True when item i of the two ``ShapesSample`` groups differs in colour only (same shape,
    size, position, rotation, background): items of one seed, split and start are twins across
    colours, because the colour filter keeps the pool's order and every colour has the same
    combinations. The mean difference of twins has no shape, position or background term."""
    keys = [k for k in first.factors if k not in ("colour", "template")]
    return len(first) == len(second) and all(
        np.array_equal(first.factors[k], second.factors[k]) for k in keys
    )


def to_uint8(pixels: torch.Tensor, size: int = 64) -> np.ndarray:
    """(items, 3, H, W) in [-1, 1] -> uint8 (items, size, size, 3) (bilinear up-sampling)."""
    pixels = pixels.detach().float().clamp(-1, 1)
    if pixels.shape[-1] != size:
        pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear",
                                                 align_corners=False, antialias=True)  # fmt: skip
    return ((pixels + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()


def invert(
    model, images: np.ndarray, steps: int, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, x_T) in denoiser space of uint8 images (items, H, W, 3)."""
    with torch.no_grad():
        x0 = model.encode_images(images)
    return x0, ddim_invert(model, x0, steps=steps, progress=progress)


def edit_images(model, x_T: torch.Tensor, sources, *, strength: float, steps: int, t_edit: int,
                t_boost: int, train_steps: int | None, coefficients=None,
                seed: int = 0) -> torch.Tensor:  # fmt: skip
    """Pixels (items, 3, H, W) of the edited reverse process from ``x_T``."""
    hspace = HSpaceEdit(list(sources), coefficients, strength=strength, t_edit=t_edit,
                        train_steps=train_steps)  # fmt: skip
    with torch.no_grad():
        return decode(model, sample(model, x_T, steps=steps, hspace=hspace, t_boost=t_boost,
                                    seed=seed, clip_sample=False))  # fmt: skip


def _clip_distance(scorer: ClipScorer):
    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 1 - (scorer.images(a) * scorer.images(b)).sum(-1)

    return distance


def timesteps_from_curve(model, x0, steps: int, scorer: ClipScorer, source: str, target: str,
                         edit_fraction: float = 0.33,
                         boost_fraction: float = 0.0) -> tuple[int, int, dict]:  # fmt: skip
    """Asyrp's rule with the CLIP-feature distance 1 − cos(E_I(x0), E_I(·)) in place of LPIPS
    (whose weights are not available offline), normalised by its maximum over t: t_edit where
    d(x0, P_t)/max ≥ edit_fraction·cos(E_T(src), E_T(trg)); t_boost where
    d(x0, x_t)/max ≥ boost_fraction (0: no boosting)."""
    curve = distance_curve(model, x0, steps, _clip_distance(scorer))
    scale = max(float(curve["d_predicted"].max()), 1e-9)
    normalised = {**curve, "d_predicted": curve["d_predicted"] / scale,
                  "d_noisy": curve["d_noisy"] / max(float(curve["d_noisy"].max()), 1e-9)}  # fmt: skip
    text_cos = float(scorer.concept(source) @ scorer.concept(target))
    t_edit, t_boost = choose_timesteps(normalised, edit_fraction * text_cos, boost_fraction)
    return t_edit, t_boost, {k: v.tolist() for k, v in normalised.items()} | {
        "distance": "1 - cos of CLIP image embeddings, divided by its maximum over t",
        "text_cosine": text_cos, "edit_fraction": edit_fraction,
        "boost_fraction": boost_fraction}  # fmt: skip


def paired_data(source: str, target: str, items: int, seed: int = 0):
    """(source group, target twins) for ``--objective paired``, or one clear line why not."""
    from diffprobe.data import shapes

    for name, colour in (("--source", source), ("--target", target)):
        if colour not in shapes.COLOUR_NAMES:
            raise HSpaceError(f"--objective paired trains on shapes-world colour twins, but "
                              f"{name} {colour!r} is not a shapes-world colour (use one of "
                              f"{', '.join(shapes.COLOUR_NAMES)}); free text needs "
                              "--objective clip")  # fmt: skip
    first, second = source_images(source, items, seed), source_images(target, items, seed)
    if not paired_groups(first, second):
        raise HSpaceError(f"--objective paired: the {source} and {target} images are not "
                          "twins (they differ in more than colour); nothing to pair")  # fmt: skip
    return first, second


def keep_mask(model, masks: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """(items, 1, H, W) weight of the pixels outside the shape (1 − area-resized mask)."""
    size = decode(model, like[:1]).shape[-2:]
    mask = torch.from_numpy(np.asarray(masks)).float()[:, None]
    return 1 - torch.nn.functional.interpolate(mask, size=tuple(size), mode="area")


def train(model, out: str | Path, *, source: str, target: str, kind: str = "conv",
          items: int = 16, clip: str = "tiny-clip", config: TrainConfig | None = None,
          t_edit: int | None = None, t_boost: int | None = None, seed: int = 0,
          progress: bool = True, overwrite: bool = False) -> Path:  # fmt: skip
    """Train a Δh source (conv, transformer, free) on ``items`` inverted images of the
    ``source`` colour; writes ``delta.safetensors`` and ``train.json``. ``config.objective``:
    ``clip`` (Asyrp's directional CLIP + L1 loss) or ``paired`` (the target-colour twins'
    chains, :mod:`~diffprobe.interventions.hspace.paired`; t_edit 0 and no boosting unless
    given; no CLIP)."""
    check_texts(source, target)
    config = config or TrainConfig()
    if config.objective not in OBJECTIVES:
        raise HSpaceError(f"--objective {config.objective!r}: expected clip or paired")
    paired = config.objective == "paired"
    if paired:
        data, twins = paired_data(source, target, items, seed)
        clip, scorer = None, None
    else:
        data, scorer = source_images(source, items, seed=seed), load_clip(clip)
    shape = h_shape(model)
    out = claim_output(out, HSPACE_KIND, overwrite=overwrite)
    x0, x_T = invert(model, data.images, config.steps, progress)
    curve = None
    if paired:
        t_edit = 0 if t_edit is None else t_edit
        t_boost = -1 if t_boost is None else t_boost
    elif t_edit is None or t_boost is None:
        chosen_edit, chosen_boost, curve = timesteps_from_curve(model, x0, config.steps, scorer,
                                                                source, target)  # fmt: skip
        t_edit = chosen_edit if t_edit is None else t_edit
        t_boost = chosen_boost if t_boost is None else t_boost
    config = TrainConfig(**{**asdict(config), "t_edit": t_edit})
    torch.manual_seed(seed)
    delta = build_delta(kind, shape, config.steps)
    if paired:
        _, twin_T = invert(model, twins.images, config.steps, progress)
        result = train_paired(model, delta, x_T, twin_T, keep_mask(model, data.masks, x0),
                              config, progress=progress)  # fmt: skip
    else:
        result = train_delta(model, delta, x0, x_T, scorer, source, target, config,
                             progress=progress)  # fmt: skip
    info = {"model": model.name, "source": source, "target": target, "kind": kind,
            "train_steps": config.steps, "t_edit": t_edit, "t_boost": t_boost,
            "objective": config.objective, "clip": clip,
            "templates": None if paired else list(scorer.templates), "items": items,
            "config": asdict(config)}  # fmt: skip
    save_delta(out / "delta.safetensors", delta, info)
    write_json(out / "train.json", {**info, "curve": curve, "h_shape": list(shape),
                                    "parameters": sum(p.numel() for p in delta.parameters()),
                                    **result})  # fmt: skip
    return out


def capture_h(model, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """h (steps, items, C, H, W) along the plain DDIM chains from ``x_T``."""
    from diffprobe.hooks.capture import capture

    site = f"{model.denoiser_name}.{SITE}"
    with torch.no_grad(), capture(model, [site]) as cache:
        sample(model, x_T, steps=steps, clip_sample=False)
    return cache.stack(site).reshape(steps, len(x_T), *cache.last(site).shape[1:])


def make_direction(model, out: str | Path, *, source: str, target: str,
                   method: str = "mean-difference", items: int = 16, steps: int = 40,
                   seed: int = 0, progress: bool = True,
                   overwrite: bool = False) -> Path:  # fmt: skip
    """Training-free Δh: ``mean-difference`` — per sampling step, mean h of ``target``-colour
    chains minus mean h of ``source``-colour chains (a free Δh per step, no training); the two
    groups are twins (:func:`paired_groups`: item i differs in colour only), so this is the
    paired mean difference, recorded as ``paired`` in ``direction.json``; or
    ``pca`` — the first principal direction of h over both groups and all steps, signed to
    point from source to target (a constant Δh, scaled to the mean-difference norm)."""
    check_texts(source, target)
    if method not in ("mean-difference", "pca"):
        raise HSpaceError(f"unknown direction method {method!r}; use mean-difference or pca")
    out = claim_output(out, HSPACE_KIND, overwrite=overwrite)
    h, groups = {}, {}
    for name, colour in (("source", source), ("target", target)):
        groups[name] = source_images(colour, items, seed=seed, start=10_000)
        _, x_T = invert(model, groups[name].images, steps, progress)
        h[name] = capture_h(model, x_T, steps)
    twins = paired_groups(groups["source"], groups["target"])
    difference = h["target"].mean(1) - h["source"].mean(1)  # (steps, C, H, W)
    if method == "mean-difference":
        delta = FreeDelta(*difference.shape[1:], steps)
        delta.delta.data.copy_(difference)
    else:
        from diffprobe.interventions.hspace.deltas import pca_directions

        pooled = torch.cat([h["source"], h["target"]], 1).flatten(0, 1)
        direction, _ = pca_directions(pooled, 1)
        direction = direction[0]
        mean_diff = difference.mean(0)
        sign = torch.sign((direction * mean_diff).sum())
        delta = ConstantDelta(sign * direction * mean_diff.norm())
    info = {"model": model.name, "source": source, "target": target, "method": method,
            "items": items, "paired": twins,
            "train_steps": steps if method == "mean-difference" else None}  # fmt: skip
    save_delta(out / "delta.safetensors", delta, info)
    write_json(out / "direction.json", {**info, "norm_per_step": difference.flatten(1).norm(
        dim=1).tolist()})  # fmt: skip
    return out


def evaluate(model, deltas: Sequence[str | Path], out: str | Path, *, source: str, target: str,
             strengths: Sequence[float] = (-2, -1, 0, 1, 2), items: int = 16, steps: int = 40,
             t_edit: int | None = None, t_boost: int | None = None,
             coefficients: Sequence[float] | None = None, clip: str = "tiny-clip",
             seed: int = 0, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Edit ``items`` held-out ``source``-colour images with the sum of ``deltas`` at every
    strength; write ``eval.json``, ``grid.png`` and ``metrics.png``; return the metrics."""
    from diffprobe.data import shapes
    from diffprobe.data.attributes import read_attributes
    from diffprobe.report.hspace import edit_grid, metric_curves

    check_texts(source, target)
    if not deltas:
        raise HSpaceError("give at least one Δh file (--delta)")
    began = time.perf_counter()
    shape = h_shape(model)
    loaded = [load_delta(path, shape) for path in deltas]
    out = claim_output(out, HSPACE_KIND, overwrite=overwrite)
    sources = [source_ for source_, _ in loaded]
    info = loaded[0][1]
    train_steps = info.get("train_steps")
    t_edit = int(info.get("t_edit", 0) if t_edit is None else t_edit)
    t_boost = int(info.get("t_boost", -1) if t_boost is None else t_boost)
    scorer = load_clip(clip)
    data = source_images(source, items, seed=seed, start=20_000)
    x0, x_T = invert(model, data.images, steps, progress)
    with torch.no_grad():
        originals = decode(model, x0)
        original_u8 = to_uint8(originals)
        original_emb = scorer.images(originals).numpy()
    text_target = scorer.concept(target).numpy()
    text_source = scorer.concept(source).numpy()
    target_index = shapes.COLOUR_NAMES.index(target) if target in shapes.COLOUR_NAMES else None
    colour_texts = scorer.texts([f"a {c} shape" for c in shapes.COLOUR_NAMES])
    read_original = read_attributes(original_u8)
    with torch.no_grad():  # the unedited (α = 0, no Δh) reconstruction of the same chains
        plain = decode(model, sample(model, x_T, steps=steps, t_boost=t_boost, seed=seed,
                                     clip_sample=False))  # fmt: skip
    read_plain = read_attributes(to_uint8(plain))
    rows, grid = [], []
    for strength in strengths:
        pixels = edit_images(model, x_T, sources, strength=float(strength), steps=steps,
                             t_edit=t_edit, t_boost=t_boost, train_steps=train_steps,
                             coefficients=coefficients, seed=seed)  # fmt: skip
        edited = to_uint8(pixels)
        grid.append(edited)
        with torch.no_grad():
            embeddings = scorer.images(pixels)
        read = read_attributes(edited)
        probability = torch.softmax(100 * embeddings @ colour_texts.T, dim=1)
        row = {
            "strength": float(strength),
            "s_dir": float(
                np.mean(s_dir_metric(embeddings.numpy(), original_emb, text_target, text_source))
            ),  # fmt: skip
            "target_colour": float(np.mean(read["colour"] == target_index)),
            "source_colour": float(np.mean(read["colour"] == shapes.COLOUR_NAMES.index(source))),
            "shape_kept": float(np.mean(read["shape"] == read_original["shape"])),
            "quadrant_kept": float(np.mean(read["quadrant"] == read_original["quadrant"])),
            "shape_true": float(np.mean(read["shape"] == data.factors["shape"])),
            "quadrant_true": float(np.mean(read["quadrant"] == data.factors["quadrant"])),
            "shape_kept_reconstruction": float(np.mean(read["shape"] == read_plain["shape"])),
            "quadrant_kept_reconstruction": float(
                np.mean(read["quadrant"] == read_plain["quadrant"])
            ),
            "clip_target_probability": float(probability[:, target_index].mean())
            if target_index is not None
            else None,
            "psnr_to_original": psnr(original_u8, edited),
            "frechet_clip": frechet_distance(original_emb, embeddings.numpy()),
            "kid_clip": kernel_inception_distance(original_emb, embeddings.numpy(), subsets=10)[
                0
            ],  # fmt: skip
        }
        rows.append(row)
    xs = np.array([r["strength"] for r in rows])
    result = {
        "model": model.name,
        "deltas": [str(p) for p in deltas],
        "delta_info": info,
        "source": source,
        "target": target,
        "items": items,
        "steps": steps,
        "t_edit": t_edit,
        "t_boost": t_boost,
        "clip": clip,
        "templates": list(scorer.templates),
        "feature_extractor": f"{clip} image embeddings (dim {original_emb.shape[1]})",
        "kept_definitions": {
            "*_kept": "reader on the edit == reader on the original image",
            "*_true": "reader on the edit == the generator's factor",
            "*_kept_reconstruction": "reader on the edit == reader on the unedited "
            "reconstruction (same chain, no Δh)",
        },
        "reconstruction": {
            "shape_true": float(np.mean(read_plain["shape"] == data.factors["shape"])),
            "quadrant_true": float(np.mean(read_plain["quadrant"] == data.factors["quadrant"])),
            "source_colour": float(
                np.mean(read_plain["colour"] == shapes.COLOUR_NAMES.index(source))
            ),
        },
        "rows": rows,
        "linearity": {
            key: linearity(xs, np.array([r[key] for r in rows]))
            for key in ("s_dir", "target_colour", "clip_target_probability")
            if rows[0][key] is not None and len(rows) >= 3
        },  # fmt: skip
        "seconds": time.perf_counter() - began,
    }
    if 0.0 in [float(s) for s in strengths]:
        result["reconstruction_psnr_at_0"] = rows[[float(s) for s in strengths].index(0.0)][
            "psnr_to_original"
        ]
    write_json(out / "eval.json", result)
    edit_grid(np.stack([original_u8, *grid], 1)[: min(items, 8)],
              ["original", *[f"α={s:g}" for s in strengths]], out / "grid.png",
              title=f"{model.name}: {source} → {target}")  # fmt: skip
    metric_curves(xs, {k: [r[k] for r in rows] for k in ("s_dir", "target_colour", "shape_kept",
                                                          "quadrant_kept")},
                  out / "metrics.png", title=f"{model.name}: {source} → {target}")  # fmt: skip
    return result
