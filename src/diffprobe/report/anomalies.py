"""Figures of the anomaly measurements (:mod:`diffprobe.analysis.anomalies`): position-probe
accuracy by site, corner ratios, token-norm overlays with detections, similarity maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffprobe.report.figures import colorbar, new_figure, save_figure


def _short(site: str) -> str:
    return site.removeprefix("unet.").removeprefix("transformer.")


def plot_probe_accuracy(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Probe accuracy by site: one panel per axis, one line per binning, chance dotted."""
    sites = list(dict.fromkeys(r["site"] for r in rows))
    labels = list(dict.fromkeys(r["binning"] for r in rows))
    labels = sorted(labels, key=lambda b: (b == "exact", int(b) if b != "exact" else 0))
    figure = new_figure(figsize=(max(5.0, 1.1 * len(sites) + 2), 3.4))
    axes = figure.subplots(1, 2, sharey=True)
    for ax, axis in zip(axes, ("row", "col"), strict=True):
        for k, label in enumerate(labels):
            colour = f"C{k}"
            picked = {r["site"]: r for r in rows if r["axis"] == axis and r["binning"] == label}
            xs = [i for i, s in enumerate(sites) if s in picked]
            ax.plot(xs, [picked[sites[i]]["accuracy"] for i in xs], "o-", color=colour, label=label)
            ax.plot(xs, [picked[sites[i]]["chance"] for i in xs], ":", color=colour)
        ax.set_xticks(
            range(len(sites)), [_short(s) for s in sites], rotation=45, ha="right", fontsize=7
        )
        ax.set_title(f"{axis} probe", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (dotted: chance)")
    axes[1].legend(title="bins", fontsize=7, title_fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    return save_figure(figure, path, dpi=110)


def plot_corner_ratio(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Corner ratio by site (log2 axis; 1 = no corner artifact)."""
    figure = new_figure(figsize=(max(4.0, 0.8 * len(rows) + 2), 3.2))
    ax = figure.subplots()
    from matplotlib.ticker import ScalarFormatter

    ratios = [r["ratio"] for r in rows]
    # bars start at 1 (no artifact), so ratios below 1 point down
    ax.bar(
        range(len(rows)),
        [v - 1 for v in ratios],
        bottom=1.0,
        color=["C3" if v > 1 else "C0" for v in ratios],
    )
    for i, v in enumerate(ratios):
        ax.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom" if v > 1 else "top", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    if all(v > 0 for v in ratios):
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        low, high = min(ratios + [1.0]), max(ratios + [1.0])
        ax.set_ylim(low / 1.25, high * 1.25)
    ax.set_xticks(
        range(len(rows)), [_short(r["site"]) for r in rows], rotation=45, ha="right", fontsize=7
    )
    ax.set_ylabel("corner ratio (cropped / inner)")
    ax.set_title(title or "corner artifacts", fontsize=9)
    return save_figure(figure, path, dpi=110)


def plot_norm_overlays(
    images: np.ndarray | None,
    norms: dict[str, np.ndarray],
    detections: dict[str, dict],
    path: str | Path,
    items: Sequence[int] = (0, 1, 2, 3),
    group: int = 2,
    title: str = "",
) -> Path:
    """Norm maps over the images (rows: sites, columns: items); detected groups boxed."""
    from matplotlib.patches import Rectangle

    sites = list(norms)
    items = [i for i in items if i < len(next(iter(norms.values())))]
    figure = new_figure(figsize=(1.6 * len(items) + 1.4, 1.6 * len(sites) + 0.5),
                        layout="constrained")  # fmt: skip
    axes = np.atleast_2d(figure.subplots(len(sites), len(items), squeeze=False))
    for r, site in enumerate(sites):
        height, width = norms[site].shape[1:]
        # one colour scale per site (row), over the images shown, so the items compare
        scale = {"vmin": float(norms[site][items].min()), "vmax": float(norms[site][items].max())}
        shown = None
        for c, item in enumerate(items):
            ax = axes[r, c]
            extent = (-0.5, width - 0.5, height - 0.5, -0.5)
            if images is not None:
                ax.imshow(images[item], extent=extent)
                shown = ax.imshow(norms[site][item], cmap="magma", alpha=0.6, extent=extent,
                                  interpolation="nearest", **scale)  # fmt: skip
            else:
                shown = ax.imshow(norms[site][item], cmap="magma", interpolation="nearest",
                                  **scale)  # fmt: skip
            found = detections[site]
            for y, x in zip(
                found["y"][found["item"] == item], found["x"][found["item"] == item], strict=True
            ):
                ax.add_patch(
                    Rectangle((x - 0.5, y - 0.5), group, group, fill=False, ec="cyan", lw=1.2)
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(_short(site), fontsize=7)
            if r == 0:
                ax.set_title(f"item {item}", fontsize=7)
        if shown is not None:
            colorbar(figure, shown, list(axes[r]), "token norm (L2)", shrink=0.9)
    if title:
        figure.suptitle(title + " (cyan: detected groups)", fontsize=8)
    return save_figure(figure, path, dpi=110)


def plot_similarity_maps(
    images: np.ndarray | None,
    maps: dict[str, np.ndarray],
    queries: dict[str, tuple[int, int, int]],
    path: str | Path,
    items: Sequence[int] = (0, 1, 2, 3),
    title: str = "",
) -> Path:
    """Cosine to the query token (star) for a few images per site (rows: sites)."""
    sites = list(maps)
    items = [i for i in items if i < len(next(iter(maps.values())))]
    columns = len(items) + (1 if images is not None else 0)
    figure = new_figure(figsize=(1.6 * columns + 0.8, 1.6 * len(sites) + 0.4))
    axes = np.atleast_2d(figure.subplots(len(sites), columns, squeeze=False))
    for r, site in enumerate(sites):
        query_item, qy, qx = queries[site]
        offset = 0
        if images is not None:
            height, width = maps[site].shape[1:]
            axes[r, 0].imshow(images[query_item], extent=(-0.5, width - 0.5, height - 0.5, -0.5))
            axes[r, 0].plot([qx], [qy], "*", color="yellow", ms=9, mec="k")
            axes[r, 0].set_title(f"query: item {query_item}" if r == 0 else "", fontsize=7)
            offset = 1
        for c, item in enumerate(items):
            ax = axes[r, c + offset]
            shown = ax.imshow(
                maps[site][item], cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest"
            )
            ax.plot([qx], [qy], "*", color="yellow", ms=7, mec="k")
            if r == 0:
                ax.set_title(
                    f"item {item}" + (" (within)" if item == query_item else ""), fontsize=7
                )
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(_short(site), fontsize=7)
    colorbar(figure, shown, axes.ravel().tolist(), "cosine similarity to the query token",
             shrink=0.6)  # fmt: skip
    if title:
        figure.suptitle(title, fontsize=8)
    return save_figure(figure, path, dpi=110)
