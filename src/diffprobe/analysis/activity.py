"""Activity over denoising timesteps: pure functions on (items, timesteps, channels) arrays.

Definitions (docs/features.md):

- ``mean_activation[c, t]``, ``max_activation[c, t]``: over items of the stored activity (the
  spatial/token mean per item, or the spatial max with ``reduction="max"`` at capture).
- ``topk_frequency[c, t]`` (the thesis' "frequency in top-k"): the fraction of items (samples)
  for which channel ``c`` is among that item's ``k`` highest channels at timestep ``t``.
- ``profile``: one of those (C, T) tables linearly interpolated from the stored timesteps onto
  the integer grid ``0 .. grid_end`` (0 outside the stored range), as the thesis
  (``scipy.interpolate.interp1d(fill_value=0)``).
- ``active timesteps`` of a channel: the grid points where its profile exceeds ``threshold``.
- ``activity peaks``: ``scipy.signal.find_peaks(profile, height, distance, plateau_size=1)``,
  the ``top`` highest, sorted by height (highest first).
- ``top examples`` (what the thesis' README promises): per channel, the ``k`` items with the
  highest activity, overall (the mean over all timesteps), per window (the mean over the stored
  timesteps inside it) or per timestep.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check(activity: np.ndarray) -> np.ndarray:
    activity = np.asarray(activity)
    if activity.ndim != 3:
        raise ValueError(
            f"activity must be (items, timesteps, channels), got shape {activity.shape}"
        )
    return activity


def timestep_stats(activity: np.ndarray) -> dict[str, np.ndarray]:
    """``mean`` and ``max`` over items, each (channels, timesteps)."""
    activity = _check(activity)
    return {"mean": activity.mean(0).T, "max": activity.max(0).T}


def topk_frequency(activity: np.ndarray, k: int = 20) -> np.ndarray:
    """(channels, timesteps): the fraction of items for which the channel is among the item's
    ``k`` highest channels at that timestep (the thesis' ``count_in_top_k / generations``)."""
    activity = _check(activity)
    items, steps, channels = activity.shape
    k = min(k, channels)
    top = np.argpartition(-activity, k - 1, axis=2)[:, :, :k]  # (items, timesteps, k)
    counts = np.zeros((steps, channels), dtype=np.int64)
    for t in range(steps):
        counts[t] = np.bincount(top[:, t].reshape(-1), minlength=channels)
    return (counts / items).T


def window_mask(timesteps: Sequence[float], window: tuple[float, float] | None) -> np.ndarray:
    """Bool (timesteps,): the stored timesteps inside ``[low, high]`` (all when None)."""
    timesteps = np.asarray(timesteps, dtype=np.float64)
    if window is None:
        return np.ones(len(timesteps), dtype=bool)
    low, high = window
    return (timesteps >= low) & (timesteps <= high)


def window_score(
    activity: np.ndarray, timesteps: Sequence[float], window: tuple[float, float] | None = None
) -> np.ndarray:
    """(items, channels): the mean activity over the stored timesteps inside ``window``."""
    activity = _check(activity)
    mask = window_mask(timesteps, window)
    if not mask.any():
        raise ValueError(f"no stored timestep lies in the window {window}")
    return activity[:, mask].mean(1)


def top_examples(scores: np.ndarray, k: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values), each (channels, k): per channel the ``k`` items with the highest
    ``scores`` (items, channels), highest first; ties go to the lower item index."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (items, channels), got shape {scores.shape}")
    k = min(k, scores.shape[0])
    order = np.argsort(-scores, axis=0, kind="stable")[:k].T  # (channels, k)
    return order, np.take_along_axis(scores.T, order, axis=1)


def interpolate_profile(
    table: np.ndarray, timesteps: Sequence[float], grid_end: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """(grid, profile): ``table`` (channels, timesteps) linearly interpolated onto the integers
    ``0 .. grid_end``, 0 outside the stored timesteps' range."""
    table = np.asarray(table, dtype=np.float64)
    timesteps = np.asarray(timesteps, dtype=np.float64)
    order = np.argsort(timesteps)
    grid = np.arange(grid_end + 1)
    profile = np.stack(
        [np.interp(grid, timesteps[order], row[order], left=0.0, right=0.0) for row in table]
    )
    return grid, profile


def active_timesteps(
    profile: np.ndarray, grid: np.ndarray, threshold: float = 0.0
) -> list[np.ndarray]:
    """Per channel, the grid timesteps where its profile exceeds ``threshold``."""
    return [np.asarray(grid)[row > threshold] for row in np.asarray(profile)]


def activity_peaks(
    profile: np.ndarray,
    grid: np.ndarray,
    height: float = 0.0,
    distance: int = 100,
    top: int = 3,
) -> list[list[dict]]:
    """Per channel, its ``top`` highest peaks as ``{"timestep", "height"}``, highest first
    (``scipy.signal.find_peaks(height=, distance=, plateau_size=1)``, as the thesis)."""
    from scipy.signal import find_peaks

    grid = np.asarray(grid)
    found = []
    for row in np.asarray(profile):
        peaks, properties = find_peaks(row, height=height, distance=distance, plateau_size=1)
        heights = properties["peak_heights"]
        order = np.argsort(-heights, kind="stable")[:top]
        found.append(
            [{"timestep": int(grid[peaks[i]]), "height": float(heights[i])} for i in order]
        )
    return found


def selectivity_auc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC AUC per column of ``scores`` (items, channels) for separating ``labels`` True from
    False (Mann-Whitney U with mid-ranks for ties); 0.5 is chance."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("selectivity needs items with and without the label")
    ranks = rankdata(scores, axis=0)
    return (ranks[labels].sum(0) - positives * (positives + 1) / 2) / (positives * negatives)


def strength_schedule(
    max_activation: np.ndarray, timesteps: Sequence[float], scale: float = 50.0
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, strengths) of one channel's relative steering: ``scale`` × its maximum
    activation at each stored timestep (the thesis' ``max_activation[c, t] × 50``)."""
    timesteps = np.asarray(timesteps, dtype=np.float64)
    return timesteps, scale * np.asarray(max_activation, dtype=np.float64)


def nearest_steps(targets: Sequence[float], timesteps: Sequence[float]) -> list[float]:
    """For each target timestep (e.g. a peak on the integer grid), the nearest stored one."""
    timesteps = np.asarray(timesteps, dtype=np.float64)
    return sorted({float(timesteps[np.abs(timesteps - t).argmin()]) for t in targets})
