"""Token weightings for attribution on `tiny`: can any principled map make the shape word lead
the random token? (issue 22; ``docs/attribution.md``, "Token weightings").

Reads the cache of ``benchmarks/attribution_tiny_weighting_generate.py`` (the same 256 images
as ``benchmarks/attribution_tiny.py``; every text position's maps under several weightings)
and scores each method exactly as ``attribution_tiny.py`` does: the reader's foreground as the
mask, min-max normalisation, bilinear upsampling, the threshold of every method and baseline
chosen on items 0-127 (selection half) and mIoU reported on items 128-255 (report half); the
random token drawn as there (numpy ``default_rng(0)``, per item in order, uniform over the
prompt's non-special tokens other than the shape and colour words; start, end and padding
never drawn); paired differences with 95 % intervals (1.96 standard errors).

Methods (token maps, each then aggregated as the mean over the chosen sites and calls):

- ``raw``: attention probabilities, mean over heads (the library's map);
- ``raw_content_share``: per call, each pixel's probabilities over the prompt's content tokens
  (start, end and padding out) sum to 1;
- ``value_norm``: ‖Σ_h P_h W_o,h v_h,t‖ (Kobayashi et al. 2020); ``value_norm_heads``:
  Σ_h P_h ‖W_o,h v_h,t‖; ``value_norm_share`` / ``value_norm_content_share``: per call the
  share of each pixel's value-norm over all 16 positions / over content tokens;
- ``output_dot`` / ``output_dot_projected``: the image token's attention output dotted with
  the token's value (heads / after to_out); ``..._softmax``: softmax over the prompt's content
  tokens per pixel and call (ConceptAttention's softmax over concepts);
- causal corrections, on ``raw`` and ``value_norm``: ``minus_previous`` (token t's map minus
  token t-1's), ``residual`` (token t's map minus its least-squares prediction from the maps
  of every token before it, with intercept), ``deconvolve`` (the maps of input tokens that,
  mixed by the text encoder's attention rollout R, give the captured maps: M_in = R⁻¹ M_out;
  rollout: per layer 0.5·A + 0.5·I, A the causal self-attention, mean over heads, Abnar &
  Zuidema 2020; R is lower-triangular, so this subtracts what the preceding tokens predict),
  ``rollout`` (M_in = Rᵀ M_out: each input token collects the maps of the positions that read
  it); ``rollout_prompt``: the same over the prompt's positions only (start .. end; padding
  positions' maps left out), as ``diffprobe attribution --weighting rollout`` computes it;
  ``rollout_prompt_share`` / ``rollout_prompt_words``: then each pixel's share over the
  prompt's tokens / over its word tokens (start and end out; DAAM's ``normalize=True``), so
  that a token that more of the attended positions draw from gets more of the pixel
  (negative values, which only the output-space scores have, count as 0); and
  ``rollout_prompt`` / ``rollout_prompt_words`` on ``output_dot`` and ``output_dot_projected``
  (the last: the library's ``output-rollout-words``).

    PYTHONPATH=src python benchmarks/attribution_tiny_weighting.py \
        [--cache benchmarks/out/attribution_tiny_weighting.npz] \
        [--out benchmarks/results/attribution_tiny_weighting.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution_tiny import TAUS, per_item_iou, role_of, sweep, upsample  # noqa: E402

from diffprobe.analysis import attribution as maths  # noqa: E402
from diffprobe.data import shapes  # noqa: E402
from diffprobe.data.attributes import foreground_masks  # noqa: E402

LAYER_SETS = {"down+up": ("down", "up"), "all": ("down", "mid", "up")}
RANGE_SETS = {
    "all": ("early", "middle", "late"),
    "late": ("late",),
    "middle+late": ("middle", "late"),
}
BASE_METHODS = (
    "raw",
    "raw_content_share",
    "value_norm",
    "value_norm_heads",
    "value_norm_share",
    "value_norm_content_share",
    "output_dot",
    "output_dot_softmax",
    "output_dot_projected",
    "output_dot_projected_softmax",
)
CAUSAL = (
    "minus_previous",
    "residual",
    "deconvolve",
    "rollout",
    "rollout_prompt",
    "rollout_prompt_share",
    "rollout_prompt_words",
)
METHODS = (
    BASE_METHODS
    + tuple(f"{b}+{c}" for b in ("raw", "value_norm") for c in CAUSAL)
    + tuple(
        f"{b}+{c}"
        for b in ("output_dot", "output_dot_projected")
        for c in ("rollout_prompt", "rollout_prompt_words")
    )
)


def rollout(attention: np.ndarray) -> np.ndarray:
    """(layers, T, T) causal self-attention (rows: queries) -> (T, T) rollout R, R[j, t]:
    how much output position j draws from input token t."""
    size = attention.shape[-1]
    result = np.eye(size)
    for layer in attention:
        mixed = 0.5 * layer + 0.5 * np.eye(size)
        mixed = mixed / mixed.sum(-1, keepdims=True)
        result = mixed @ result
    return result


def causal(maps: np.ndarray, kind: str, length: int, encoder: np.ndarray) -> np.ndarray:
    """A causal correction of one item's aggregated maps (T, r, c), tokens < ``length`` the
    prompt's (start .. end), the rest padding (used by deconvolve/rollout only)."""
    flat = maps.reshape(maps.shape[0], -1).astype(np.float64)
    out = flat.copy()
    if kind == "minus_previous":
        out[1:] = flat[1:] - flat[:-1]
    elif kind == "residual":
        for t in range(1, length):
            design = np.concatenate([flat[:t], np.ones((1, flat.shape[1]))]).T
            coef, *_ = np.linalg.lstsq(design, flat[t], rcond=None)
            out[t] = flat[t] - design @ coef
    elif kind == "deconvolve":
        out = np.linalg.solve(rollout(encoder), flat)
    elif kind == "rollout":
        out = rollout(encoder).T @ flat
    elif kind.startswith("rollout_prompt"):  # the prompt's positions (start .. end) only
        out = np.zeros_like(flat)
        out[:length] = rollout(encoder)[:length, :length].T @ flat[:length]
        if kind == "rollout_prompt_share":  # each pixel's share over the prompt's tokens
            out[:length] /= np.maximum(out[:length].sum(0, keepdims=True), 1e-12)
        elif kind == "rollout_prompt_words":  # ... over its word tokens (start, end out)
            out[:length] = np.clip(out[:length], 0, None)  # signed scores: negatives count 0
            out[:length] /= np.maximum(out[1 : length - 1].sum(0, keepdims=True), 1e-12)
    return out.reshape(maps.shape)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default="benchmarks/out/attribution_tiny_weighting.npz")
    parser.add_argument("--out", default="benchmarks/results/attribution_tiny_weighting.json")
    parser.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    args = parser.parse_args()
    methods = METHODS if not args.methods else tuple(args.methods.split(","))
    torch.set_num_threads(1)
    data = np.load(args.cache, allow_pickle=False)
    meta = json.loads(str(data["meta"]))
    images = data["images"]
    items, size = images.shape[0], images.shape[1]
    masks = foreground_masks(images)
    factor = {k.removeprefix("factor_"): data[k] for k in data.files if k.startswith("factor_")}
    encoder = data["encoder_attention"].astype(np.float64)
    groups = np.array([maths.layer_group(s) for s in meta["sites"]])
    ranges = np.array([maths.timestep_range(p) for p in meta["noise_levels"]])
    positions_max = meta["text_positions"]

    # token bookkeeping, exactly as benchmarks/attribution_tiny.py (same random draw)
    rng = np.random.default_rng(0)
    random_token = np.zeros(items, dtype=int)
    shape_at, colour_at, position_at = [], [], []
    lengths = np.zeros(items, dtype=int)
    content = np.zeros((items, positions_max), dtype=bool)
    random_side = []
    for i in range(items):
        shape = shapes.SHAPES[factor["shape"][i]]
        colour = shapes.COLOUR_NAMES[factor["colour"][i]]
        pieces, special = meta["pieces"][i], meta["special"][i]
        roles = [
            role_of(p, s, j == 0, shape, colour)
            for j, (p, s) in enumerate(zip(pieces, special, strict=True))
        ]
        lengths[i] = len(pieces)
        content[i, : len(pieces)] = ~np.array(special)
        shape_at.append([j for j, r in enumerate(roles) if r == "shape"])
        colour_at.append([j for j, r in enumerate(roles) if r == "colour"])
        position_at.append([j for j, r in enumerate(roles) if r == "position"])
        others = [j for j, r in enumerate(roles) if r not in ("start", "end", "shape", "colour")]
        random_token[i] = rng.choice(others)
        random_side.append("after" if random_token[i] > shape_at[-1][0] else "before")
    random_side = np.array(random_side)

    half = items // 2
    sel, rep = np.arange(half), np.arange(half, items)
    gaussian = np.broadcast_to(maths.centred_gaussian(size, size), masks.shape)

    def score(values: np.ndarray) -> dict:
        curve = sweep(values[sel], masks[sel], "minmax")
        tau = float(TAUS[int(np.argmax(curve))])
        at_tau = per_item_iou(values[rep], masks[rep], tau, "minmax")
        at_04 = per_item_iou(values[rep], masks[rep], 0.4, "minmax")
        sel_at = per_item_iou(values[sel], masks[sel], tau, "minmax")
        return {
            "tau": tau,
            "selection_mIoU@tau": float(curve.max()),
            "report_mIoU@tau": float(at_tau.mean()),
            "report_mIoU@0.4": float(at_04.mean()),
            "selection_iou@tau": sel_at,
            "report_iou@tau": at_tau,
            "report_iou@0.4": at_04,
        }

    def paired(a: np.ndarray, b: np.ndarray) -> dict:
        diff = a - b
        return {
            "mean": float(diff.mean()),
            "ci95": float(1.96 * diff.std(ddof=1) / np.sqrt(len(diff))),
            "wins": float((diff > 0).mean()),
        }

    gauss = score(gaussian)

    def load(kind: str, keep_l: np.ndarray) -> np.ndarray:
        return data[kind][:, :, keep_l].astype(np.float32)

    cache: dict = {}

    def token_maps(method: str, layer_set: str, range_set: str) -> np.ndarray:
        """(items, T, rows, columns) aggregated token maps of ``method``."""
        keep_l = np.isin(groups, LAYER_SETS[layer_set])
        keep_t = np.isin(ranges, RANGE_SETS[range_set])
        base, _, correction = method.partition("+")
        source = {
            "raw": "raw",
            "raw_content_share": "raw",
            "value_norm": "value_norm",
            "value_norm_heads": "value_norm_heads",
            "value_norm_share": "value_norm",
            "value_norm_content_share": "value_norm",
            "output_dot": "output_dot",
            "output_dot_softmax": "output_dot",
            "output_dot_projected": "output_dot_projected",
            "output_dot_projected_softmax": "output_dot_projected",
        }[base]
        key = (source, layer_set)
        if key not in cache:
            cache.clear()
            cache[key] = load(source, keep_l)
        values = cache[key][:, :, :, keep_t]  # (items, T, layers, steps, r, c)
        mask = content[:, :, None, None, None, None]
        if base.endswith("content_share"):
            values = np.where(mask, values, 0.0)
            values = values / np.maximum(values.sum(1, keepdims=True), 1e-12)
        elif base == "value_norm_share":
            values = values / np.maximum(values.sum(1, keepdims=True), 1e-12)
        elif base.endswith("softmax"):
            logits = np.where(mask, values, -np.inf)
            logits = logits - logits.max(1, keepdims=True)
            values = np.exp(logits)
            values = values / values.sum(1, keepdims=True)
        maps = values.mean(axis=(2, 3))
        if correction:
            maps = np.stack(
                [causal(maps[i], correction, lengths[i], encoder[i]) for i in range(items)]
            )
        return maps

    def targets(maps: np.ndarray) -> dict[str, np.ndarray]:
        picked = {
            "shape": np.stack([maps[i, shape_at[i]].sum(0) for i in range(items)]),
            "colour": np.stack([maps[i, colour_at[i]].sum(0) for i in range(items)]),
            "random_token": maps[np.arange(items), random_token],
        }
        out = {k: upsample(v, size, "bilinear") for k, v in picked.items()}
        out["other_image"] = np.concatenate(
            [np.roll(out["shape"][idx], 1, axis=0) for idx in (sel, rep)]
        )
        return out

    rows = []
    configs = [(m, ls, rs) for m in methods for ls in LAYER_SETS for rs in RANGE_SETS]
    for number, (method, layer_set, range_set) in enumerate(configs):
        maps_now = token_maps(method, layer_set, range_set)
        found = targets(maps_now)
        row = {"method": method, "layers": layer_set, "timesteps": range_set}
        for name, values in found.items():
            row[name] = score(values)
        s, r = row["shape"], row["random_token"]
        row["selection_shape-random_token"] = paired(s["selection_iou@tau"], r["selection_iou@tau"])
        row["report_differences"] = {
            f"{word}-{base}": paired(row[word]["report_iou@tau"], baseline)
            for word in ("shape", "colour")
            for base, baseline in (
                ("gaussian", gauss["report_iou@tau"]),
                ("random_token", row["random_token"]["report_iou@tau"]),
                ("other_image", row["other_image"]["report_iou@tau"]),
            )
        }
        row["report_differences@0.4"] = {
            "shape-random_token": paired(s["report_iou@0.4"], r["report_iou@0.4"]),
            "shape-gaussian": paired(s["report_iou@0.4"], gauss["report_iou@0.4"]),
        }
        # the random token split by its side of the shape word (report half, at its tau)
        side = random_side[rep]
        row["random_token_report_by_side"] = {
            k: float(r["report_iou@tau"][side == k].mean()) for k in ("before", "after")
        }
        position = np.stack([maps_now[i, position_at[i]].sum(0) for i in range(items)])
        x, y = maths.centre_of_mass(np.clip(upsample(position, size, "bilinear"), 0, None))
        row["position_quadrant_report"] = float(
            (shapes.quadrant_of(x, y) == factor["quadrant"])[rep].mean()
        )
        rows.append(row)
        d = row["report_differences"]["shape-random_token"]
        print(
            f"{number + 1}/{len(configs)} {method:>30} {layer_set:>7} {range_set:>11} |"
            f" sel shape {s['selection_mIoU@tau']:.3f} rnd {r['selection_mIoU@tau']:.3f}"
            f" lead {row['selection_shape-random_token']['mean']:+.3f} |"
            f" rep shape {s['report_mIoU@tau']:.3f} rnd {r['report_mIoU@tau']:.3f}"
            f" colour {row['colour']['report_mIoU@tau']:.3f}"
            f" s-r {d['mean']:+.3f}±{d['ci95']:.3f}",
            file=sys.stderr,
            flush=True,
        )

    # the library's functions (diffprobe attribution --weighting rollout / rollout-words /
    # output-rollout-words) give
    # these benchmark's own rollout_prompt / rollout_prompt_words maps
    parity = 0.0
    plain = token_maps("raw", "down+up", "all")
    for name, weighting in (
        ("rollout_prompt", "rollout"),
        ("rollout_prompt_words", "rollout-words"),
    ):
        ours = token_maps(f"raw+{name}", "down+up", "all")
        for i in range(items):
            n = lengths[i]
            lib = maths.rollout_maps(plain[i, :n], maths.attention_rollout(encoder[i])[:n, :n])
            if weighting.endswith("rollout-words"):
                lib = maths.word_share(lib, content[i, :n])
            scale = np.abs(ours[i, :n]).max()
            parity = max(parity, float(np.abs(lib - ours[i, :n]).max() / scale))

    # per method, the aggregation with the largest shape-word lead on the selection half
    chosen = {}
    for method in methods:
        candidates = [r for r in rows if r["method"] == method]
        best = max(candidates, key=lambda r: r["selection_shape-random_token"]["mean"])
        chosen[method] = {"layers": best["layers"], "timesteps": best["timesteps"]}
    overall = max(
        (
            r
            for r in rows
            if chosen[r["method"]] == {"layers": r["layers"], "timesteps": r["timesteps"]}
        ),
        key=lambda r: r["selection_shape-random_token"]["mean"],
    )

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if "_iou@" not in k}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    report = {
        "items": items,
        "selection_items": [0, half - 1],
        "report_items": [half, items - 1],
        "steps": meta["steps"],
        "guidance_scale": meta["guidance_scale"],
        "max_raw_parity_error": meta["max_raw_parity_error"],
        "library_rollout_max_relative_difference": parity,
        "random_token_rule": (
            "numpy default_rng(0), per item in order: uniform over the prompt's non-special "
            "tokens other than the shape and colour words (start, end, padding never drawn)"
        ),
        "random_token_after_shape_fraction_report": float((random_side[rep] == "after").mean()),
        "gaussian": strip(gauss),
        "chosen_aggregation_per_method": chosen,
        "best_on_selection": {
            "method": overall["method"],
            "layers": overall["layers"],
            "timesteps": overall["timesteps"],
        },
        "rows": strip(rows),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"gaussian {gauss['report_mIoU@tau']:.3f}; best on selection: {report['best_on_selection']}"
    )
    for row in rows:
        if chosen[row["method"]] != {"layers": row["layers"], "timesteps": row["timesteps"]}:
            continue
        d = row["report_differences"]
        print(
            f"{row['method']:>30} {row['layers']:>7} {row['timesteps']:>11} |"
            f" shape {row['shape']['report_mIoU@tau']:.3f}/{row['shape']['report_mIoU@0.4']:.3f}"
            f" colour {row['colour']['report_mIoU@tau']:.3f}"
            f" random {row['random_token']['report_mIoU@tau']:.3f}"
            f"/{row['random_token']['report_mIoU@0.4']:.3f}"
            f" other {row['other_image']['report_mIoU@tau']:.3f} |"
            f" s-r {d['shape-random_token']['mean']:+.3f}±{d['shape-random_token']['ci95']:.3f}"
            f" s-g {d['shape-gaussian']['mean']:+.3f}±{d['shape-gaussian']['ci95']:.3f}"
        )


if __name__ == "__main__":
    main()
