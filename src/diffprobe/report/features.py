"""Figures of activity over timesteps: a channel's profile (timestep axis reversed, as the thesis:
denoising runs from left to right), the channels × timesteps overview heatmap, and a grid of a
channel's top examples."""

from __future__ import annotations

from typing import Any

import numpy as np

from diffprobe.report.figures import colorbar, new_figure


def profile_figure(
    grid: np.ndarray,
    profile: np.ndarray,
    timesteps: np.ndarray,
    values: np.ndarray,
    peaks: list[dict],
    *,
    site: str,
    channel: int,
    measure: str,
    max_activation: np.ndarray | None = None,
) -> Any:
    """One channel: its interpolated ``profile`` over ``grid`` (the stored ``values`` at
    ``timesteps`` as dots), the peaks marked, and the max activation on a second axis."""
    figure = new_figure(figsize=(7, 3.2))
    ax = figure.add_subplot(1, 1, 1)
    ax.plot(grid, profile, color="tab:blue", lw=1.2, label=measure)
    ax.scatter(timesteps, values, color="tab:blue", s=10, zorder=3)
    for number, peak in enumerate(peaks):
        ax.axvline(peak["timestep"], color="tab:red", ls="--", lw=0.8)
        ax.annotate(f"peak {number + 1}: t={peak['timestep']}", (peak["timestep"], peak["height"]),
                    fontsize=7, color="tab:red", xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlim(grid[-1], grid[0])  # reversed: noisy (high t) on the left, as generation runs
    ax.set_xlabel("timestep (denoising runs left to right)")
    ax.set_ylabel(measure)
    if max_activation is not None:
        twin = ax.twinx()
        twin.plot(timesteps, max_activation, color="tab:orange", lw=1, ls=":")
        twin.set_ylabel("max activation", color="tab:orange")
    ax.set_title(f"{site} channel {channel}", fontsize=10)
    return figure


def heatmap_figure(
    table: np.ndarray, timesteps: np.ndarray, *, site: str, measure: str, channels: Any = None
) -> Any:
    """Channels (rows) × stored timesteps (columns, high t on the left) of ``table``."""
    table = np.asarray(table)
    order = np.argsort(-np.asarray(timesteps))
    height = min(12, 2 + table.shape[0] * 0.04)
    figure = new_figure(figsize=(7, height))
    ax = figure.add_subplot(1, 1, 1)
    image = ax.imshow(table[:, order], aspect="auto", interpolation="nearest", cmap="viridis")
    ticks = np.linspace(0, len(order) - 1, min(len(order), 8)).round().astype(int)
    ax.set_xticks(ticks, [f"{np.asarray(timesteps)[order][i]:g}" for i in ticks], fontsize=7)
    ax.set_xlabel("timestep (denoising runs left to right)")
    ax.set_ylabel("channel")
    ax.set_title(f"{site}: {measure} per channel and timestep", fontsize=10)
    colorbar(figure, image, ax, measure)
    return figure


def examples_figure(images: np.ndarray, captions: list[str], *, title: str) -> Any:
    """A row of top examples, each with its caption (prompt, seed, value)."""
    count = len(images)
    columns = min(count, 5)
    rows = -(-count // columns)
    figure = new_figure(figsize=(2.1 * columns, 2.3 * rows + 0.4))
    for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
        ax = figure.add_subplot(rows, columns, index + 1)
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=6)
        ax.axis("off")
    figure.suptitle(title, fontsize=9)
    return figure
