"""The alignment stages: read extraction runs over a THINGS root, average item features per
concept and score every (site, noise level, condition) with the pure functions of
:mod:`diffprobe.analysis.alignment` and :mod:`diffprobe.analysis.probing`; write tables and
figures into a claimed output folder (``diffprobe align | probe | regress``, ``make demo``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffprobe.analysis.alignment import (
    CHANCE,
    AlignmentError,
    check_metric,
    check_ties,
    cka_matrix,
    concept_means,
    human_similarity,
    normalised_score,
    ooo_correct,
    parse_reduction,
    pca_project,
    reduce_items,
    restrict_triplets,
    rsa,
    similarity_matrix,
)
from diffprobe.data.things import validate_triplets
from diffprobe.errors import did_you_mean
from diffprobe.extract.store import StoreError
from diffprobe.io import claim_output, write_csv
from diffprobe.report.alignment import (
    feature_set_label,
    plot_accuracy_heatmap,
    plot_accuracy_vs_noise,
    plot_cka,
)

log = logging.getLogger(__name__)

ALIGN_KIND = "align"


def _noise_value(entry: dict) -> tuple[str, float]:
    if entry.get("noise_level") is not None:
        return "noise_level", float(entry["noise_level"])
    return "timestep", float(entry["timestep"])


def run_concept_features(
    run,
    site: str,
    noise: str,
    condition: str,
    item_concepts: np.ndarray,
    n_concepts: int,
    reduction: str = "mean",
    block_items: int = 256,
    warn: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Concept features of one (site, noise, condition) of a run: item features are read in
    blocks, reduced by ``reduction`` (see :func:`reduce_items`, applied only to unpooled
    features) and averaged per concept. Returns ((concepts, dims), counts (concepts,)).

    Items whose features hold NaN or infinity (a damaged store) are left out of the averages,
    with a warning (``warn``) that counts them; ``counts`` counts the items averaged, and a
    concept left without one has count 0 and a NaN row. When no item of a concept is finite,
    :class:`AlignmentError`."""

    if not run.complete:
        raise StoreError(
            f"run {run.root} is incomplete; run the same extract command again to finish it"
        )
    array = run.array(site, noise, condition)
    where = f"site {site}, noise {noise}, condition {condition} of run {run.root}"
    item_concepts = np.asarray(item_concepts)
    sums, counts = None, np.zeros(n_concepts, dtype=np.int64)
    non_finite = 0
    for start in range(0, array.shape[0], block_items):
        stop = min(start + block_items, array.shape[0])
        concepts = item_concepts[start:stop]
        if not (concepts >= 0).any():
            continue
        try:
            stored = np.asarray(array[start:stop])
        except Exception as err:  # noqa: BLE001 - zarr raises many kinds for damaged chunks
            raise StoreError(
                f"cannot read items {start}-{stop - 1} at {where} ({type(err).__name__}: "
                f"{' '.join(str(err).split())}); its features.zarr is damaged: extract again "
                "into a new folder"
            ) from None
        block = reduce_items(stored, reduction)
        finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        non_finite += int((~finite & (concepts >= 0)).sum())
        means, block_counts = concept_means(block, np.where(finite, concepts, -1), n_concepts)
        block_sums = np.nan_to_num(means) * block_counts[:, None]
        sums = block_sums if sums is None else sums + block_sums
        counts += block_counts
    if sums is None:
        raise AlignmentError(f"no item of run {run.root} belongs to a concept")
    if non_finite and not counts.any():
        raise AlignmentError(
            f"every item at {where} holds NaN or infinite features ({non_finite} items); the "
            "store is damaged or the model diverged: extract again (e.g. with --dtype fp32)"
        )
    if non_finite and warn:
        had = np.bincount(item_concepts[item_concepts >= 0], minlength=n_concepts) > 0
        log.warning(
            "%s: %d of %d items hold NaN or infinite features and are left out of the concept "
            "averages (%d concepts keep no item)",
            where,
            non_finite,
            int((item_concepts >= 0).sum()),
            int((had & (counts == 0)).sum()),
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None], counts


def _select(run, what: str, wanted: Sequence[str] | None, available: list[str]) -> list[str]:
    if not wanted:
        return available
    missing = [w for w in wanted if w not in available]
    if missing:
        close = did_you_mean(missing[0], available, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise AlignmentError(
            f"{what} '{missing[0]}' is not in run {run.root}; {hint}it has {', '.join(available)}"
        )
    return [a for a in available if a in wanted]


def load_concept_features(
    run,
    things,
    *,
    sites: Sequence[str] | None = None,
    noises: Sequence[str] | None = None,
    conditions: Sequence[str] | None = None,
    reduction: str = "mean",
    progress: bool = False,
) -> tuple[dict[tuple[str, str, str], np.ndarray], np.ndarray]:
    """Concept features of the selected arrays of one run: ({(site, noise, condition): (covered
    concepts, dims)}, covered (concepts,) bool). ``reduction`` applies to unpooled runs.

    A concept none of whose items has finite features in one of the arrays is left out of all
    of them (with a warning), so every array covers the same concepts."""
    concepts = things.item_concepts(run.manifest)
    unpooled = run.info.get("pooling") == "none"
    item_reduction, components = parse_reduction(reduction) if unpooled else ("mean", None)
    keys = [
        (site, noise, condition)
        for site in _select(run, "site", sites, run.sites)
        for noise in _select(run, "noise", noises, run.noise_keys)
        for condition in _select(run, "condition", conditions, run.conditions)
    ]
    # A second pass only when the first found concepts without finite features: they are
    # left out of every array, and PCA is fitted on the concepts that remain.
    for first_pass in (True, False):
        covered = np.bincount(concepts[concepts >= 0], minlength=things.n_concepts) > 0
        features, lost = {}, np.zeros(things.n_concepts, dtype=bool)
        bar = tqdm(keys, desc="features", unit="array", disable=not progress, file=sys.stderr)
        for key in bar:
            values, counts = run_concept_features(
                run, *key, concepts, things.n_concepts, item_reduction, warn=first_pass
            )
            lost |= covered & (counts == 0)
            values = values[covered]
            features[key] = pca_project(values, components) if components else values
        if not lost.any():
            break
        _leave_out_concepts(lost, covered, [concepts], things)
    return features, covered


def _leave_out_concepts(
    lost: np.ndarray, covered: np.ndarray, item_concepts: list[np.ndarray], things
) -> None:
    """Mark the items of the ``lost`` concepts (bool (concepts,)) as belonging to none
    (-1, in place), and say so; :class:`AlignmentError` when no ``covered`` concept remains."""
    if not (covered & ~lost).any():
        raise AlignmentError(
            "no concept has an item with finite features in every selected array (the others "
            "hold NaN or infinity); the store is damaged: extract again"
        )
    names = [things.unique_ids[i] for i in np.flatnonzero(lost)]
    log.warning(
        "%d concepts have no item with finite features in some array and are left out of every "
        "array, with the triplets that use them: %s",
        len(names),
        ", ".join(names[:10]) + (", ..." if len(names) > 10 else ""),
    )
    for concepts in item_concepts:
        concepts[(concepts >= 0) & lost[np.maximum(concepts, 0)]] = -1


@dataclass
class AlignmentResult:
    """Rows (one dict per run × site × noise × condition × reduction × metric) and the concept
    features they were computed from, keyed like the rows, over the ``covered`` concepts."""

    rows: list[dict]
    features: dict[tuple, np.ndarray] = field(default_factory=dict)
    covered: np.ndarray | None = None
    triplets: np.ndarray | None = None


def align_run(
    runs,
    things,
    *,
    triplets: str | Path | np.ndarray = "test",
    metrics: Sequence[str] = ("cosine",),
    reductions: Sequence[str] | None = None,
    pca: int | None = None,
    sites: Sequence[str] | None = None,
    noises: Sequence[str] | None = None,
    conditions: Sequence[str] | None = None,
    ceiling: float | None = None,
    ties: str = "strict",
    progress: bool = True,
) -> AlignmentResult:
    """OOO accuracy, ceiling, normalised score and RSA for every (site, noise, condition) of one
    run or several (``runs``: a Run or a list of Runs over the same THINGS concepts).

    ``reductions`` apply to runs stored unpooled (default ``mean``); a pooled run is used as
    stored and its rows name its pooling. ``sites``, ``noises`` (keys such as ``p0.1``) and
    ``conditions`` select arrays (default: all). Concepts without items are left out, with the
    triplets that use them, and so are concepts with no item whose features are finite in
    every array (a damaged store; with a warning). ``ceiling`` overrides the THINGS root's.
    ``ties``: ``strict`` or ``glocal`` (see :func:`diffprobe.analysis.alignment.ooo_correct`).
    """
    for metric in metrics:
        check_metric(metric)
    check_ties(ties)
    run_list = list(runs) if isinstance(runs, list | tuple) else [runs]
    if isinstance(triplets, np.ndarray):
        chosen = validate_triplets(triplets, things.n_concepts)
    else:
        chosen = things.get_triplets(triplets)
    ceiling = things.ceiling if ceiling is None else ceiling
    item_concepts = [things.item_concepts(run.manifest) for run in run_list]
    # A second pass only when the first found concepts without an item with finite features in
    # some array: they are left out of every array, so all rows score the same triplets.
    for first_pass in (True, False):
        rows, features, covered, used, lost = _align_pass(
            run_list, things, item_concepts, chosen, metrics, reductions, pca, sites, noises,
            conditions, ceiling, progress, warn=first_pass, ties=ties,
        )  # fmt: skip
        if not lost.any():
            break
        _leave_out_concepts(lost, covered, item_concepts, things)
    if len(used) < len(chosen):
        log.warning(
            "%d of %d concepts have items; %d of %d triplets use only those and are scored",
            int(covered.sum()),
            things.n_concepts,
            len(used),
            len(chosen),
        )
    return AlignmentResult(rows, features, covered, used)


def _align_pass(
    run_list, things, item_concepts, chosen, metrics, reductions, pca, sites, noises, conditions,
    ceiling, progress, warn, ties="strict",
):  # fmt: skip
    """Rows and features of :func:`align_run` over the concepts that ``item_concepts`` (one
    array (items,) per run) cover, and the covered concepts that lost every item to NaN or
    infinite features in some array (then rows and features are incomplete)."""
    covered = np.ones(things.n_concepts, dtype=bool)
    for concepts in item_concepts:
        covered &= np.bincount(concepts[concepts >= 0], minlength=things.n_concepts) > 0
    if not covered.any():
        raise AlignmentError("no concept has items in every run")
    used = restrict_triplets(chosen, covered)
    if len(used) == 0:
        raise AlignmentError(
            f"none of the {len(chosen)} triplets uses only the {int(covered.sum())} concepts "
            "the runs have items for; extract from all the concepts the triplets use"
        )
    human = human_similarity(used, int(covered.sum()))

    jobs = []
    names = [run.root.name for run in run_list]
    if len(set(names)) < len(names):
        names = [str(run.root) for run in run_list]
    for name, run, concepts in zip(names, run_list, item_concepts, strict=True):
        unpooled = run.info.get("pooling") == "none"
        run_reductions = (
            list(reductions or ["mean"]) if unpooled else [run.info.get("pooling", "mean")]
        )
        if unpooled:
            for reduction in run_reductions:
                parse_reduction(reduction)
        elif reductions:
            log.warning(
                "run %s is stored with pooling %r; --reduce applies only to runs extracted "
                "with pooling none",
                run.root,
                run.info.get("pooling"),
            )
        chosen_sites = _select(run, "site", sites, run.sites)
        chosen_noise = _select(run, "noise", noises, run.noise_keys)
        chosen_conditions = _select(run, "condition", conditions, run.conditions)
        for site in chosen_sites:
            for entry in run.info["noise"]:
                if entry["key"] not in chosen_noise:
                    continue
                for condition in chosen_conditions:
                    for reduction in run_reductions:
                        jobs.append(
                            (name, run, concepts, site, entry, condition, reduction, unpooled)
                        )

    rows, features = [], {}
    lost = np.zeros(things.n_concepts, dtype=bool)
    bar = tqdm(jobs, desc="align", unit="array", disable=not progress, file=sys.stderr)
    for name, run, concepts, site, entry, condition, reduction, unpooled in bar:
        item_reduction, components = parse_reduction(reduction) if unpooled else ("mean", None)
        values, counts = run_concept_features(
            run, site, entry["key"], condition, concepts, things.n_concepts, item_reduction,
            warn=warn,
        )  # fmt: skip
        lost |= covered & (counts == 0)
        if lost.any():
            continue  # this pass only looks for more such concepts; the next one scores
        values = values[covered]
        if components:
            values = pca_project(values, components)
        key = (name if len(run_list) > 1 else "", site, entry["key"], condition, reduction)
        features[key] = values.astype(np.float32)
        axis, level = _noise_value(entry)
        for metric in metrics:
            projected = pca_project(values, pca) if pca else values
            similarity = similarity_matrix(projected, metric)
            accuracy = float(ooo_correct(similarity, used, ties).mean())
            rows.append(
                {
                    "run": name,
                    "site": site,
                    "noise": entry["key"],
                    axis: level,
                    "timestep": entry.get("timestep"),
                    "condition": condition,
                    "reduction": reduction,
                    "metric": metric,
                    "pca": pca or "",
                    "ties": ties,
                    "accuracy": accuracy,
                    "ceiling": ceiling if ceiling is not None else float("nan"),
                    "chance": CHANCE,
                    "normalised": normalised_score(accuracy, ceiling),
                    "rsa": rsa(similarity, human),
                    "triplets": len(used),
                    "concepts": int(covered.sum()),
                }
            )
    return rows, features, covered, used, lost


# ------------------------------------------------------------------------------ outputs

ROW_COLUMNS = (
    "run",
    "site",
    "noise",
    "noise_level",
    "timestep",
    "condition",
    "reduction",
    "metric",
    "pca",
    "ties",
    "accuracy",
    "ceiling",
    "chance",
    "normalised",
    "rsa",
    "triplets",
    "concepts",
)


def _columns(rows: list[dict]) -> list[str]:
    """The row keys, :data:`ROW_COLUMNS` first in their order, the others as they come."""
    present = {k for row in rows for k in row}
    columns = [c for c in ROW_COLUMNS if c in present]
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def write_outputs(result: AlignmentResult, out: str | Path, cka: bool = True) -> dict[str, Path]:
    """``alignment.csv``, ``accuracy_heatmap.png``, ``accuracy_vs_noise.png`` and, with ``cka``,
    ``cka.csv`` + ``cka_heatmap.png`` (between all feature sets of the result) into the
    alignment folder ``out`` (claimed: new, empty, or an earlier alignment)."""
    out = claim_output(out, ALIGN_KIND)
    paths = {
        "alignment_csv": write_csv(out / "alignment.csv", result.rows, _columns(result.rows)),
        "heatmap": plot_accuracy_heatmap(result.rows, out / "accuracy_heatmap.png"),
        "accuracy_vs_noise": plot_accuracy_vs_noise(result.rows, out / "accuracy_vs_noise.png"),
    }
    if cka and len(result.features) > 1:
        keys = list(result.features)
        matrix = cka_matrix([result.features[k] for k in keys])
        labels = [feature_set_label(k) for k in keys]
        pairs = [
            {"a": labels[i], "b": labels[j], "cka": float(matrix[i, j])}
            for i in range(len(keys))
            for j in range(len(keys))
        ]
        paths["cka_csv"] = write_csv(out / "cka.csv", pairs, ["a", "b", "cka"])
        paths["cka_heatmap"] = plot_cka(matrix, keys, out / "cka_heatmap.png")
    return paths


def summary_table(rows: list[dict], limit: int = 12) -> str:
    """A short text table of the best rows by accuracy (run, reduction and metric columns only
    where they vary)."""
    extra = [c for c in ("run", "reduction", "metric") if len({r.get(c) for r in rows}) > 1]
    best = sorted(rows, key=lambda r: -r["accuracy"])[:limit]
    site_width = max([len(r["site"]) for r in best] + [4])
    header = [f"{'site':<{site_width}}", f"{'noise':>7}", f"{'condition':<12}"]
    header += [f"{c:<10}" for c in extra] + [
        f"{'accuracy':>8}",
        f"{'normalised':>10}",
        f"{'rsa':>6}",
    ]
    lines = [" ".join(header)]
    for row in best:
        cells = [f"{row['site']:<{site_width}}", f"{row['noise']:>7}", f"{row['condition']:<12}"]
        cells += [f"{str(row.get(c)):<10}" for c in extra]
        cells += [f"{row['accuracy']:>8.3f}", f"{row['normalised']:>10.3f}", f"{row['rsa']:>6.3f}"]
        lines.append(" ".join(cells))
    return "\n".join(lines)
