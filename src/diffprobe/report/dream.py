"""Figures of deep dreams: the grid of one target's dreams (one row per (timestep, seed), one
column per snapshot step) and the objective against step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffprobe.report.figures import new_figure, save_figure


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def dream_grid(
    rows: Sequence[tuple[str, Sequence[np.ndarray]]],
    columns: Sequence[str],
    title: str | None = None,
) -> Any:
    """A PIL image: ``rows`` of (label, uint8 (H, W, 3) images, one per column), columns
    labelled ``columns`` (e.g. "step 10"), small images upscaled (nearest) to stay legible."""
    from PIL import Image, ImageDraw

    height, width = rows[0][1][0].shape[:2]
    scale = max(1, int(np.ceil(96 / max(height, width))))
    cell_h, cell_w, gap = height * scale, width * scale, 4
    font = _font(12)
    header = 18 if title else 0
    top, left = header + 20, 86
    canvas = Image.new(
        "RGB", (left + len(columns) * (cell_w + gap), top + len(rows) * (cell_h + gap)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((3, 3), title, fill="black", font=font)
    for c, name in enumerate(columns):
        draw.text((left + c * (cell_w + gap) + 2, header + 3), name, fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        y = top + r * (cell_h + gap)
        draw.text((3, y + cell_h // 2 - 6), label, fill="black", font=font)
        for c, image in enumerate(images):
            tile = Image.fromarray(image)
            if scale > 1:
                tile = tile.resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (left + c * (cell_w + gap), y))
    return canvas


def plot_objective(
    curves: dict[str, np.ndarray], path: str | Path, *, ylabel: str, title: str
) -> Path:
    """One line per label of ``curves`` (label -> values per step) against step; PNG."""
    figure = new_figure(figsize=(5.5, 3.6), layout="constrained")
    axes = figure.subplots()
    from matplotlib import colormaps

    palette = colormaps["tab20" if len(curves) > 10 else "tab10"]
    for index, (label, values) in enumerate(curves.items()):
        axes.plot(np.arange(len(values)), values, color=palette(index % palette.N), label=label)
    axes.set_xlabel("optimisation step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if 1 < len(curves) <= 16:
        axes.legend(fontsize=7, ncol=2)
    return save_figure(figure, path)
