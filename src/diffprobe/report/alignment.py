"""Figures of an alignment result: the accuracy heatmap (sites × noise levels), accuracy
against noise, and linear CKA between feature sets. Each takes the rows or matrices that
:mod:`diffprobe.stages.align` computes and writes one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffprobe.analysis.alignment import CHANCE
from diffprobe.report.figures import colorbar, new_figure, save_figure

# a CKA matrix with more feature sets than this is drawn as small multiples (one sites × sites
# panel per condition and noise level): 100 labels on one axis cannot be read
CKA_SINGLE_PANEL = 24


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (
            row.get("run", ""),
            row.get("condition", ""),
            row.get("reduction", ""),
            row.get("metric", ""),
            row.get("pca", ""),
        )
        groups.setdefault(key, []).append(row)
    return groups


def _group_title(key: tuple) -> str:
    run, condition, reduction, metric, pca = key
    parts = [p for p in (run, condition, reduction, metric) if p]
    if pca:
        parts.append(f"pca {pca}")
    return ", ".join(parts)


def _noise_axis(rows: list[dict]) -> tuple[str, list[str], list[float]]:
    keys, values = [], []
    axis = "noise_level" if all(r.get("noise_level") is not None for r in rows) else "timestep"
    for row in rows:
        if row["noise"] not in keys:
            keys.append(row["noise"])
            values.append(float(row[axis]))
    order = np.argsort(values, kind="stable")
    return axis, [keys[i] for i in order], [values[i] for i in order]


def _axis_label(name: str) -> str:
    return "noise level p (fraction of the schedule)" if name == "noise_level" else "timestep t"


def plot_accuracy_heatmap(rows: list[dict], path: str | Path, value: str = "accuracy") -> Path:
    """Heatmap of ``value`` by site (rows) × noise level (columns), one panel per (run,
    condition, reduction, metric), all panels on one colour scale so that they compare."""
    groups = _groups(rows)
    columns = max(len(_noise_axis(r)[1]) for r in groups.values())
    heights = [len({x["site"] for x in r}) + 1.6 for r in groups.values()]
    figure = new_figure(figsize=(2.8 + 0.85 * columns, 0.6 + 0.42 * sum(heights)),
                        layout="constrained")  # fmt: skip
    axes = figure.subplots(len(groups), 1, squeeze=False, height_ratios=heights)[:, 0]
    values = [r[value] for r in rows if r.get(value) is not None and np.isfinite(r[value])]
    scale = {"vmin": min(values), "vmax": max(values)} if values else {}
    label = "odd-one-out accuracy" if value == "accuracy" else value.replace("_", " ")
    image = None
    for axis, (key, group) in zip(axes, groups.items(), strict=True):
        sites = list(dict.fromkeys(r["site"] for r in group))
        name, noises, levels = _noise_axis(group)
        grid = np.full((len(sites), len(noises)), np.nan)
        for row in group:
            grid[sites.index(row["site"]), noises.index(row["noise"])] = row[value]
        image = axis.imshow(grid, aspect="auto", cmap="viridis", **scale)
        middle = np.mean(list(scale.values())) if scale else np.nanmean(grid)
        for (i, j), cell in np.ndenumerate(grid):
            if np.isfinite(cell):
                axis.text(j, i, f"{cell:.3f}", ha="center", va="center", fontsize=7,
                          color="white" if cell < middle else "black")  # fmt: skip
        axis.set_xticks(range(len(noises)), [f"{v:g}" for v in levels], fontsize=8)
        axis.set_yticks(range(len(sites)), sites, fontsize=8)
        axis.set_xlabel(_axis_label(name), fontsize=8)
        axis.set_title(_group_title(key) or label, fontsize=9, loc="left")
    if image is not None:
        colorbar(figure, image, list(axes), label, shrink=min(1.0, 6 / len(axes) + 0.2))
    figure.suptitle(f"{label} by site and noise level", fontsize=10)
    return save_figure(figure, path)


def plot_accuracy_vs_noise(rows: list[dict], path: str | Path) -> Path:
    """Accuracy against noise level, one line per site, with chance and the noise ceiling; one
    panel per (run, condition, reduction, metric) on a shared accuracy axis, the legend beside
    them."""
    groups = _groups(rows)
    figure = new_figure(figsize=(9.5, 3.6 * len(groups)), layout="constrained")
    axes = figure.subplots(len(groups), 1, squeeze=False, sharey=True)[:, 0]
    for axis, (key, group) in zip(axes, groups.items(), strict=True):
        name, noises, levels = _noise_axis(group)
        for site in dict.fromkeys(r["site"] for r in group):
            by_noise = {r["noise"]: r["accuracy"] for r in group if r["site"] == site}
            axis.plot(levels, [by_noise.get(n, np.nan) for n in noises], marker="o", label=site)
        axis.axhline(CHANCE, color="grey", linestyle=":", label="chance (1/3)")
        ceiling = group[0].get("ceiling")
        if ceiling is not None and np.isfinite(ceiling):
            axis.axhline(ceiling, color="black", linestyle="--", label="noise ceiling")
        axis.set_xlabel(_axis_label(name))
        axis.set_ylabel("odd-one-out accuracy")
        axis.set_title(_group_title(key) or "odd-one-out accuracy", fontsize=9, loc="left")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(figure, path)


def plot_cka(matrix: np.ndarray, keys: Sequence[tuple[str, ...]], path: str | Path) -> Path:
    """Linear CKA between feature sets. ``keys``: one (run, site, noise, condition, reduction)
    per row of ``matrix`` (sets, sets). Up to :data:`CKA_SINGLE_PANEL` sets: one labelled
    heatmap; more: one sites × sites panel per (run, condition, reduction, noise level), so
    every label stays readable (the whole matrix is in ``cka.csv``)."""
    keys = [tuple(k) for k in keys]
    if len(keys) <= CKA_SINGLE_PANEL:
        labels = [feature_set_label(k) for k in keys]
        size = 3 + 0.32 * len(labels)
        figure = new_figure(figsize=(size + 1.2, size), layout="constrained")
        axis = figure.subplots()
        image = axis.imshow(matrix, vmin=0, vmax=1, cmap="magma")
        axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        axis.set_yticks(range(len(labels)), labels, fontsize=7)
        axis.set_title("linear CKA between feature sets", fontsize=10)
        colorbar(figure, image, axis, "linear CKA (0 unrelated, 1 same up to rotation/scale)")
        return save_figure(figure, path)
    panels: dict[tuple, list[int]] = {}
    for index, (run, _site, noise, condition, reduction) in enumerate(keys):
        panels.setdefault((run, condition, reduction, noise), []).append(index)
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    largest = max(len(v) for v in panels.values())
    side = 1.6 + 0.3 * largest
    figure = new_figure(figsize=(side * columns + 1.5, side * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    image = None
    for axis, ((run, condition, reduction, noise), members) in zip(
        axes, panels.items(), strict=False
    ):
        sites = [keys[i][1] for i in members]
        image = axis.imshow(matrix[np.ix_(members, members)], vmin=0, vmax=1, cmap="magma")
        axis.set_xticks(range(len(sites)), [_short(s) for s in sites], rotation=90, fontsize=6)
        axis.set_yticks(range(len(sites)), [_short(s) for s in sites], fontsize=6)
        title = ", ".join(p for p in (run, condition, reduction) if p)
        axis.set_title(f"{noise}" + (f" ({title})" if title else ""), fontsize=8)
    for axis in axes[len(panels) :]:
        axis.set_visible(False)
    if image is not None:
        colorbar(figure, image, list(axes[: len(panels)]), "linear CKA", shrink=0.8)
    figure.suptitle("linear CKA between sites, per condition and noise level", fontsize=10)
    return save_figure(figure, path)


def _short(site: str) -> str:
    return site.removeprefix("unet.").removeprefix("transformer.")


def feature_set_label(key: tuple) -> str:
    run, site, noise, condition, reduction = key
    parts = [run] if run else []
    parts += [site, noise]
    if condition:
        parts.append(condition)
    if reduction:
        parts.append(reduction)
    return " ".join(parts)
