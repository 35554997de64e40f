"""The anomaly paper's measurements on a run (``diffprobe anomalies RUN --paper``): corner and
border ratios with the cropped images *not resized* (extracted at the smaller size by the same
engine, same grid, seed and conditions), and rel_norm at labelled positions across every site
(:mod:`diffprobe.analysis.anomaly_paper`; docs/anomalies.md)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from diffprobe.analysis.anomalies import norm_maps, to_grid, token_border
from diffprobe.analysis.anomaly_paper import crop_without_resize, rel_norm_at_labels
from diffprobe.analysis.anomaly_paper import token_group_ratios as group_ratios
from diffprobe.errors import DiffprobeError
from diffprobe.stages.crops import extract_crops_of, run_plan

log = logging.getLogger(__name__)

PAPER_DEFINITIONS = {
    "token_group_ratio": "A[g,g] / B[g,g] for g = corner (4 corner tokens) and border (the other "
    "edge tokens): S[g,g] = mean over images of the mean cosine similarity between different "
    "tokens of group g; A = maps of the images cropped by one token's pixel width per side, NOT "
    "resized (extracted at image_size - 2 * border px: an (H-2) x (W-2) grid); B = the original "
    "maps without their outer ring (Loos & Linhardt, run_token_group_similarities)",
    "rel_norm": "mean L2 norm over the window of a label / mean L2 norm of the whole map; a label "
    "(item, y, x) on a label_grid grid covers the window of side max(1, int(2 * H / label_grid)) "
    "at (int(y * H / label_grid), int(x * H / label_grid)) of a site of H tokens; mean and std "
    "over labels, at every site (Loos & Linhardt, run_anomaly_analysis)",
}


def token_group_ratios(
    run: Any,
    model: Any,
    out: str | Path,
    sites: Sequence[str],
    noises: Sequence[str],
    conditions: Sequence[str],
    grids: dict[str, tuple[int, int]],
    images: np.ndarray,
    *,
    grid: Any = None,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict]:
    """Rows (site, noise, condition, grid, crop_px, corner_ratio, border_ratio, A_*, B_*) of the
    paper's ratios; a site whose cropped size the model refuses gets NaN ratios and the reason
    (``note``)."""
    size = int(run.info["image_size"])
    by_border: dict[tuple[int, int], list[str]] = {}
    for site in sites:
        by_border.setdefault(token_border(size, grids[site]), []).append(site)
    rows = []
    for border, group in by_border.items():
        crop = (size - 2 * border[0], size - 2 * border[1])
        note, cropped_run = "", None
        small = min(min(grids[site]) for site in group)
        if small < 5:
            note = (f"a {small}-token grid cropped by one token per side leaves {small - 2} "
                    "tokens, too few for corner and border groups (at least 3)")  # fmt: skip
        elif crop[0] != crop[1]:
            note = f"a non-square crop {crop[0]}x{crop[1]} px"
        else:
            try:
                model.check_size(crop[0])
            except DiffprobeError as err:
                note = f"not measurable: {err}"
        if not note:
            cropped_run = extract_crops_of(
                model, run, crop_without_resize(images, border),
                f"{run.root} cropped by {border[0]}x{border[1]} px per side, not resized "
                "(diffprobe anomalies --paper)",
                replace(run_plan(run, group), image_size=crop[0]),
                Path(out) / f"cropped-paper-{border[0]}x{border[1]}px",
                batch_size=batch_size, progress=progress,
            )  # fmt: skip
        else:
            log.warning("token-group ratios of %s: %s", ", ".join(group), note)
        for site in group:
            for noise in noises:
                for condition in conditions:
                    base = {"site": site, "noise": noise, "condition": condition,
                            "grid": f"{grids[site][0]}x{grids[site][1]}",
                            "crop_px": f"{border[0]}x{border[1]}"}  # fmt: skip
                    if cropped_run is None:
                        rows.append({**base, "corner_ratio": float("nan"),
                                     "border_ratio": float("nan"), "note": note})  # fmt: skip
                        continue
                    original = to_grid(run.get(site, noise, condition), grid)
                    cropped = to_grid(cropped_run.get(site, noise, condition), grid)
                    rows.append({**base, **group_ratios(cropped, original), "note": ""})
    return rows


def rel_norm_rows(
    run: Any,
    sites: Sequence[str],
    noises: Sequence[str],
    conditions: Sequence[str],
    labels: dict[str, np.ndarray],
    label_grid: int,
    *,
    grid: Any = None,
) -> list[dict]:
    """rel_norm at every label, at every site (rows per noise, condition and site)."""
    points = np.stack([labels["item"], labels["y"], labels["x"]], 1)
    rows = []
    for noise in noises:
        for condition in conditions:
            norms = {site: norm_maps(to_grid(run.get(site, noise, condition), grid))
                     for site in sites}  # fmt: skip
            for row in rel_norm_at_labels(norms, points, label_grid):
                rows.append({"noise": noise, "condition": condition, **row,
                             "label_grid": label_grid})  # fmt: skip
    return rows
