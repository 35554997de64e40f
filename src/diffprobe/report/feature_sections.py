"""Report sections of the feature stages: an activity run (``diffprobe features capture``), a
steering run (``diffprobe steer``, ``--prior``) and a deep-dream folder (``diffprobe dream``).
Each reads what its stage writes (docs/features.md, docs/dream.md) and falls back to the
generic section where the folder is not laid out that way."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from diffprobe.report.discover import Stage, read_json
from diffprobe.report.html import esc, figure_png, image, key_values, table

ACTIVITY_FORMAT = "diffprobe-activity/1"
MAX_IMAGES = 8  # images per row of a grid
MAX_ROWS = 12  # steered runs shown


def _where(stage: Stage) -> str:
    from diffprobe.report.sections import _where as where

    return where(stage)


def _generic(stage: Stage) -> str:
    from diffprobe.report.sections import generic

    return generic(stage)


def _read_rgb(path: Path) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGB"))
    except (OSError, UnidentifiedImageError):
        return None


def _grid(rows: list[tuple[str, list[Path]]], columns: list[str], title: str) -> bytes | None:
    """A PNG of labelled rows of images (small ones upscaled, nearest), or None if none read."""
    import io

    from diffprobe.report.dream import dream_grid

    read = []
    for label, paths in rows:
        images = [a for a in (_read_rgb(p) for p in paths) if a is not None]
        if images:
            read.append((label, images))
    if not read:
        return None
    shape = read[0][1][0].shape
    read = [(label, [a for a in images if a.shape == shape]) for label, images in read]
    out = io.BytesIO()
    dream_grid(read, columns[: max(len(r[1]) for r in read)], title).save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------ activity run


def features_run(stage: Stage) -> str:
    """An activity run: what was captured (model, prompts, seeds, schedule, sites, branches,
    reductions, SAE transforms), how far the capture got, and the first generated images."""
    info = read_json(stage.path / "run.json")
    if not isinstance(info, dict) or info.get("format") != ACTIVITY_FORMAT:
        return _generic(stage)
    items = info.get("items") if isinstance(info.get("items"), list) else []
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    schedule = info.get("schedule") if isinstance(info.get("schedule"), dict) else {}
    timesteps = info.get("timesteps") or []
    chunk = info.get("chunk_items") or 1
    done = len(list((stage.path / "progress").glob("chunk-*.done")))
    chunks = -(-len(items) // int(chunk)) if items else 0
    transforms = info.get("transforms") or {}
    units = {site: ("SAE features" if "sae" in str(transforms.get(site, "")).lower() else
                    "features (transformed)") if site in transforms else "channels"
             for site in info.get("sites", [])}  # fmt: skip
    prompts = info.get("prompts") if isinstance(info.get("prompts"), dict) else {}
    stored = "none yet"
    if timesteps:
        stored = f"{len(timesteps)}: {timesteps[0]:g} … {timesteps[-1]:g} (generation order)"
    unfinished = " (incomplete: run the capture command again)"
    rows = {
        "model": {k: model.get(k) for k in ("name", "family", "dtype") if k in model},
        "prompts": prompts.get("description") or prompts.get("count"),
        "seeds": info.get("seeds"),
        "items (prompt × seed)": len(items),
        "scheduler": schedule.get("scheduler"),
        "steps": schedule.get("steps"),
        "guidance": schedule.get("guidance_scale"),
        "CFG": schedule.get("cfg"),
        "image size": schedule.get("image_size"),
        "stored timesteps": stored,
        "branches": info.get("branches"),
        "reductions": info.get("reductions"),
        "chunks done": f"{done} of {chunks}" + ("" if done == chunks else unfinished),
    }
    site_rows = [{"site": s, "stored as": units[s], "transform": transforms.get(s, "")}
                 for s in info.get("sites", [])]  # fmt: skip
    parts = [_where(stage), key_values(rows, limit=30),
             "<h3>Sites</h3>" + table(site_rows, ["site", "stored as", "transform"])]  # fmt: skip
    shown = [(stage.path / str(item.get("image", ""))) for item in items[:MAX_IMAGES]]
    captions = [f"{i}" for i in range(len(shown))]
    png = _grid([("items 0..", shown)], captions, "first generated images")
    if png is not None:
        prompts_shown = "; ".join(f"{i}: {esc(item.get('prompt', ''))} (seed {item.get('seed')})"
                                  for i, item in enumerate(items[:MAX_IMAGES]))  # fmt: skip
        parts.append(image(png, f"generated images (the top-example thumbnails): {prompts_shown}"))
    return "".join(parts)


# ------------------------------------------------------------------ steering


def _strength(value) -> str:
    if isinstance(value, dict) and "values" in value:
        values = [v for v in value["values"] if isinstance(v, (int, float))]
        if values:
            span = f"{min(values):.3g} … {max(values):.3g}"
            return f"per timestep (--relative × max activation): {span}"
    return "" if value is None else str(value)


def _window(value) -> str:
    if not isinstance(value, dict):
        return "all"
    if "low" in value:
        return f"{value['low']:g}–{value['high']:g}"
    listed = value.get("timesteps") or []
    shown = ", ".join(f"{t:g}" for t in listed[:6]) + (" …" if len(listed) > 6 else "")
    return f"{value.get('kind', '')} {{{shown}}} ± {value.get('tolerance', 0):g}"


def steer(stage: Stage) -> str:
    """``diffprobe steer``: the steers as run (site, channel, mode, strength, window) and a grid
    of the unsteered baseline against each steered run, same seeds in each column."""
    info = read_json(stage.path / "steer.json")
    if not isinstance(info, dict) or not isinstance(info.get("runs"), list):
        return _generic(stage)
    shown = {"prompts": info.get("prompts"), "seeds": info.get("seeds"),
             "steps": info.get("steps"), "guidance": info.get("guidance_scale"),
             "prior (latents saved for dream)": info.get("prior")}  # fmt: skip
    parts = [_where(stage), key_values(shown)]
    rows = []
    for run in info["runs"]:
        for st in run.get("steers") or [{}]:
            rows.append({"run": run.get("name"), "site": st.get("site", ""),
                         "channel": st.get("channel", "") if st.get("channel") is not None
                         else ("direction" if st.get("direction") else ""),
                         "mode": st.get("mode", ""), "strength": _strength(st.get("strength")),
                         "window": _window(st.get("window")) if st else "",
                         "branch": st.get("branch") or ("both" if st else "")})  # fmt: skip
    parts.append("<h3>Steers</h3>" + table(rows, limit=MAX_ROWS + 1))
    items = info.get("items") or []
    count = min(len(items), MAX_IMAGES)
    columns = [f"seed {item.get('seed')}" for item in items[:count]]
    grid_rows = []
    for run in info["runs"][: MAX_ROWS + 1]:
        name = str(run.get("name", ""))
        folder = stage.path / name / "images"
        if ".." in Path(name).parts or not folder.is_dir():
            continue
        paths = [folder / f"prior_image_{j}.png" for j in range(count)]
        grid_rows.append((name.split("/")[-1], paths))
    png = _grid(grid_rows, columns, "rows: baseline and each steer; columns: seeds")
    if png is not None:
        parts.append(image(png, "steered images against the unsteered baseline (same seeds "
                           "and noise in each column)"))  # fmt: skip
    if len(info["runs"]) > MAX_ROWS + 1:
        parts.append(f"<p class='where'>{len(info['runs']) - MAX_ROWS - 1} more runs in the "
                     "folder</p>")  # fmt: skip
    return "".join(parts)


# ------------------------------------------------------------------ deep dream


def objective_text(info: dict) -> str:
    """``channel(site) − 0.5·total_variation − 0.5·range(3)`` from a dream's leaves and
    weights ("" where they do not pair up)."""
    leaves, weights = info.get("leaves"), info.get("weights")
    if isinstance(leaves, list) and isinstance(weights, list) and len(leaves) == len(weights):
        terms = []
        for weight, leaf in zip(weights, leaves, strict=True):
            try:
                w = float(weight)
            except (TypeError, ValueError):
                return " + ".join(map(str, leaves))
            sign = "−" if w < 0 else "+"
            size = abs(w)
            terms.append(f"{sign} {'' if size == 1 else f'{size:g}·'}{leaf}")
        return " ".join(terms).removeprefix("+ ")
    return ""


def _objective_curves(folder: Path, kind: str, targets: list[int]) -> bytes | None:
    """The total objective against step, one line per (target, timestep, seed) (the loop's own
    values, with transforms and fresh noise), from each dream's stats.json."""
    from diffprobe.report.figures import new_figure

    curves = {}
    for target in targets:
        name = f"{kind}_{target:05d}" if kind == "feature" else f"{kind}_{target:04d}"
        for leaf in sorted((folder / name).glob("timestep_*")):
            stats = read_json(leaf / "stats.json")
            if not isinstance(stats, list):
                continue
            by_seed: dict = {}
            for row in stats:
                if isinstance(row, dict) and "step" in row and "total" in row:
                    by_seed.setdefault(row.get("seed"), []).append((row["step"], row["total"]))
            for seed, points in by_seed.items():
                points.sort()
                label = f"{kind} {target} t={leaf.name.split('_')[-1].lstrip('0') or '0'} s={seed}"
                curves[label] = points
    if not curves:
        return None
    figure = new_figure(figsize=(6.5, 3.4), layout="constrained")
    axis = figure.subplots()
    for label, points in list(curves.items())[:20]:
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("optimisation step")
    axis.set_ylabel("objective (total, maximised)")
    axis.set_title("deep dream: objective during the optimisation", fontsize=10)
    axis.grid(alpha=0.3)
    if len(curves) <= 20:
        axis.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure_png(figure)


def dream(stage: Stage) -> str:
    """``diffprobe dream``: settings, objective, the initial → final activation of each dream,
    the objective during the optimisation, and each target's grid (rows timestep × seed,
    columns snapshot steps)."""
    folder = stage.path
    info = read_json(folder / "dream.json")
    rows = _rows(folder / "summary.csv")
    targets_found = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "grid.png").is_file())
    if not isinstance(info, dict) and not rows and not targets_found:
        return _generic(stage)
    parts = [_where(stage)]
    if isinstance(info, dict):
        kind = str(info.get("kind") or "channel")
        shown = {k: info.get(k) for k in ("model", "site", "kind", "sae", "prior", "prior_from")
                 if info.get(k) is not None}  # fmt: skip
        shown["targets"] = info.get("targets")
        shown["objective (maximised)"] = objective_text(info)
        timesteps = info.get("timesteps")
        if isinstance(timesteps, dict):
            listed = [(k, v) for k, v in list(timesteps.items())[:8] if isinstance(v, list)]
            shown["timesteps per target"] = "; ".join(
                f"{kind} {k}: {', '.join(f'{float(t):g}' for t in v)}" for k, v in listed
            )
        seeds = info.get("seeds")
        shown["seeds"] = seeds
        settings = info.get("settings") if isinstance(info.get("settings"), dict) else {}
        parts.append(key_values(shown, limit=25))
        if settings:
            parts.append("<details><summary>settings</summary>" + key_values(settings) +
                         "</details>")  # fmt: skip
        targets = [int(t) for t in info.get("targets", []) if isinstance(t, int)]
        png = _objective_curves(folder, kind, targets)
        if png is not None:
            parts.append(image(png, "objective (activation minus weighted penalties) per step"))
    if rows:
        for row in rows:
            initial, final = _number(row.get("initial")), _number(row.get("final"))
            row["rise"] = final - initial if math.isfinite(initial + final) else ""
        parts.append("<h3>Activation at the start and the end (no random transforms)</h3>" +
                     table(rows, limit=16))  # fmt: skip
    for target in targets_found[:8]:
        parts.append(image(target / "grid.png", f"{target.name}: dream progress (rows timestep "
                           "× seed, columns optimisation steps)"))  # fmt: skip
    if len(targets_found) > 8:
        parts.append(f"<p class='where'>{len(targets_found) - 8} more targets in the folder</p>")
    return "".join(parts)


def _rows(path: Path) -> list[dict]:
    from diffprobe.report.sections import read_rows

    return read_rows(path)


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
