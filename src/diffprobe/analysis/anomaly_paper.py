"""The anomaly paper's own definitions (Loos & Linhardt, ICLR 2025 DeLTa;
``run_experiments.py`` of JonasLoos/sd-representation-anomalies), next to diffprobe's defaults in
:mod:`diffprobe.analysis.anomalies` (docs/anomalies.md lists every difference):

- **token groups** of an H x W map: ``corner`` (the 4 corner tokens), ``border`` (the other
  edge tokens), ``interior`` (:func:`token_groups`);
- **group similarity** ``S[g, g]``: the mean cosine similarity between two different tokens of
  group ``g`` of the same image, averaged over images (:func:`group_similarity`);
- **corner and border ratios** ``A[g, g] / B[g, g]``: A = the map of the image cropped by one
  token's pixel width per side and *not resized* (an (H-2) x (W-2) grid at a smaller image
  size, :func:`crop_without_resize`); B = the original map with its outer ring removed (the same
  content, now in the interior) (:func:`token_group_ratios`). diffprobe's default corner ratio
  resizes the crop back to the full size (a 2x zoom on a 4 x 4 map) and has no border ratio;
- **high-norm window**: a label (item, y, x) made on a grid of ``label_grid`` tokens (32 for SD
  at 512 px, ``up_blocks.1``) covers, on a site of H tokens, the window of side
  ``max(1, int(2 · H / label_grid))`` at (int(y · H / label_grid), int(x · H / label_grid))
  (:func:`label_window`);
- **rel_norm**: mean L2 norm in that window / mean L2 norm of the whole map, per label, at every
  site; mean and std over labels (:func:`rel_norm_at_labels`), the paper's third panel.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from diffprobe.analysis.anomalies import AnomalyError, _check_maps, _unit, inner_crop

GROUPS = ("corner", "border", "interior")


def token_groups(height: int, width: int) -> dict[str, np.ndarray]:
    """Boolean (H, W) masks of the corner, border and interior tokens."""
    if height < 3 or width < 3:
        raise AnomalyError(f"token groups need a grid of at least 3x3, got {height}x{width}")
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    edge_row = (rows == 0) | (rows == height - 1)
    edge_col = (cols == 0) | (cols == width - 1)
    corner = edge_row & edge_col
    return {"corner": corner, "border": (edge_row | edge_col) & ~corner,
            "interior": ~(edge_row | edge_col)}  # fmt: skip


def group_similarity(maps: np.ndarray) -> dict[str, float]:
    """``S[g, g]`` for every token group: the mean over images of the mean cosine similarity
    between different tokens of the group in the same image. ``maps`` (items, H, W, C)."""
    maps = _check_maps(maps)
    items, height, width, channels = maps.shape
    unit = _unit(maps).reshape(items, height * width, channels)
    out = {}
    for name, mask in token_groups(height, width).items():
        tokens = unit[:, mask.ravel()]
        n = tokens.shape[1]
        if n < 2:
            out[name] = float("nan")
            continue
        summed = tokens.sum(1)
        pair_sum = np.einsum("nc,nc->n", summed, summed) - np.einsum("nkc,nkc->n", tokens, tokens)
        out[name] = float((pair_sum / (n * (n - 1))).mean())
    return out


def crop_without_resize(images: np.ndarray, border: int | tuple[int, int]) -> np.ndarray:
    """Crop ``border`` pixels (rows, columns) from every side, keeping the smaller size, as the
    paper does: uint8 (items, H, W, 3) -> (items, H - 2·by, W - 2·bx, 3)."""
    return inner_crop(images, border, min_border=1).copy()


def token_group_ratios(cropped: np.ndarray, original: np.ndarray) -> dict[str, float]:
    """The paper's corner and border ratios of one site: ``A[g, g] / B[g, g]`` with A the maps
    (items, H-2, W-2, C) of the images cropped without resizing and B the original maps
    (items, H, W, C) with the outer ring removed. Returns ``corner_ratio``, ``border_ratio``
    and the similarities ``A_<group>``, ``B_<group>``."""
    cropped, original = _check_maps(cropped, "cropped maps"), _check_maps(original, "original maps")
    inner = original[:, 1:-1, 1:-1]
    if cropped.shape != inner.shape:
        raise AnomalyError(
            f"the cropped maps {cropped.shape} must have the shape of the original maps "
            f"{original.shape} without their outer ring {inner.shape}: crop the images by one "
            "token's pixel width per side without resizing"
        )
    a, b = group_similarity(cropped), group_similarity(inner)
    out = {f"{g}_ratio": a[g] / b[g] if b[g] else float("nan") for g in ("corner", "border")}
    return {**out, **{f"A_{g}": a[g] for g in GROUPS}, **{f"B_{g}": b[g] for g in GROUPS}}


def window_side(grid: int, label_grid: int = 32) -> int:
    """The paper's high-norm window side on a site of ``grid`` tokens: max(1, int(2·grid /
    label_grid)) (1 token on 16², 2 on 32², 4 on 64² for labels on a 32² grid)."""
    return max(1, int(2 * grid / label_grid))


def label_window(
    y: int, x: int, grid: tuple[int, int], label_grid: int = 32
) -> tuple[slice, slice]:
    """Rows and columns of a site's (H, W) map covered by the label whose upper-left token is
    (y, x) on the ``label_grid`` grid."""
    height, width = grid
    scale_y, scale_x = height / label_grid, width / label_grid
    side_y, side_x = window_side(height, label_grid), window_side(width, label_grid)
    y0, x0 = int(y * scale_y), int(x * scale_x)
    return slice(y0, y0 + side_y), slice(x0, x0 + side_x)


def rel_norm_at_labels(
    norms_by_site: Mapping[str, np.ndarray],
    labels: np.ndarray,
    label_grid: int = 32,
) -> list[dict]:
    """The paper's norm ratio at labelled positions across every site: for each site (norm maps
    (items, H, W)), rel_norm of every label (rows (item, y, x) on the ``label_grid`` grid) =
    mean norm in its window / mean norm of the whole map; rows ``site``, ``grid``, ``window``,
    ``labels``, ``rel_norm_mean``, ``rel_norm_std``."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1, 3)
    rows = []
    for site, norms in norms_by_site.items():
        norms = np.asarray(norms, dtype=np.float64)
        if norms.ndim != 3:
            raise AnomalyError(f"norm maps of {site} must be (items, H, W), got {norms.shape}")
        values = []
        for item, y, x in labels:
            if not 0 <= item < len(norms):
                raise AnomalyError(f"label image {item} is outside the {len(norms)} images")
            rows_, cols_ = label_window(int(y), int(x), norms.shape[1:], label_grid)
            window = norms[item, rows_, cols_]
            values.append(window.mean() / max(norms[item].mean(), 1e-12))
        values = np.asarray(values)
        rows.append({
            "site": site, "grid": f"{norms.shape[1]}x{norms.shape[2]}",
            "window": window_side(norms.shape[1], label_grid), "labels": len(values),
            "rel_norm_mean": float(values.mean()) if len(values) else float("nan"),
            "rel_norm_std": float(values.std()) if len(values) else float("nan"),
        })  # fmt: skip
    return rows
