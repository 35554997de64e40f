"""Ground truth for attribution on `tiny`: do the shape and colour words' maps cover the shape?

Reads the maps that ``benchmarks/attribution_tiny_generate.py`` cached (N shapes-world
captions, train split, seed 0; one image each, seed i, guidance 7.5, STEPS DDIM steps; every
prompt token's raw cross-attention maps at every site and call). The ground-truth mask of each
generated image is the attribute reader's foreground
(:func:`diffprobe.data.attributes.foreground_masks`): the geometry of a generated shape is not
known, only its caption.

**Held-out protocol.** Items ``0 .. N/2-1`` are the *selection* half, ``N/2 .. N-1`` the
*report* half. Every choice (the threshold of each method and baseline, and the default
aggregation) is made on the selection half; the report half is scored once with those choices.

Methods (word maps; every map min-max normalised and thresholded as DAAM does):

- aggregation over layer groups (``all``, ``down``, ``mid``, ``up``, ``down+up``: DAAM's set,
  which leaves out the coarsest grid) x timestep ranges (``all``, ``early``, ``middle``,
  ``late``, ``middle+late``);
- token normalisation: ``raw`` (attention probabilities, softmax over all 16 text positions:
  DAAM's default ``normalize=False``), ``words`` (DAAM's ``normalize=True``: the aggregated
  map of each token divided, per pixel, by the sum over the prompt's word tokens, start and end
  tokens left out), ``words_per_call`` (the same, per site and call, before aggregating);
- upsampling ``bilinear`` (diffprobe) or ``bicubic`` clamped at 0 (DAAM);
- normalisation for thresholding ``minmax`` (DAAM's ``expand_as``) or ``max``.

Baselines: a centred Gaussian (sigma 1/4 of the side, one map for every image); a
**random token** of the same prompt (uniform over its non-special tokens other than the shape
and colour words: the baseline the issue names; no peer publishes one); the shape word's map of
**another image** (the next item of the same half: is the map specific to its image?). And per
token *role* (article, size, colour, shape, relation, position, background, start, end) the
mIoU and the concentration of the map on the object (mean of the map inside the mask over its
mean over the image: 1 = no preference), split by whether the token comes before or after the
shape word (`tiny`'s CLIP text encoder is causal: only tokens after the shape word can know it).

    PYTHONPATH=src python benchmarks/attribution_tiny.py \
        [--cache benchmarks/out/attribution_tiny_maps.npz] [--out benchmarks/results/attribution_tiny.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffprobe.analysis import attribution as maths
from diffprobe.data import shapes
from diffprobe.data.attributes import foreground_masks, read_attributes

TAUS = np.round(np.arange(0.05, 0.951, 0.05), 2)
LAYER_SETS = {
    "all": ("down", "mid", "up"),
    "down": ("down",),
    "mid": ("mid",),
    "up": ("up",),
    "down+up": ("down", "up"),
}
RANGE_SETS = {
    "all": ("early", "middle", "late"),
    "early": ("early",),
    "middle": ("middle",),
    "late": ("late",),
    "middle+late": ("middle", "late"),
}
NORMS = ("raw", "words", "words_per_call")
ROLES = {
    "article": {"a", "an"},
    "relation": {"in", "the", "on"},
    "position": {"top", "bottom", "left", "right"},
    "size": set(shapes.SIZE_RADII),
    "background": {"background", *shapes.BACKGROUND_NAMES},
    "punctuation": {",", ":"},
}


def role_of(piece: str, special: bool, first: bool, shape: str, colour: str) -> str:
    if special:
        return "start" if first else "end"
    word = piece.removesuffix("</w>")
    if word == shape:
        return "shape"
    if word == colour:
        return "colour"
    for role, words in ROLES.items():
        if word in words:
            return role
    return "other"


def upsample(maps: np.ndarray, size: int, mode: str) -> np.ndarray:
    """(items, rows, columns) -> (items, size, size)."""
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    if mode == "bilinear":
        out = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    else:
        out = F.interpolate(tensor, size=(size, size), mode="bicubic").clamp(min=0)
    return out[:, 0].numpy()


def per_item_iou(maps: np.ndarray, masks: np.ndarray, tau: float, scale: str) -> np.ndarray:
    if scale == "minmax":
        normalised = maths.normalise(maps)
    else:
        normalised = maps / np.maximum(maps.max(axis=(-2, -1), keepdims=True), 1e-30)
    return maths.iou(normalised >= tau, masks)


def sweep(maps: np.ndarray, masks: np.ndarray, scale: str) -> np.ndarray:
    """(taus,) mIoU at each threshold."""
    return np.array([per_item_iou(maps, masks, t, scale).mean() for t in TAUS])


def concentration(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Mean of each map inside its mask over its mean over the image (1: no preference)."""
    values = np.clip(maps, 0, None)
    inside = (values * masks).sum((-2, -1)) / np.maximum(masks.sum((-2, -1)), 1)
    return inside / np.maximum(values.mean((-2, -1)), 1e-30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default="benchmarks/out/attribution_tiny_maps.npz")
    parser.add_argument("--out", default="benchmarks/results/attribution_tiny.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = np.load(args.cache, allow_pickle=False)
    meta = json.loads(str(data["meta"]))
    raw = data["maps"].astype(np.float32)  # (items, tokens, layers, steps, rows, columns)
    images = data["images"]
    items = raw.shape[0]
    size = images.shape[1]
    masks = foreground_masks(images)
    read = read_attributes(images)
    factor = {k.removeprefix("factor_"): data[k] for k in data.files if k.startswith("factor_")}
    faithful = (read["shape"] == factor["shape"]) & (read["colour"] == factor["colour"])
    half = items // 2
    halves = {"selection": np.arange(half), "report": np.arange(half, items)}

    groups = np.array([maths.layer_group(s) for s in meta["sites"]])
    ranges = np.array([maths.timestep_range(p) for p in meta["noise_levels"]])

    # token bookkeeping per item
    roles, positions, word_tokens = [], [], np.zeros(raw.shape[:2], dtype=bool)
    rng = np.random.default_rng(0)
    random_token = np.zeros(items, dtype=int)
    for i in range(items):
        shape = shapes.SHAPES[factor["shape"][i]]
        colour = shapes.COLOUR_NAMES[factor["colour"][i]]
        pieces, special = meta["pieces"][i], meta["special"][i]
        item_roles = [
            role_of(p, s, j == 0, shape, colour)
            for j, (p, s) in enumerate(zip(pieces, special, strict=True))
        ]
        roles.append(item_roles)
        word_tokens[i, : len(pieces)] = ~np.array(special)
        positions.append(
            {
                "shape": [j for j, r in enumerate(item_roles) if r == "shape"],
                "colour": [j for j, r in enumerate(item_roles) if r == "colour"],
                "position": [j for j, r in enumerate(item_roles) if r == "position"],
            }
        )
        others = [
            j for j, r in enumerate(item_roles) if r not in ("start", "end", "shape", "colour")
        ]
        random_token[i] = rng.choice(others)

    # per-call renormalisation over the prompt's words (start/end tokens out), NaN padding -> 0
    filled = np.nan_to_num(raw, nan=0.0)
    word_sum_call = (filled * word_tokens[:, :, None, None, None, None]).sum(1, keepdims=True)
    per_call = filled / np.maximum(word_sum_call, 1e-12)

    def aggregated(norm: str, layer_set: str, range_set: str) -> np.ndarray:
        """(items, tokens, rows, columns) token maps on the finest grid."""
        keep_l = np.isin(groups, LAYER_SETS[layer_set])
        keep_t = np.isin(ranges, RANGE_SETS[range_set])
        source = per_call if norm == "words_per_call" else filled
        mean = source[:, :, keep_l][:, :, :, keep_t].mean(axis=(2, 3))
        if norm == "words":
            total = (mean * word_tokens[:, :, None, None]).sum(1, keepdims=True)
            mean = mean / np.maximum(total, 1e-12)
        return mean

    def word_maps(tokens: np.ndarray, chosen: dict[str, np.ndarray], mode: str) -> dict:
        """Image-size maps (items, size, size) of each target."""
        picked = {}
        for name in ("shape", "colour", "position"):
            picked[name] = np.stack([tokens[i, positions[i][name]].sum(0) for i in range(items)])
        picked["random_token"] = tokens[np.arange(items), random_token]
        out = {k: upsample(v, size, mode) for k, v in picked.items()}
        out["other_image"] = np.concatenate(
            [np.roll(out["shape"][idx], 1, axis=0) for idx in chosen.values()]
        )
        return out

    gaussian = np.broadcast_to(maths.centred_gaussian(size, size), masks.shape)
    sel, rep = halves["selection"], halves["report"]

    def score(values: np.ndarray, scale: str = "minmax") -> dict:
        """Threshold chosen on the selection half, mIoU of the report half at it and at 0.4."""
        curve = sweep(values[sel], masks[sel], scale)
        tau = float(TAUS[int(np.argmax(curve))])
        at_tau = per_item_iou(values[rep], masks[rep], tau, scale)
        at_04 = per_item_iou(values[rep], masks[rep], 0.4, scale)
        return {
            "tau": tau,
            "selection_mIoU@tau": float(curve.max()),
            "report_mIoU@tau": float(at_tau.mean()),
            "report_mIoU@0.4": float(at_04.mean()),
            "report_iou@tau": at_tau,
        }

    # ---------------------------------------------------------------- all configurations
    rows = []
    configs = [(n, ls, rs) for n in NORMS for ls in LAYER_SETS for rs in RANGE_SETS]
    gauss = score(gaussian)
    for number, (norm, layer_set, range_set) in enumerate(configs):
        tokens = aggregated(norm, layer_set, range_set)
        targets = word_maps(tokens, halves, "bilinear")
        result = {"norm": norm, "layers": layer_set, "timesteps": range_set}
        for name in ("shape", "colour", "random_token", "other_image"):
            result[name] = score(targets[name])
        x, y = maths.centre_of_mass(targets["position"])
        hits = shapes.quadrant_of(x, y) == factor["quadrant"]
        result["position_quadrant_report"] = float(hits[rep].mean())
        result["position_quadrant_selection"] = float(hits[sel].mean())
        rows.append(result)
        print(
            f"{number + 1}/{len(configs)} {norm:>14} {layer_set:>7} {range_set:>11}"
            f" shape {result['shape']['selection_mIoU@tau']:.3f}"
            f" random {result['random_token']['selection_mIoU@tau']:.3f}",
            file=sys.stderr,
            flush=True,
        )

    # the default: best shape-word mIoU on the selection half
    best = max(rows, key=lambda r: r["shape"]["selection_mIoU@tau"])
    chosen = (best["norm"], best["layers"], best["timesteps"])

    # ---------------------------------------------------------------- paired differences
    def paired(a: np.ndarray, b: np.ndarray) -> dict:
        diff = a - b
        return {
            "mean": float(diff.mean()),
            "ci95": float(1.96 * diff.std(ddof=1) / np.sqrt(len(diff))),
            "wins": float((diff > 0).mean()),
        }

    def differences(row: dict) -> dict:
        return {
            f"{word}-{base}": paired(row[word]["report_iou@tau"], baseline)
            for word in ("shape", "colour")
            for base, baseline in (
                ("gaussian", gauss["report_iou@tau"]),
                ("random_token", row["random_token"]["report_iou@tau"]),
                ("other_image", row["other_image"]["report_iou@tau"]),
            )
        }

    for row in rows:
        row["report_differences"] = differences(row)

    # ---------------------------------------------------------------- upsampling, scaling
    variants = []
    for norm in ("raw", chosen[0]):
        tokens = aggregated(norm, chosen[1], chosen[2])
        for mode in ("bilinear", "bicubic"):
            targets = word_maps(tokens, halves, mode)
            for scale in ("minmax", "max"):
                entry = {"norm": norm, "upsampling": mode, "scale": scale}
                for name in ("shape", "colour", "random_token"):
                    entry[name] = score(targets[name], scale)
                variants.append(entry)

    # ---------------------------------------------------------------- roles (report half)
    def role_table(norm: str, layer_set: str, range_set: str) -> dict:
        tokens = aggregated(norm, layer_set, range_set)
        table: dict[str, dict[str, list]] = {}
        for i in rep:
            shape_at = positions[i]["shape"][0]
            item_maps = upsample(tokens[i, : len(roles[i])], size, "bilinear")
            item_masks = np.broadcast_to(masks[i], item_maps.shape)
            ious = maths.iou(maths.normalise(item_maps) >= 0.4, item_masks)
            conc = concentration(item_maps, item_masks)
            mass = item_maps.mean((-2, -1))
            for j, role in enumerate(roles[i]):
                side = (
                    ""
                    if role in ("start", "end", "shape")
                    else (" (before shape)" if j < shape_at else " (after shape)")
                )
                for key in (role, role + side) if side else (role,):
                    entry = table.setdefault(key, {"iou": [], "concentration": [], "mass": []})
                    entry["iou"].append(float(ious[j]))
                    entry["concentration"].append(float(conc[j]))
                    entry["mass"].append(float(mass[j]))
        return {
            k: {
                "tokens": len(v["iou"]),
                "mIoU@0.4": float(np.mean(v["iou"])),
                "concentration_median": float(np.median(v["concentration"])),
                "mean_map_value": float(np.mean(v["mass"])),
            }
            for k, v in sorted(table.items())
        }

    role_tables = {
        "raw/all/all": role_table("raw", "all", "all"),
        "/".join(chosen): role_table(*chosen),
    }

    faithful_rep = faithful[rep]
    best_row = next(r for r in rows if (r["norm"], r["layers"], r["timesteps"]) == chosen)
    faithful_scores = {
        name: float(best_row[name]["report_iou@tau"][faithful_rep].mean())
        for name in ("shape", "colour", "random_token", "other_image")
    }
    faithful_scores["gaussian"] = float(gauss["report_iou@tau"][faithful_rep].mean())

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not k.startswith("report_iou")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    report = {
        "items": items,
        "selection_items": [0, half - 1],
        "report_items": [half, items - 1],
        "steps": meta["steps"],
        "guidance_scale": meta["guidance_scale"],
        "generation_seconds": meta["seconds"],
        "mask_mean_area": float(masks.mean()),
        "faithful_fraction_report": float(faithful_rep.mean()),
        "chosen_default": dict(zip(("norm", "layers", "timesteps"), chosen, strict=True)),
        "gaussian": strip(gauss),
        "rows": strip(rows),
        "upsampling_and_scale": strip(variants),
        "roles_report_half": role_tables,
        "faithful_report_half_mIoU@tau": faithful_scores,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"chosen on the selection half: {chosen}; gaussian {gauss['report_mIoU@tau']:.3f}")
    for row in rows:
        d = row["report_differences"]
        print(
            f"{row['norm']:>14} {row['layers']:>7} {row['timesteps']:>11} |"
            f" shape {row['shape']['report_mIoU@tau']:.3f} (t{row['shape']['tau']:.2f})"
            f" colour {row['colour']['report_mIoU@tau']:.3f}"
            f" random {row['random_token']['report_mIoU@tau']:.3f}"
            f" other {row['other_image']['report_mIoU@tau']:.3f} |"
            f" @0.4 {row['shape']['report_mIoU@0.4']:.3f} {row['colour']['report_mIoU@0.4']:.3f}"
            f" {row['random_token']['report_mIoU@0.4']:.3f} |"
            f" s-r {d['shape-random_token']['mean']:+.3f}±{d['shape-random_token']['ci95']:.3f}"
            f" quad {row['position_quadrant_report']:.2f}"
        )


if __name__ == "__main__":
    main()
