"""The anomaly stage (``diffprobe anomalies RUN``, ``make demo``): every measurement of
:mod:`diffprobe.analysis.anomalies` on a run extracted with pooling "none", with the cropped
images the corner ratio needs extracted by the same engine, tables (CSV with the definitions as
``#`` comments), ``summary.json`` and figures in a claimed output folder.

The measurement parameters are one :class:`AnomalyConfig`; :func:`analyse_run` reads the run,
:func:`measure` does one (site, noise level, condition) array, :func:`write_results` writes.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from diffprobe.analysis.anomalies import (
    DEFAULT_BINNINGS,
    DEFAULT_THRESHOLD,
    DEFINITIONS,
    REFERENCES,
    AnomalyError,
    compare_with_labels,
    corner_ratio,
    detect_high_norm,
    detections_per_image,
    group_scores,
    norm_maps,
    parse_grid,
    position_probe,
    position_similarity,
    similarity_maps,
    to_grid,
    token_border,
)
from diffprobe.data.anomaly_labels import labels_to_table, load_label_table, save_label_table
from diffprobe.extract.store import open_run
from diffprobe.io import claim_output, read_csv, write_bytes, write_csv, write_json
from diffprobe.report.anomalies import (
    plot_corner_ratio,
    plot_norm_overlays,
    plot_probe_accuracy,
    plot_similarity_maps,
)
from diffprobe.stages.crops import extract_cropped, load_model_of, load_run_images

log = logging.getLogger(__name__)

ANOMALIES_KIND = "anomalies"


@dataclass(frozen=True)
class AnomalyConfig:
    """The parameters of the measurements (see :data:`DEFINITIONS`), validated when built.

    ``binnings``: probe bin counts below the grid size (``exact`` is always added);
    ``test_fraction``: share of images the probes are scored on; ``threshold``, ``group``,
    ``reference``: high-norm detection; ``corner``: measure the corner ratio (extracts the
    cropped images), ``corner_size`` tokens per corner; ``tolerance``: label matching in tokens;
    ``query`` (row, column fractions) and ``query_item``: the similarity query token; ``show``:
    images per overlay figure; ``seed``: the probes' train/test split."""

    binnings: tuple[int, ...] = DEFAULT_BINNINGS
    test_fraction: float = 0.5
    threshold: float = DEFAULT_THRESHOLD
    group: int = 2
    reference: str = "mean"
    corner: bool = True
    corner_size: int = 1
    tolerance: int = 1
    query: tuple[float, float] = (0.5, 0.5)
    query_item: int = 0
    show: int = 4
    seed: int = 0
    # the anomaly paper's own measurements (stages/anomaly_paper.py): token-group ratios without
    # resizing the crop, rel_norm at labels across every site; window side scaled with the
    # site's grid, max(1, int(group * H / label_grid)); label_grid default image_size / 16
    paper: bool = False
    scale_window: bool = False
    label_grid: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "binnings", tuple(int(b) for b in self.binnings))
        object.__setattr__(self, "query", tuple(float(q) for q in self.query))
        checks = [
            (self.reference in REFERENCES, f"--reference {self.reference!r}: expected one of "
             f"{', '.join(REFERENCES)}"),
            (len(self.query) == 2 and all(0.0 <= q <= 1.0 for q in self.query),
             f"--query {','.join(f'{q:g}' for q in self.query)}: expected two fractions in "
             "[0, 1] (row,col of the grid)"),
            (0.0 < self.test_fraction < 1.0, f"--test-fraction {self.test_fraction:g}: expected "
             "a fraction strictly between 0 and 1"),
            (self.threshold > 0, f"--threshold {self.threshold:g}: expected a ratio > 0"),
            (self.group >= 1, f"--group {self.group}: a token group has a side of at least 1"),
            (self.corner_size >= 1, f"--corner-size {self.corner_size}: at least 1 token"),
            (self.tolerance >= 0, f"--tolerance {self.tolerance}: at least 0 tokens"),
            (self.query_item >= 0, f"--query-item {self.query_item}: an item index >= 0"),
            (self.show >= 0, f"--show {self.show}: a number of images >= 0"),
            (self.label_grid is None or self.label_grid >= 1, f"--label-grid "
             f"{self.label_grid}: a grid of at least 1 token"),
            (all(b >= 2 for b in self.binnings), f"--binnings {list(self.binnings)}: bin counts "
             "are at least 2"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise AnomalyError(message)

    def parameters(self, run_root: Path) -> dict:
        """What the tables state in their ``# parameter`` lines."""
        values = asdict(self)
        return {
            "run": str(run_root),
            "binnings": list(self.binnings),
            **{k: values[k] for k in ("test_fraction", "threshold", "group", "reference")},
            "corner": self.corner_size,
            "tolerance": self.tolerance,
            "query": list(self.query),
            "query_item": self.query_item,
            "seed": self.seed,
            "paper": self.paper,
            "scale_window": self.scale_window,
            "label_grid": self.label_grid,
        }

    def group_for(self, height: int) -> int:
        """The window side on a site of ``height`` tokens: ``group``, or with ``scale_window``
        max(1, int(group · height / label_grid)) (the paper's rule for group 2)."""
        if not self.scale_window or self.label_grid is None:
            return self.group
        return max(1, int(self.group * height / self.label_grid))


# ------------------------------------------------------------------ measuring one array


@dataclass
class Tables:
    """The rows of every output table, filled array by array."""

    probes: list[dict] = field(default_factory=list)
    corners: list[dict] = field(default_factory=list)
    counts: list[dict] = field(default_factory=list)
    per_image: list[dict] = field(default_factory=list)
    detections: list[dict] = field(default_factory=list)
    similarity: list[dict] = field(default_factory=list)
    comparison: list[dict] = field(default_factory=list)


def measure(
    maps: np.ndarray,
    base: dict,
    ids: Sequence[str],
    config: AnomalyConfig,
    tables: Tables,
    *,
    cropped: np.ndarray | None = None,
    labels: dict[str, np.ndarray] | None = None,
) -> dict:
    """Every measurement of one array's token ``maps`` (items, H, W, C) into ``tables`` (rows
    start with ``base``: site, noise, condition, grid); ``cropped``: the cropped images' maps
    for the corner ratio. Returns what the figures need: norms, detections, similarity maps and
    the query."""
    n_items = len(ids)
    site = base["site"]
    rows = position_probe(maps, binnings=config.binnings, test_fraction=config.test_fraction,
                          seed=config.seed)  # fmt: skip
    tables.probes += [{**base, **row} for row in rows]
    if cropped is not None:
        tables.corners.append({**base, **corner_ratio(cropped, maps, config.corner_size)})
    norms = norm_maps(maps)
    group = min(config.group_for(maps.shape[1]), maps.shape[1], maps.shape[2])
    found = detect_high_norm(norms, config.threshold, group, config.reference)
    counts = detections_per_image(found, n_items)
    scores = group_scores(norms, group, config.reference)
    tables.counts.append({
        **base, "window": group, "detections": int(len(found["item"])),
        "images_with_detections": int((counts > 0).sum()), "images": n_items,
        "mean_per_image": float(counts.mean()), "max_score": float(scores.max()),
        "mean_norm": float(norms.mean()),
    })  # fmt: skip
    tables.per_image += [
        {**base, "item": item, "item_id": ids[item], "detections": int(counts[item]),
         "max_score": float(scores[item].max())}
        for item in range(n_items)
    ]  # fmt: skip
    tables.detections += [
        {**base, "item": int(item), "item_id": ids[item], "y": int(y), "x": int(x),
         "score": float(score)}
        for item, y, x, score in zip(found["item"], found["y"], found["x"], found["score"],
                                     strict=True)
    ]  # fmt: skip
    if labels is not None:
        comparison = compare_with_labels(found, labels, site=site, tolerance=config.tolerance)
        tables.comparison.append({**base, **comparison})
    qy = min(int(config.query[0] * maps.shape[1]), maps.shape[1] - 1)
    qx = min(int(config.query[1] * maps.shape[2]), maps.shape[2] - 1)
    q_item = min(config.query_item, n_items - 1)
    sims = similarity_maps(maps, q_item, qy, qx).astype(np.float32)
    stats = position_similarity(maps) if n_items > 1 else {}
    tables.similarity.append({
        **base, "query_item": q_item, "query_y": qy, "query_x": qx,
        "same_position_similarity": stats.get("same_position_similarity", float("nan")),
        "cross_image_similarity": stats.get("cross_image_similarity", float("nan")),
    })  # fmt: skip
    return {"norms": norms.astype(np.float32), "found": found, "sims": sims,
            "query": (q_item, qy, qx)}  # fmt: skip


# ------------------------------------------------------------------ the run


def _chosen(run: Any, sites, noises, conditions) -> tuple[list[str], list[str], list[str]]:
    if run.info.get("pooling") != "none":
        raise AnomalyError(
            f"run {run.root} was extracted with pooling '{run.info.get('pooling')}'; anomalies "
            "need spatial features: extract again with --pooling none"
        )
    chosen = []
    for name, wanted, available in (("site", sites, run.sites), ("noise", noises, run.noise_keys),
                                    ("condition", conditions, run.conditions)):  # fmt: skip
        wanted = list(wanted or available)
        missing = [c for c in wanted if c not in available]
        if missing:
            raise AnomalyError(
                f"{name} {missing[0]!r} is not in {run.root}; it has {', '.join(available)}"
            )
        chosen.append(wanted)
    return chosen[0], chosen[1], chosen[2]


def analyse_run(
    run: Any,
    out: str | Path,
    config: AnomalyConfig | None = None,
    *,
    sites: Sequence[str] | None = None,
    noises: Sequence[str] | None = None,
    conditions: Sequence[str] | None = None,
    grid: tuple[int, int] | str | None = None,
    model: Any = None,
    device: str = "cpu",
    dtype: str | None = None,
    batch_size: int = 16,
    labels: str | Path | None = None,
    plots: bool = True,
    progress: bool = True,
    **options: Any,
) -> dict:
    """Every anomaly measurement on a run folder extracted with pooling "none"; tables, plots and
    ``summary.json`` go to the anomalies folder ``out``. Returns the summary (also the numbers of
    every table). ``config`` (or its fields as keywords, e.g. ``threshold=1.5``) sets the
    measurements; ``sites``, ``noises``, ``conditions`` select arrays; ``grid`` (HxW) shapes
    transformer token sequences; ``model`` extracts the cropped images (default: the run's);
    ``labels``: a folder of label files or a label table .npz.

    Writes ``position_probes.csv``, ``corner_ratio.csv`` (the cropped images are extracted into
    ``out/cropped-*``), ``high_norm_counts.csv`` (per site), ``high_norm_per_image.csv``,
    ``high_norm_detections.csv``, ``norm_maps.npz``, ``similarity.csv``, ``similarity_maps.npz``,
    with ``labels`` ``labels.npz`` and ``label_comparison.csv``, and with ``plots`` one PNG per
    measurement and (noise, condition).
    """
    unknown = sorted(set(options) - {f.name for f in fields(AnomalyConfig)})
    if unknown:
        raise TypeError(f"analyse_run() got unexpected keyword arguments {unknown}")
    config = replace(config or AnomalyConfig(), **options)
    run = open_run(run) if isinstance(run, (str, Path)) else run
    sites, noises, conditions = _chosen(run, sites, noises, conditions)
    grid = parse_grid(grid)
    if config.label_grid is None:
        config = replace(config, label_grid=default_label_grid(run, noises, conditions, grid))
    label_table = None
    if labels is not None:
        ids = [m["id"] for m in run.manifest]
        labels = Path(labels)
        label_table = (
            load_label_table(labels) if labels.suffix == ".npz" else labels_to_table(labels, ids)
        )
    out = claim_output(out, ANOMALIES_KIND)
    images = None
    try:
        images = load_run_images(run)
    except (AnomalyError, OSError) as err:
        if config.corner or config.paper:
            raise
        log.warning("no images for the overlays: %s", err)
    if label_table is not None:
        save_label_table(label_table, out / "labels.npz")
    grids = {}
    for site in sites:
        shape = run.array(site, noises[0], conditions[0]).shape  # the stored shape, not read
        grids[site] = to_grid(np.zeros((1, *shape[1:]), np.float32), grid).shape[1:3]
    cropped_runs = {}
    if config.corner:
        loaded = load_model_of(run, model, device, dtype)
        cropped_runs = extract_cropped(run, loaded, out, sites, grids, images=images,
                                       batch_size=batch_size, progress=progress)  # fmt: skip
    ids = [m["id"] for m in run.manifest]
    shown = list(range(min(config.show, len(ids))))
    tables, arrays, views = Tables(), {"norm_maps": {}, "similarity_maps": {}}, {}
    keys = [(s, n, c) for s in sites for n in noises for c in conditions]
    for site, noise, condition in tqdm(keys, disable=not progress, desc="anomalies",
                                       file=sys.stderr):  # fmt: skip
        maps = to_grid(run.get(site, noise, condition), grid)
        base = {"site": site, "noise": noise, "condition": condition,
                "grid": f"{maps.shape[1]}x{maps.shape[2]}"}  # fmt: skip
        cropped = None
        if config.corner:
            cropped = to_grid(cropped_runs[site].get(site, noise, condition), grid)
        result = measure(maps, base, ids, config, tables, cropped=cropped, labels=label_table)
        if config.corner:
            border = token_border(int(run.info["image_size"]), grids[site])
            tables.corners[-1].update(border_px=f"{border[0]}x{border[1]}",
                                      cropped_run=str(cropped_runs[site].root))  # fmt: skip
        name = f"{site}|{noise}|{condition}"
        arrays["norm_maps"][name], arrays["similarity_maps"][name] = result["norms"], result["sims"]
        view = views.setdefault((noise, condition), {"norms": {}, "found": {}, "sims": {},
                                                     "queries": {}})  # fmt: skip
        # the figures need only the images they show
        view["norms"][site], view["found"][site] = result["norms"], result["found"]
        view["sims"][site] = result["sims"][: max(shown + [result["query"][0]]) + 1]
        view["queries"][site] = result["query"]
    figures = []
    if plots:
        figures = write_figures(out, views, tables, images, shown, config)
    summary = write_results(out, tables, arrays, config.parameters(run.root), figures,
                            config.corner)  # fmt: skip
    if config.paper:
        summary.update(paper_tables(run, out, config, sites, noises, conditions, grids, images,
                                    label_table, model, device, dtype, grid, batch_size,
                                    progress))  # fmt: skip
        write_json(out / "summary.json", summary)
    return summary


def default_label_grid(run, noises, conditions, grid) -> int:
    """The grid labels are made on: that of ``unet.up_blocks.1`` (the paper labels its 32² map
    of SD at 512 px) when the run has it, else image_size / 16."""
    if LABELLED_SITE in run.sites:
        shape = run.array(LABELLED_SITE, noises[0], conditions[0]).shape
        return int(to_grid(np.zeros((1, *shape[1:]), np.float32), grid).shape[1])
    return max(1, int(run.info["image_size"]) // 16)


LABELLED_SITE = "unet.up_blocks.1"


def paper_tables(run, out, config, sites, noises, conditions, grids, images, label_table, model,
                 device, dtype, grid, batch_size, progress) -> dict:  # fmt: skip
    """``token_group_ratios.csv`` and, with labels, ``rel_norm_at_labels.csv`` (the anomaly
    paper's definitions, :mod:`diffprobe.stages.anomaly_paper`)."""
    from diffprobe.stages.anomaly_paper import PAPER_DEFINITIONS, rel_norm_rows
    from diffprobe.stages.anomaly_paper import token_group_ratios as ratio_rows

    parameters = [f"parameter {k} = {v}" for k, v in config.parameters(run.root).items()]
    loaded = load_model_of(run, model, device, dtype)
    ratios = ratio_rows(run, loaded, out, sites, noises, conditions, grids, images, grid=grid,
                        batch_size=batch_size, progress=progress)  # fmt: skip
    comments = [f"token_group_ratio: {PAPER_DEFINITIONS['token_group_ratio']}", *parameters]
    write_csv(out / "token_group_ratios.csv", ratios, comments=comments)
    tables = {"token_group_ratios": ratios}
    if label_table is not None:
        rows = rel_norm_rows(run, sites, noises, conditions, label_table, config.label_grid,
                             grid=grid)  # fmt: skip
        comments = [f"rel_norm: {PAPER_DEFINITIONS['rel_norm']}", *parameters]
        write_csv(out / "rel_norm_at_labels.csv", rows, comments=comments)
        tables["rel_norm_at_labels"] = rows
    return tables


_TABLES = (
    ("position_probes.csv", "probes", ("token_map", "position_probe", "chance")),
    ("high_norm_counts.csv", "counts", ("norm", "anomaly_score", "detection")),
    ("high_norm_per_image.csv", "per_image", ("norm", "anomaly_score", "detection")),
    ("high_norm_detections.csv", "detections", ("norm", "anomaly_score", "detection")),
    ("similarity.csv", "similarity",
     ("similarity_map", "same_position_similarity", "cross_image_similarity")),
    ("corner_ratio.csv", "corners", ("corner_similarity", "corner_ratio")),
    ("label_comparison.csv", "comparison", ("detection", "matching")),
)  # fmt: skip


def write_table(path: str | Path, rows: list[dict], definitions: Iterable[str] = (),
                parameters: dict | None = None) -> Path:  # fmt: skip
    """Rows as CSV, preceded by ``# name: definition`` and ``# parameter k = v`` lines (read it
    with :func:`read_table` or ``pandas.read_csv(path, comment="#")``)."""
    comments = [f"{key}: {DEFINITIONS[key]}" for key in definitions]
    comments += [f"parameter {key} = {value}" for key, value in (parameters or {}).items()]
    return write_csv(path, rows, comments=comments)


def read_table(path: str | Path) -> list[dict]:
    """Rows of a table written by :func:`write_table` (comment lines skipped; values as text)."""
    return read_csv(path)


def write_results(out: Path, tables: Tables, arrays: dict[str, dict[str, np.ndarray]],
                  parameters: dict, figures: list[Path], corner: bool) -> dict:  # fmt: skip
    """The tables, ``norm_maps.npz``, ``similarity_maps.npz`` and ``summary.json``; returns the
    summary."""
    for name, attribute, definitions in _TABLES:
        rows = getattr(tables, attribute)
        if attribute == "corners" and not corner:
            continue
        if attribute == "comparison" and not rows:
            continue
        write_table(out / name, rows, definitions, parameters)
    for name, values in arrays.items():
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **values)
        write_bytes(out / f"{name}.npz", buffer.getvalue())
    summary = {
        "definitions": DEFINITIONS,
        "parameters": parameters,
        "position_probes": tables.probes,
        "corner_ratio": tables.corners,
        "high_norm": tables.counts,
        "similarity": tables.similarity,
        "label_comparison": tables.comparison,
        "figures": [str(f) for f in figures],
    }
    write_json(out / "summary.json", summary)
    return summary


def _rows_of(noise: str, condition: str):
    return lambda rows: [r for r in rows if r["noise"] == noise and r["condition"] == condition]


def write_figures(out: Path, views: dict, tables: Tables, images: np.ndarray | None,
                  shown: list[int], config: AnomalyConfig) -> list[Path]:  # fmt: skip
    """One figure per measurement and (noise, condition)."""
    figures = []
    for (noise, condition), view in views.items():
        tag, title = f"{noise}_{condition}", f"{noise}, {condition}"
        picked = _rows_of(noise, condition)
        figures.append(plot_probe_accuracy(picked(tables.probes), out / f"probe_accuracy_{tag}.png",
                                           f"position probes ({title})"))  # fmt: skip
        if config.corner:
            figures.append(plot_corner_ratio(picked(tables.corners),
                                             out / f"corner_ratio_{tag}.png",
                                             f"corner ratio ({title})"))  # fmt: skip
        if not shown:
            continue
        figures.append(plot_norm_overlays(
            images, view["norms"], view["found"], out / f"norm_maps_{tag}.png", shown,
            config.group, f"token norms, threshold {config.threshold} x {config.reference} "
            f"({title})"))  # fmt: skip
        figures.append(plot_similarity_maps(images, view["sims"], view["queries"],
                                            out / f"similarity_maps_{tag}.png", shown,
                                            f"cosine to the query token ({title})"))  # fmt: skip
    return figures


def summary_lines(summary: dict) -> list[str]:
    """A short text table: per (site, noise, condition) the exact row/col probe accuracy with
    chance, the corner ratio and the high-norm detections."""
    exact = {}
    for r in summary["position_probes"]:
        if r["binning"] == "exact":
            exact[(r["site"], r["noise"], r["condition"], r["axis"])] = r
    corners = {(r["site"], r["noise"], r["condition"]): r["ratio"] for r in summary["corner_ratio"]}
    width = max([len(r["site"]) for r in summary["high_norm"]] + [4])
    lines = [
        f"{'site'.ljust(width)}  noise    grid    row acc (chance)  col acc (chance)  corner ratio  high-norm groups"
    ]
    for r in summary["high_norm"]:
        key = (r["site"], r["noise"], r["condition"])
        row, col = exact[(*key, "row")], exact[(*key, "col")]
        ratio = corners.get(key)
        lines.append(
            f"{r['site'].ljust(width)}  {r['noise']:<7}  {r['grid']:<6}  {row['accuracy']:.2f} ({row['chance']:.2f})"
            f"       {col['accuracy']:.2f} ({col['chance']:.2f})       "
            f"{'-' if ratio is None else f'{ratio:.2f}':>5}         {r['detections']} in {r['images_with_detections']}/{r['images']} images"
        )
    return lines
