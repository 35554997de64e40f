"""Plots of h-space edits: edit grids (rows images, columns strengths) and metric-vs-strength
curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from diffprobe.io import atomic_path

__all__ = ["edit_grid", "metric_curves"]


def edit_grid(images: np.ndarray, columns: Sequence[str], path: str | Path,
              title: str = "") -> Path:  # fmt: skip
    """uint8 (rows, columns, H, W, 3) -> a labelled PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = images.shape[:2]
    figure, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.4),
                                squeeze=False)  # fmt: skip
    for r in range(rows):
        for c in range(cols):
            axes[r, c].imshow(images[r, c])
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(columns[c], fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return Path(path)


def metric_curves(strengths: np.ndarray, metrics: Mapping[str, Sequence[float]],
                  path: str | Path, title: str = "") -> Path:  # fmt: skip
    """One line per metric against the edit strength α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for name, values in metrics.items():
        axis.plot(strengths, values, marker="o", label=name)
    axis.set_xlabel("edit strength α")
    axis.set_ylabel("metric value")
    axis.set_title(title)
    axis.axhline(0, color="grey", lw=0.5)
    axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return Path(path)
