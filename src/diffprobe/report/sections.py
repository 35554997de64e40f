"""One report section per stage folder, chosen by the folder's kind. Each builder reads the
files its stage writes (tables, ``summary.json``, the figures the stage drew) and returns HTML;
a kind without a builder gets :func:`generic`, which shows its figures, JSON summaries and
tables, so the output of a new stage appears in the report before anyone writes its section."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

from diffprobe.report.discover import Stage, read_json
from diffprobe.report.html import esc, figure_png, image, key_values, table

TITLES = {
    "demo": "Demo outputs",
    "extract": "Provenance: extraction run",
    "train-tiny": "Training of tiny",
    "align": "Alignment (THINGS odd-one-out)",
    "probe": "Linear probe",
    "regress": "Regression to a human embedding",
    "anomalies": "Anomalies (positions, corners, high-norm tokens)",
    "lens": "Diffusion Lens",
    "features": "Features: activity run",
    "features-analysis": "Features: activity over timesteps, top channels",
    "sae": "Sparse autoencoder",
    "dream": "Deep dream and steering",
    "steer": "Steering",
    "hspace": "h-space editing",
    "attribution": "Attribution maps",
}


def read_rows(path: Path) -> list[dict]:
    """A CSV file's rows (``#`` comment lines skipped; numbers stay text), [] if missing."""
    try:
        with open(path, newline="") as handle:
            lines = [line for line in handle if not line.startswith("#")]
    except OSError:
        return []
    return list(csv.DictReader(lines))


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _where(stage: Stage) -> str:
    created = stage.marker.get("created", "")
    when = f" · written {esc(created)}" if created else ""
    return f"<p class='where'>{esc(stage.path)}{when}</p>"


def _images(folder: Path, names: list[str] | None = None, limit: int = 16, **kwargs) -> str:
    paths = [folder / n for n in names] if names is not None else sorted(folder.glob("*.png"))
    return "".join(image(p, **kwargs) for p in paths[:limit] if p.is_file())


# ------------------------------------------------------------------ provenance


def extract(stage: Stage) -> str:
    info = read_json(stage.path / "run.json")
    if not isinstance(info, dict):
        return "<p class='note'>run.json is missing or unreadable</p>"
    model = info.get("model", {})
    noise = info.get("noise", [])
    items = info.get("items", [])
    rows = {
        "model": model if isinstance(model, dict) else {"name": model},
        "data": info.get("data", {}),
        "items": len(items) if isinstance(items, list) else items,
        "sites": info.get("sites", []),
        "noise levels": [g.get("noise_level", g.get("timestep")) for g in noise],
        "timesteps": [g.get("timestep") for g in noise],
        "conditions": info.get("stored_conditions", []),
        "pooling": info.get("pooling"),
        "seed": info.get("seed"),
        "image size": info.get("image_size"),
        "store dtype": info.get("store_dtype"),
        "versions": info.get("versions", {}),
    }
    chunks = [read_json(p) for p in sorted((stage.path / "progress").glob("*.done"))]
    seconds = [c.get("seconds", 0.0) for c in chunks if isinstance(c, dict)]
    if seconds:
        rows["timings"] = {"chunks done": len(seconds), "seconds (sum over chunks)":
                           round(sum(seconds), 2)}  # fmt: skip
    versions = rows.pop("versions")
    return (_where(stage) + key_values(rows, limit=60)
            + "<details><summary>versions</summary>" + key_values(versions) + "</details>")  # fmt: skip


def demo(stage: Stage) -> str:
    parts = [_where(stage)]
    capture = read_json(stage.path / "capture.json")
    if isinstance(capture, dict):
        rows = [{"site": s, **v} for s, v in capture.items() if isinstance(v, dict)]
        parts.append("<h3>Capture on tiny (one generation)</h3>" + table(rows))
    parts.append(_images(stage.path, ["tiny_grid.png", "tiny_sample.png"], pixel=False))
    return "".join(parts)


# ------------------------------------------------------------------ alignment


def align(stage: Stage) -> str:
    folder = stage.path
    rows = read_rows(folder / "alignment.csv")
    parts = [_where(stage)]
    if rows:
        best = sorted(rows, key=lambda r: -_number(r.get("accuracy")))
        ceiling = _number(rows[0].get("ceiling"))
        ceiling_text = f"{ceiling:.3f}" if math.isfinite(ceiling) else "unknown"
        columns = [c for c in ("site", "noise", "condition", "reduction", "metric", "accuracy",
                               "normalised", "rsa", "triplets") if c in rows[0]]  # fmt: skip
        parts.append(
            f"<h3>Odd-one-out accuracy, best first</h3><p>chance 0.333 · noise ceiling "
            f"{ceiling_text} · {len(rows)} feature sets (normalised = (accuracy − chance) / "
            "(ceiling − chance))</p>" + table(best, columns, limit=12)
        )
        parts.append(image(ceiling_heatmap(rows), "odd-one-out accuracy by site and noise level, "
                           "one panel per condition, on one colour scale from chance to the "
                           "noise ceiling (marked on the colour bar)"))  # fmt: skip
    else:
        parts.append(_images(folder, ["accuracy_heatmap.png"]))
    parts.append(_images(folder, ["accuracy_vs_noise.png", "cka_heatmap.png"]))
    for name, title in (("probe.csv", "Linear probe (folds over objects)"),
                        ("regression.csv", "Regression onto the embedding (folds)"),
                        ("reductions.csv", "Reductions of the best feature set")):  # fmt: skip
        found = read_rows(folder / name)
        if found:
            parts.append(f"<h3>{esc(title)}</h3>" + table(found, limit=12))
    return "".join(parts)


def ceiling_heatmap(rows: list[dict]) -> bytes:
    """Accuracy by site (rows) × noise level (columns), one panel per condition (and reduction
    or metric where those vary), all on one colour scale from chance (1/3) to the noise ceiling
    (or the best accuracy where the ceiling is unknown); the colour bar marks the ceiling."""
    from diffprobe.report.figures import colorbar, new_figure

    def key(r: dict) -> str:
        return " · ".join(str(r.get(c, "")) for c in ("condition", "reduction", "metric")
                          if len({x.get(c) for x in rows}) > 1 or c == "condition")  # fmt: skip

    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    sites = list(dict.fromkeys(r["site"] for r in rows))
    order = sorted({(_number(r.get("noise_level", r.get("timestep"))), r["noise"]) for r in rows})
    noises = [n for _, n in order]
    ceiling = _number(rows[0].get("ceiling"))
    best = max(_number(r["accuracy"]) for r in rows)
    top = ceiling if math.isfinite(ceiling) else best
    figure = new_figure(figsize=(2.2 + 0.8 * len(noises) * len(groups) + 1.4,
                                 max(2.8, 1.2 + 0.4 * len(sites))), layout="constrained")  # fmt: skip
    axes = figure.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    shown = None
    for axis, (name, group) in zip(axes, groups.items(), strict=True):
        grid = [[math.nan] * len(noises) for _ in sites]
        for r in group:
            grid[sites.index(r["site"])][noises.index(r["noise"])] = _number(r["accuracy"])
        shown = axis.imshow(
            grid, cmap="viridis", vmin=1 / 3, vmax=max(top, best) + 0.02, aspect="auto"
        )
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if math.isfinite(value):
                    axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                              color="white" if value < (1 / 3 + top) / 2 else "black")  # fmt: skip
        axis.set_xticks(range(len(noises)), [n.removeprefix("p") for n in noises], fontsize=8)
        axis.set_xlabel("noise level p", fontsize=8)
        axis.set_title(name, fontsize=9)
    axes[0].set_yticks(range(len(sites)), [s.removeprefix("unet.") for s in sites], fontsize=8)
    label = "odd-one-out accuracy\n(bottom: chance 1/3"
    label += "; red dashed: noise ceiling)" if math.isfinite(ceiling) else ")"
    bar = colorbar(figure, shown, list(axes), label)
    if math.isfinite(ceiling):
        bar.ax.axhline(ceiling, color="red", linestyle="--", linewidth=2.5)
    figure.suptitle("odd-one-out accuracy, site × noise level", fontsize=10)
    return figure_png(figure, dpi=110)


def probe(stage: Stage) -> str:
    parts = [_where(stage)]
    for name in ("probe_summary.csv", "regression_summary.csv", "probe.csv", "regression.csv"):
        found = read_rows(stage.path / name)
        if found:
            parts.append(f"<h3>{esc(name)}</h3>" + table(found, limit=15))
    return "".join(parts) + _images(stage.path)


# ------------------------------------------------------------------ anomalies


def anomalies(stage: Stage) -> str:
    folder = stage.path
    summary = read_json(folder / "summary.json")
    parts = [_where(stage)]
    if isinstance(summary, dict):
        exact = [r for r in summary.get("position_probes", []) if r.get("binning") == "exact"]
        if exact:
            cols = ["site", "noise", "condition", "grid", "axis", "accuracy", "chance"]
            parts.append("<h3>Position probes (exact token)</h3>" + table(exact, cols, limit=30))
        counts = summary.get("high_norm", [])
        if counts:
            cols = ["site", "noise", "condition", "grid", "detections", "images_with_detections",
                    "images", "max_score"]  # fmt: skip
            parameters = summary.get("parameters", {})
            parts.append(
                f"<h3>High-norm 2×2 groups</h3><p>threshold {esc(parameters.get('threshold'))} × "
                f"{esc(parameters.get('reference'))} token norm</p>" + table(counts, cols)
            )
        corners = summary.get("corner_ratio", [])
        if corners:
            parts.append("<h3>Corner ratio</h3>" + table(corners, limit=20))
        compared = summary.get("label_comparison", [])
        if compared:
            parts.append("<h3>Detector against hand labels</h3>" + table(compared))
    parts.append(hand_labels(stage))
    figures = sorted(folder.glob("*.png"), key=lambda p: (not p.name.startswith("probe"), p.name))
    parts.append("".join(image(p) for p in figures[:16]))
    return "".join(parts)


def hand_labels(stage: Stage) -> str:
    """Precision and recall of the detector against the labels saved by the inspector (which
    scores them each time a label changes, into ``label_scores.json``)."""
    scores = read_json(stage.path / "label_scores.json")
    if not isinstance(scores, dict) or not scores.get("rows"):
        return ""
    return (
        "<h3>Detector against the inspector's hand labels</h3>"
        f"<p>{esc(scores.get('images', 0))} images looked at, {esc(scores.get('groups', 0))} "
        "groups marked (labels/*.json)</p>" + table(scores["rows"])
    )


def features_analysis(stage: Stage) -> str:
    """``diffprobe features analyse``: the channels × timesteps overview per site, the top
    channels by max activation (``channels.csv``) with their profiles and top examples."""
    folder = stage.path
    parts = [_where(stage)]
    info = read_json(folder / "analysis.json")
    if isinstance(info, dict):
        shown = {k: info.get(k) for k in ("sites", "branch", "profile", "top_k", "examples",
                                          "grid_end", "threshold", "peaks")}  # fmt: skip
        shown["timesteps"] = len(info.get("timesteps", []))
        parts.append(key_values(shown, limit=20))
    rows = read_rows(folder / "channels.csv")
    for site_folder in sorted(p for p in (folder / "plots").glob("*") if p.is_dir()):
        parts.append(f"<h3>Activity overview: {esc(site_folder.name)}</h3>")
        parts.append(_images(site_folder, ["heatmap.png"]))
        mine = [r for r in rows if site_folder.name in (r.get("site", ""),
                r.get("site", "").replace("/", "_"))] or rows  # fmt: skip
        top = sorted(mine, key=lambda r: -_number(r.get("max_activation")))[:10]
        if top:
            parts.append("<h3>Top channels by max activation</h3>" + table(top))
        for channel in [int(r["channel"]) for r in top[:3] if r.get("channel", "").isdigit()]:
            parts.append(_images(site_folder, [f"profile_c{channel:05d}.png",
                                               f"top_c{channel:05d}.png"]))  # fmt: skip
    if not rows and not (folder / "plots").is_dir():
        parts.append(generic(stage))
    return "".join(parts)


def dream(stage: Stage) -> str:
    """``diffprobe dream``: settings, the initial → final objective per dream, and the grid of
    each dreamed channel or SAE feature (rows timestep × seed, columns optimisation steps)."""
    folder = stage.path
    parts = [_where(stage)]
    info = read_json(folder / "dream.json")
    if isinstance(info, dict):
        shown = {k: v for k, v in info.items() if not isinstance(v, (list, dict))}
        parts.append(key_values(shown, limit=25))
    rows = read_rows(folder / "summary.csv")
    if rows:
        parts.append("<h3>Objective before and after</h3>" + table(rows, limit=15))
    targets = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "grid.png").is_file())
    for target in targets[:8]:
        parts.append(image(target / "grid.png", f"{target.name}: dream progress"))
    if len(targets) > 8:
        parts.append(f"<p class='where'>{len(targets) - 8} more targets in the folder</p>")
    return "".join(parts) if rows or targets else generic(stage)


def hspace(stage: Stage) -> str:
    """h-space folders: an evaluation (``eval.json``, the edit grid and the metric-vs-strength
    curves) or a trained Δh / direction (``train.json`` / ``direction.json``)."""
    folder = stage.path
    parts = [_where(stage)]
    for name in ("eval.json", "train.json", "direction.json"):
        payload = read_json(folder / name)
        if isinstance(payload, dict):
            shown = {k: v for k, v in payload.items() if k not in ("curve", "versions")}
            parts.append(f"<h3>{esc(name)}</h3>" + key_values(shown, limit=30))
            curve = payload.get("curve")
            if isinstance(curve, list) and curve and isinstance(curve[0], dict):
                parts.append(image(_history_plot(curve), "training curve"))
    parts.append(_images(folder, ["grid.png", "metrics.png"]))
    rest = [p for p in sorted(folder.glob("*.png")) if p.name not in ("grid.png", "metrics.png")]
    parts.append("".join(image(p) for p in rest[:8]))
    return "".join(parts)


def attribution(stage: Stage) -> str:
    """``diffprobe attribution``: settings and IoUs (``attribution.json``) and each prompt's
    comparison figure (maps of every word; DAAM folders ``000/``, ``001/``, ...)."""
    folder = stage.path
    parts = [_where(stage)]
    info = read_json(folder / "attribution.json")
    if isinstance(info, dict):
        shown = {k: v for k, v in info.items() if not isinstance(v, list)}
        parts.append(key_values(shown, limit=30))
    prompts = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    for prompt in prompts[:8]:
        text = (
            (prompt / "prompt.txt").read_text().strip() if (prompt / "prompt.txt").is_file() else ""
        )
        figure = prompt / "comparison.png"
        if figure.is_file():
            parts.append(image(figure, f"{prompt.name}: {text}"))
        else:
            overlays = sorted(prompt.glob("*.overlay.png"))[:6]
            parts.append(
                f"<h3>{esc(prompt.name)}: {esc(text)}</h3>" + "".join(map(image, overlays))
            )
    return "".join(parts) if prompts or info else generic(stage)


# ------------------------------------------------------------------ lens, SAE


def lens(stage: Stage) -> str:
    meta = read_json(stage.path / "lens.json")
    parts = [_where(stage)]
    if isinstance(meta, dict):
        shown = {k: v for k, v in meta.items() if k not in ("files",)}
        parts.append(key_values(shown, limit=20))
    names = ["grid.png"] + [p.name for p in sorted(stage.path.glob("*emergence*.png"))]
    parts.append(_images(stage.path, names, pixel=True))
    rows = read_rows(stage.path / "emergence.csv")
    if rows:
        parts.append("<h3>Attribute emergence by layer</h3>" + table(rows, limit=30))
    return "".join(parts)


def sae(stage: Stage) -> str:
    parts = [_where(stage)]
    config = read_json(stage.path / "cfg.json")
    training = read_json(stage.path / "training.json")
    if isinstance(config, dict):
        parts.append("<h3>Configuration</h3>" + key_values(config, limit=30))
    if isinstance(training, dict):
        final = training.get("final", {})
        keep = {k: training.get(k) for k in ("steps", "seconds", "tokens_per_second", "device")}
        parts.append("<h3>Training</h3>" + key_values({**keep, **final}, limit=30))
        history = training.get("history") or []
        if history:
            parts.append(image(_history_plot(history), "training curves by step"))
    evaluation = read_json(stage.path / "eval.json") or read_json(stage.path / "metrics.json")
    if isinstance(evaluation, dict):
        parts.append("<h3>Evaluation</h3>" + key_values(evaluation, limit=40))
    return "".join(parts) + _images(stage.path)


def _history_plot(history: list[dict]) -> bytes:
    from diffprobe.report.figures import new_figure

    keys = [k for k, v in history[-1].items() if k != "step" and isinstance(v, (int, float))]
    keys = keys[:4]
    figure = new_figure(figsize=(3.2 * max(1, len(keys)), 2.8), layout="constrained")
    axes = figure.subplots(1, max(1, len(keys)), squeeze=False)[0]
    steps = [h.get("step", i) for i, h in enumerate(history)]
    for axis, key in zip(axes, keys, strict=False):
        axis.plot(steps, [h.get(key, math.nan) for h in history])
        axis.set_xlabel("training step")
        axis.set_ylabel(key.replace("_", " "))
        axis.set_title(key.replace("_", " "), fontsize=9)
        axis.grid(alpha=0.3)
    return figure_png(figure)


# ------------------------------------------------------------------ any other kind


def generic(stage: Stage) -> str:
    """Figures (``*.png``), JSON summaries and CSV tables of a stage without its own builder."""
    folder = stage.path
    parts = [_where(stage)]
    jsons = [p for p in sorted(folder.glob("*.json")) if p.name != "diffprobe-output.json"]
    for path in jsons[:3]:
        payload = read_json(path)
        if isinstance(payload, dict):
            parts.append(f"<h3>{esc(path.name)}</h3>" + key_values(payload, limit=25))
    for path in sorted(folder.glob("*.csv"))[:4]:
        rows = read_rows(path)
        if rows:
            parts.append(f"<h3>{esc(path.name)}</h3>" + table(rows, limit=12))
    figures = sorted(folder.glob("*.png"))
    parts.append("".join(image(p) for p in figures[:16]))
    if len(figures) > 16:
        parts.append(f"<p class='where'>{len(figures) - 16} more figures in the folder</p>")
    subfolders = [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.is_symlink()]
    for sub in subfolders[:6]:
        pictures = sorted(sub.glob("*.png"))[:8]
        if pictures:
            parts.append(f"<h3>{esc(sub.name)}/</h3>" + "".join(image(p) for p in pictures))
    return "".join(parts)


BUILDERS: dict[str, Callable[[Stage], str]] = {
    "demo": demo,
    "extract": extract,
    "align": align,
    "probe": probe,
    "regress": probe,
    "anomalies": anomalies,
    "lens": lens,
    "sae": sae,
    "features-analysis": features_analysis,
    "dream": dream,
    "hspace": hspace,
    "attribution": attribution,
}


def section(stage: Stage) -> tuple[str, str]:
    """(title, inner HTML) of one stage."""
    builder = BUILDERS.get(stage.kind, generic)
    title = TITLES.get(stage.kind, stage.kind.replace("-", " ").capitalize())
    return f"{title} — {stage.root.name}/{stage.name}".removesuffix("/."), builder(stage)
