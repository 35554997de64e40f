"""Saving matplotlib figures: the Agg backend (no display needed), PNG through the atomic
writer, and a few shared conventions (colour bars always labelled)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffprobe.io import atomic_path


def new_figure(**kwargs: Any):
    """A matplotlib ``Figure`` not attached to pyplot (nothing global, nothing to close)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure(figure: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Write ``figure`` as a PNG at ``path`` (atomically, tight bounding box); returns the path."""
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi, bbox_inches="tight")
    return path


def colorbar(figure: Any, mappable: Any, ax: Any, label: str, **kwargs: Any) -> Any:
    """A colour bar that says what its colours measure (``label``, with units if any)."""
    bar = figure.colorbar(mappable, ax=ax, **kwargs)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar
