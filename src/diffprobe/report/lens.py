"""Figures of the Diffusion Lens: the grid of images (one column per layer, one row per
(prompt, seed)) and attribute emergence against layer."""

from __future__ import annotations

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


def lens_grid(
    images: np.ndarray,
    layers: list[int],
    seeds: list[int],
    by_prompt: bool,
    title: str | None = None,
) -> Any:
    from PIL import Image, ImageDraw

    prompts, _, _, height, width, _ = images.shape
    # labels stay readable on 32 px thumbnails: upscale small images (nearest neighbour)
    scale = max(1, int(np.ceil(96 / max(height, width))))
    cell_h, cell_w, gap = height * scale, width * scale, 4
    font = _font(12)
    header = 18 if title else 0
    top, left = header + 20, 64 if by_prompt else 48
    canvas = Image.new(
        "RGB",
        (left + len(layers) * (cell_w + gap), top + prompts * len(seeds) * (cell_h + gap)),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((3, 3), title, fill="black", font=font)
    for li, layer in enumerate(layers):
        draw.text((left + li * (cell_w + gap) + 2, header + 3), f"layer {layer}", fill="black",
                  font=font)  # fmt: skip
    for p in range(prompts):
        for si, seed in enumerate(seeds):
            row = p * len(seeds) + si
            y = top + row * (cell_h + gap)
            label = f"p{p} s{seed}" if by_prompt else f"seed {seed}"
            draw.text((3, y + cell_h // 2 - 6), label, fill="black", font=font)
            for li in range(len(layers)):
                tile = Image.fromarray(images[p, li, si])
                if scale > 1:
                    tile = tile.resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(tile, (left + li * (cell_w + gap), y))
    return canvas


def plot_emergence(result: Any, path: str | Path, title: str | None = None) -> Path:
    """Accuracy against layer, one line per attribute, dashed chance levels; PNG at ``path``."""
    figure = new_figure(figsize=(5.5, 3.6), layout="constrained")
    axes = figure.subplots()
    for index, (name, values) in enumerate(result.accuracy.items()):
        colour = f"C{index}"
        axes.plot(result.layers, values, marker="o", color=colour, label=name)
        axes.axhline(result.chance[name], color=colour, linestyle=":", linewidth=1)
    axes.set_xlabel("text-encoder layer (0 = token embeddings)")
    axes.set_ylabel("attribute accuracy")
    axes.set_xticks(result.layers)
    axes.set_ylim(0, 1.02)
    axes.set_title(title or f"Diffusion Lens: attribute emergence ({result.items} images)")
    axes.legend(title="dotted: chance", fontsize=8)
    return save_figure(figure, path)
