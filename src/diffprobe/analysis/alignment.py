"""Human alignment: THINGS odd-one-out accuracy, RSA, linear CKA and feature reductions.

The analyses are pure functions over numpy arrays of concept features ``(concepts, dims)`` and
triplets ``(triplets, 3)`` of 0-based concept indices whose column 2 is the odd one out chosen by
people (columns 0 and 1 the most similar pair):

- :func:`ooo_accuracy`: the fraction of triplets where the model's most similar pair is the
  people's pair, with ``cosine`` (default), ``euclidean`` or ``dot`` similarity; a tie for the
  most similar pair counts as wrong, and so does a NaN similarity (a zero-norm feature vector
  under cosine); optional PCA fitted on all concept features. Vectorised: one similarity matrix,
  three gathers.
- :func:`normalised_score`: ``(accuracy - 1/3) / (ceiling - 1/3)``; chance is 1/3.
- :func:`human_similarity` and :func:`rsa`: the pair similarity implied by the triplets (how
  often a pair was kept together when shown) and its Spearman correlation with a model's.
- :func:`linear_cka` and :func:`cka_matrix`: linear CKA between feature sets of the same concepts.
- :func:`reduce_items`: pooling of unpooled features (``mean``, ``max``, ``flatten``; ``pca-K``
  is ``flatten`` followed by PCA on the concept features).

The run glue (:func:`run_concept_features`, :func:`align_run`) reads an extraction run, averages
item features per concept and applies the analyses over every (site, noise level, condition);
:func:`demo` is the ``make demo`` stage. See docs/alignment.md.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffprobe.data.things import validate_triplets
from diffprobe.data.things_export import noise_ceiling
from diffprobe.errors import DiffprobeError, did_you_mean

log = logging.getLogger(__name__)

__all__ = [
    "CHANCE",
    "SIMILARITIES",
    "AlignmentError",
    "AlignmentResult",
    "align_run",
    "cka_matrix",
    "concept_means",
    "demo",
    "human_similarity",
    "linear_cka",
    "load_concept_features",
    "noise_ceiling",
    "normalised_score",
    "ooo_accuracy",
    "ooo_correct",
    "pca_project",
    "reduce_items",
    "restrict_triplets",
    "rsa",
    "run_concept_features",
    "similarity_matrix",
]

CHANCE = 1 / 3
SIMILARITIES = ("cosine", "euclidean", "dot")
ITEM_REDUCTIONS = ("mean", "max", "flatten")


class AlignmentError(DiffprobeError):
    pass


# ------------------------------------------------------------------------------ odd-one-out


def _check_metric(metric: str) -> None:
    if metric not in SIMILARITIES:
        raise AlignmentError(
            f"unknown similarity {metric!r}; expected one of {', '.join(SIMILARITIES)}"
        )


def similarity_matrix(features: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """(concepts, concepts) float64 similarity of concept features (concepts, dims).

    ``dot``: inner product. ``cosine``: inner product over the product of norms (NaN for a zero
    vector). ``euclidean``: minus the squared distance (the same order as minus the distance).
    """
    _check_metric(metric)
    values = np.asarray(features, dtype=np.float64)
    if values.ndim != 2:
        raise AlignmentError(f"features must be (concepts, dims), got shape {values.shape}")
    gram = values @ values.T
    if metric == "dot":
        return gram
    squared = np.einsum("ij,ij->i", values, values)
    if metric == "cosine":
        norms = np.sqrt(squared)
        with np.errstate(divide="ignore", invalid="ignore"):
            return gram / norms[:, None] / norms[None, :]
    return -np.maximum(squared[:, None] + squared[None, :] - 2 * gram, 0.0)


def ooo_correct(similarity: np.ndarray, triplets: np.ndarray) -> np.ndarray:
    """Per triplet: True when the pair (column 0, column 1) is strictly the most similar of the
    three pairs under ``similarity`` (concepts, concepts); ties and NaNs are False. (triplets,)."""
    triplets = np.asarray(triplets, dtype=np.int64)
    n = similarity.shape[0]
    flat = np.ascontiguousarray(similarity).ravel()
    first, second, third = triplets[:, 0], triplets[:, 1], triplets[:, 2]
    kept = flat[first * n + second]
    return (kept > flat[first * n + third]) & (kept > flat[second * n + third])


def pca_project(features: np.ndarray, components: int) -> np.ndarray:
    """Features (concepts, dims) projected on their first ``components`` principal axes, fitted
    on all rows: (concepts, min(components, concepts, dims))."""
    if components < 1:
        raise AlignmentError(f"PCA needs at least one component, got {components}")
    values = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    centred = values - values.mean(0)
    keep = min(components, *centred.shape)
    if centred.shape[1] > centred.shape[0]:
        # Wide features (e.g. flattened maps): the eigenvectors of the (concepts, concepts) Gram
        # matrix give the projections directly, far cheaper than an SVD of the wide matrix.
        eigenvalues, eigenvectors = np.linalg.eigh(centred @ centred.T)
        order = np.argsort(eigenvalues)[::-1][:keep]
        return eigenvectors[:, order] * np.sqrt(np.maximum(eigenvalues[order], 0.0))
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    return centred @ axes[:keep].T


def ooo_accuracy(
    features: np.ndarray,
    triplets: np.ndarray,
    metric: str = "cosine",
    pca: int | None = None,
) -> float:
    """Odd-one-out accuracy of concept features (concepts, dims) on triplets (triplets, 3) whose
    column 2 is the people's odd one out; ties count as wrong. ``pca``: project on that many
    principal components (fitted on all concept features) first."""
    if len(triplets) == 0:
        raise AlignmentError("no triplets to score")
    values = pca_project(features, pca) if pca else features
    return float(ooo_correct(similarity_matrix(values, metric), triplets).mean())


def normalised_score(accuracy: float, ceiling: float | None, chance: float = CHANCE) -> float:
    """``(accuracy - chance) / (ceiling - chance)``: 0 at chance, 1 at the noise ceiling; NaN
    without a ceiling."""
    if ceiling is None or not np.isfinite(ceiling):
        return float("nan")
    if ceiling <= chance:
        raise AlignmentError(f"noise ceiling {ceiling} is not above chance {chance}")
    return float((accuracy - chance) / (ceiling - chance))


# ------------------------------------------------------------------------------ RSA and CKA


def human_similarity(triplets: np.ndarray, n_concepts: int) -> np.ndarray:
    """Similarity implied by odd-one-out triplets: for each pair, the fraction of the triplets
    showing both in which neither was the odd one out. (concepts, concepts), symmetric, NaN for
    pairs never shown together and on the diagonal."""
    triplets = np.asarray(triplets, dtype=np.int64)
    first, second, odd = triplets[:, 0], triplets[:, 1], triplets[:, 2]

    def pair_index(a, b):
        return np.minimum(a, b) * n_concepts + np.maximum(a, b)

    size = n_concepts * n_concepts
    kept = np.bincount(pair_index(first, second), minlength=size)
    shown = (
        kept
        + np.bincount(pair_index(first, odd), minlength=size)
        + np.bincount(pair_index(second, odd), minlength=size)
    )
    kept = kept.reshape(n_concepts, n_concepts)
    shown = shown.reshape(n_concepts, n_concepts)
    kept, shown = kept + kept.T, shown + shown.T
    similarity = np.full((n_concepts, n_concepts), np.nan)
    np.divide(kept, shown, out=similarity, where=shown > 0)
    np.fill_diagonal(similarity, np.nan)
    return similarity


def rsa(model_similarity: np.ndarray, human: np.ndarray) -> float:
    """Spearman correlation between the upper triangles of two (concepts, concepts) similarity
    matrices, over the pairs finite in both."""
    from scipy.stats import rankdata

    rows, cols = np.triu_indices(human.shape[0], 1)
    a, b = model_similarity[rows, cols], human[rows, cols]
    finite = np.isfinite(a) & np.isfinite(b)
    if finite.sum() < 3:
        return float("nan")
    ranked_a, ranked_b = rankdata(a[finite]), rankdata(b[finite])
    if ranked_a.std() == 0 or ranked_b.std() == 0:
        return float("nan")
    return float(np.corrcoef(ranked_a, ranked_b)[0, 1])


def _centred_gram(features: np.ndarray, dtype=np.float64) -> np.ndarray:
    values = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    values = values - values.mean(0)
    gram = (values @ values.T).astype(dtype)
    norm = np.linalg.norm(gram)
    return gram / norm if norm > 0 else gram


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between two feature sets of the same rows, (n, dx) and (n, dy): 1 for features
    equal up to rotation and isotropic scaling, near 0 for unrelated ones."""
    if len(x) != len(y):
        raise AlignmentError(
            f"CKA needs the same rows in both feature sets, got {len(x)} and {len(y)}"
        )
    return float(np.sum(_centred_gram(x) * _centred_gram(y)))


def cka_matrix(feature_sets: Sequence[np.ndarray]) -> np.ndarray:
    """Linear CKA between every two of ``feature_sets`` (each (n, dims_i), the same rows):
    (sets, sets). Memory: sets × n² floats (float32 when that exceeds 2**27)."""
    if not feature_sets:
        return np.zeros((0, 0))
    n = len(feature_sets[0])
    dtype = np.float64 if len(feature_sets) * n * n <= 2**27 else np.float32
    stacked = np.stack([_centred_gram(f, dtype).ravel() for f in feature_sets])
    return np.clip(stacked @ stacked.T, 0.0, 1.0).astype(np.float64)


# ------------------------------------------------------------------------------ reductions


def parse_reduction(name: str) -> tuple[str, int | None]:
    """``mean`` | ``max`` | ``flatten`` | ``pca-K`` -> (item reduction, PCA components)."""
    if name in ITEM_REDUCTIONS:
        return name, None
    if name.startswith("pca-"):
        try:
            components = int(name[4:])
        except ValueError:
            components = 0
        if components > 0:
            return "flatten", components
    raise AlignmentError(
        f"unknown reduction {name!r}; expected mean, max, flatten or pca-K (e.g. pca-64)"
    )


def reduce_items(values: np.ndarray, method: str) -> np.ndarray:
    """Reduce unpooled item features to (items, dims).

    (items, channels, height, width) maps and (items, tokens, channels) sequences: ``mean`` and
    ``max`` pool over space / tokens, ``flatten`` keeps everything. (items, dims) features are
    returned unchanged (already pooled).
    """
    values = np.asarray(values)
    if method not in ITEM_REDUCTIONS:
        raise AlignmentError(
            f"unknown item reduction {method!r}; expected one of {ITEM_REDUCTIONS}"
        )
    if values.ndim <= 2 or method == "flatten":
        return values.reshape(len(values), -1)
    axes = (2, 3) if values.ndim == 4 else (1,)
    if values.ndim not in (3, 4):
        raise AlignmentError(f"cannot pool features of shape {values.shape}")
    return values.mean(axis=axes) if method == "mean" else values.max(axis=axes)


def concept_means(
    features: np.ndarray, item_concepts: np.ndarray, n_concepts: int
) -> tuple[np.ndarray, np.ndarray]:
    """Average item features (items, dims) per concept: ((concepts, dims) float64 with NaN rows
    for concepts without items, counts (concepts,)). Items with concept -1 are left out."""
    item_concepts = np.asarray(item_concepts, dtype=np.int64)
    features = np.asarray(features).reshape(len(features), -1)
    sums = np.zeros((n_concepts, features.shape[1]), dtype=np.float64)
    keep = np.flatnonzero(item_concepts >= 0)
    order = keep[np.argsort(item_concepts[keep], kind="stable")]
    if len(order):
        grouped = item_concepts[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        sums[grouped[starts]] = np.add.reduceat(features[order].astype(np.float64), starts, axis=0)
    counts = np.bincount(item_concepts[keep], minlength=n_concepts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None], counts


def restrict_triplets(triplets: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Triplets whose three concepts are all ``covered`` (bool (concepts,)), re-indexed to the
    covered concepts in order: (kept, 3)."""
    covered = np.asarray(covered, dtype=bool)
    compact = np.cumsum(covered) - 1
    keep = covered[triplets].all(axis=1)
    return compact[triplets[keep]]


# ------------------------------------------------------------------------------ runs


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
    from diffprobe.extract.store import StoreError

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
    from tqdm.auto import tqdm

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


def _key_label(key: tuple) -> str:
    run, site, noise, condition, reduction = key
    parts = [run] if run else []
    parts += [site, noise]
    if condition:
        parts.append(condition)
    if reduction:
        parts.append(reduction)
    return " ".join(parts)


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
    progress: bool = True,
) -> AlignmentResult:
    """OOO accuracy, ceiling, normalised score and RSA for every (site, noise, condition) of one
    run or several (``runs``: a Run or a list of Runs over the same THINGS concepts).

    ``reductions`` apply to runs stored unpooled (default ``mean``); a pooled run is used as
    stored and its rows name its pooling. ``sites``, ``noises`` (keys such as ``p0.1``) and
    ``conditions`` select arrays (default: all). Concepts without items are left out, with the
    triplets that use them, and so are concepts with no item whose features are finite in
    every array (a damaged store; with a warning). ``ceiling`` overrides the THINGS root's.
    """
    for metric in metrics:
        _check_metric(metric)
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
            conditions, ceiling, progress, warn=first_pass,
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
    ceiling, progress, warn,
):  # fmt: skip
    """Rows and features of :func:`align_run` over the concepts that ``item_concepts`` (one
    array (items,) per run) cover, and the covered concepts that lost every item to NaN or
    infinite features in some array (then rows and features are incomplete)."""
    from tqdm.auto import tqdm

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
            accuracy = float(ooo_correct(similarity, used).mean())
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
    "accuracy",
    "ceiling",
    "chance",
    "normalised",
    "rsa",
    "triplets",
    "concepts",
)


def write_csv(rows: Iterable[dict], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Write dict rows as CSV atomically (temporary file, then rename)."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        present = {k for row in rows for k in row}
        columns = [c for c in ROW_COLUMNS if c in present]
        for row in rows:
            columns += [k for k in row if k not in columns]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _format(v) for k, v in row.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _format(value):
    if isinstance(value, float | np.floating):
        return f"{float(value):.6g}"
    return value


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


def _save_figure(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def plot_accuracy_heatmap(rows: list[dict], path: str | Path, value: str = "accuracy") -> Path:
    """Heatmap of ``value`` by site (rows) × noise level (columns), one panel per (run,
    condition, reduction, metric), all panels on one colour scale so that they compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    figure, axes = plt.subplots(
        len(groups),
        1,
        squeeze=False,
        figsize=(
            1.2 + 0.9 * max(len(_noise_axis(r)[1]) for r in groups.values()),
            0.6 + 0.45 * sum(len({x["site"] for x in r}) + 2 for r in groups.values()),
        ),
    )
    values = [r[value] for r in rows if r.get(value) is not None and np.isfinite(r[value])]
    scale = {"vmin": min(values), "vmax": max(values)} if values else {}
    for axis, (key, group) in zip(axes[:, 0], groups.items(), strict=True):
        sites = list(dict.fromkeys(r["site"] for r in group))
        name, noises, levels = _noise_axis(group)
        grid = np.full((len(sites), len(noises)), np.nan)
        for row in group:
            grid[sites.index(row["site"]), noises.index(row["noise"])] = row[value]
        image = axis.imshow(grid, aspect="auto", cmap="viridis", **scale)
        middle = np.mean(list(scale.values())) if scale else np.nanmean(grid)
        for (i, j), cell in np.ndenumerate(grid):
            if np.isfinite(cell):
                axis.text(
                    j,
                    i,
                    f"{cell:.3f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if cell < middle else "black",
                )
        axis.set_xticks(range(len(noises)), [f"{v:g}" for v in levels])
        axis.set_yticks(range(len(sites)), sites, fontsize=8)
        axis.set_xlabel(name.replace("_", " "))
        axis.set_title(
            f"odd-one-out {value}" + (f" ({_group_title(key)})" if _group_title(key) else ""),
            fontsize=9,
        )
        figure.colorbar(image, ax=axis)
    return _save_figure(figure, Path(path))


def plot_accuracy_vs_noise(rows: list[dict], path: str | Path) -> Path:
    """Accuracy against noise level, one line per site, with chance and the noise ceiling; one
    panel per (run, condition, reduction, metric) on a shared accuracy axis, the legend beside
    them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    figure, axes = plt.subplots(len(groups), 1, squeeze=False, sharey=True,
                                figsize=(9.5, 3.6 * len(groups)), layout="constrained")  # fmt: skip
    for axis, (key, group) in zip(axes[:, 0], groups.items(), strict=True):
        name, noises, levels = _noise_axis(group)
        for site in dict.fromkeys(r["site"] for r in group):
            by_noise = {r["noise"]: r["accuracy"] for r in group if r["site"] == site}
            axis.plot(levels, [by_noise.get(n, np.nan) for n in noises], marker="o", label=site)
        axis.axhline(CHANCE, color="grey", linestyle=":", label="chance")
        ceiling = group[0].get("ceiling")
        if ceiling is not None and np.isfinite(ceiling):
            axis.axhline(ceiling, color="black", linestyle="--", label="noise ceiling")
        axis.set_xlabel(name.replace("_", " "))
        axis.set_ylabel("odd-one-out accuracy")
        axis.set_title(_group_title(key) or "odd-one-out accuracy", fontsize=9)
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save_figure(figure, Path(path))


def plot_cka(matrix: np.ndarray, labels: Sequence[str], path: str | Path) -> Path:
    """Heatmap of a linear CKA matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 2 + 0.28 * len(labels)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(matrix, vmin=0, vmax=1, cmap="magma")
    axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    axis.set_yticks(range(len(labels)), labels, fontsize=6)
    axis.set_title("linear CKA")
    figure.colorbar(image, ax=axis)
    return _save_figure(figure, Path(path))


def write_outputs(result: AlignmentResult, out: str | Path, cka: bool = True) -> dict[str, Path]:
    """``alignment.csv``, ``accuracy_heatmap.png``, ``accuracy_vs_noise.png`` and, with ``cka``,
    ``cka.csv`` + ``cka_heatmap.png`` (between all feature sets of the result) into ``out``."""
    out = Path(out)
    paths = {
        "alignment_csv": write_csv(result.rows, out / "alignment.csv"),
        "heatmap": plot_accuracy_heatmap(result.rows, out / "accuracy_heatmap.png"),
        "accuracy_vs_noise": plot_accuracy_vs_noise(result.rows, out / "accuracy_vs_noise.png"),
    }
    if cka and len(result.features) > 1:
        keys = list(result.features)
        matrix = cka_matrix([result.features[k] for k in keys])
        labels = [_key_label(k) for k in keys]
        pairs = [
            {"a": labels[i], "b": labels[j], "cka": float(matrix[i, j])}
            for i in range(len(keys))
            for j in range(len(keys))
        ]
        paths["cka_csv"] = write_csv(pairs, out / "cka.csv", ["a", "b", "cka"])
        paths["cka_heatmap"] = plot_cka(matrix, labels, out / "cka_heatmap.png")
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


# ------------------------------------------------------------------------------ demo


def demo(run_dir: Path, things_root: Path, out: Path, *, folds: int = 3) -> dict:
    """``make demo`` stage: alignment of a run over a THINGS-layout export of the shapes world.

    Writes ``alignment.csv``, ``accuracy_heatmap.png``, ``accuracy_vs_noise.png`` (and the CKA
    heatmap) into ``out``, then on the best (site, noise, condition) a linear probe and a ridge
    regression onto the true factors, ``folds`` folds over objects each, and the regression from
    the best (site, noise) of each condition; prints a short table and returns the numbers
    (``benchmarks/alignment_tiny.py`` runs the same and keeps them as JSON).
    """
    from diffprobe.analysis import probing
    from diffprobe.data.things import SHAPES_FACTOR_NAMES, load_things, shapes_factor_embedding
    from diffprobe.extract.store import open_run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = open_run(run_dir)
    things = load_things(things_root)
    result = align_run(run, things, triplets="test", progress=False)
    paths = write_outputs(result, out)
    best = max(result.rows, key=lambda r: r["accuracy"])
    covered = result.covered
    train = restrict_triplets(things.get_triplets("train"), covered)

    def features_of(row: dict) -> np.ndarray:
        key = ("", row["site"], row["noise"], row["condition"], row["reduction"])
        return result.features[key].astype(np.float64)

    def probe_on(row: dict):
        return probing.probe(features_of(row), train, folds=folds, max_epochs=200, patience=40,
                             seed=0)  # fmt: skip

    probe_result = probe_on(best)
    factors = shapes_factor_embedding(things.concepts)[covered]

    def regress_on(row: dict):
        return probing.regress(
            features_of(row),
            factors,
            folds=folds,
            triplets=result.triplets,
            metric="euclidean",
            target_names=SHAPES_FACTOR_NAMES,
            seed=0,
        )

    regression = regress_on(best)
    # the best (site, noise level) of each condition, and the factors' regression from it: with
    # more than one condition this shows what the conditioning (e.g. the label prompt) adds
    by_condition = {}
    for condition in dict.fromkeys(r["condition"] for r in result.rows):
        top = max(
            (r for r in result.rows if r["condition"] == condition), key=lambda r: r["accuracy"]
        )
        fit = regression if top is best else regress_on(top)
        probed = probe_result if top is best else probe_on(top)
        by_condition[condition] = {
            "site": top["site"], "noise": top["noise"], "accuracy": top["accuracy"],
            "normalised": top["normalised"], "r2": fit.r2_mean, "r2_std": fit.r2_std,
            "r2_by_factor": fit.r2_by_target, "ooo": fit.ooo_mean,
            "probe_zero_shot": probed.zero_shot_mean, "probed": probed.probed_mean,
            "probed_std": probed.probed_std,
            "folds_improved": sum(r["probed"] > r["zero_shot"] for r in probed.rows),
        }  # fmt: skip
    reductions_rows = []
    if run.info.get("pooling") == "none":
        compared = align_run(
            run,
            things,
            triplets="test",
            reductions=["mean", "max", "flatten", "pca-8"],
            progress=False,
        )
        reductions_rows = [
            r
            for r in compared.rows
            if r["site"] == best["site"]
            and r["noise"] == best["noise"]
            and r["condition"] == best["condition"]
        ]
        write_csv(reductions_rows, out / "reductions.csv")
    write_csv(probe_result.rows, out / "probe.csv")
    write_csv(regression.rows, out / "regression.csv")

    print("== alignment (THINGS odd-one-out on the shapes world) ==")
    print(summary_table(result.rows, limit=8))
    ceiling_text = f"{things.ceiling:.3f}" if things.ceiling is not None else "unknown"
    print(
        f"chance {CHANCE:.3f}  noise ceiling {ceiling_text}  "
        f"({len(result.triplets)} test triplets, {int(covered.sum())} concepts)"
    )
    print(
        f"best: {best['site']} at {best['noise']} ({best['condition']}, {best['reduction']}): "
        f"accuracy {best['accuracy']:.3f}, normalised {best['normalised']:.3f}"
    )
    print(
        f"probe ({folds} folds over objects): zero-shot {probe_result.zero_shot_mean:.3f} -> probed "
        f"{probe_result.probed_mean:.3f} ± {probe_result.probed_std:.3f}"
    )
    by_factor = ", ".join(f"{k} {v:.2f}" for k, v in regression.r2_by_target.items())
    print(
        f"regression onto the true factors: R² {regression.r2_mean:.3f} ± {regression.r2_std:.3f} "
        f"({by_factor}), OOO of the prediction {regression.ooo_mean:.3f}"
    )
    if len(by_condition) > 1:
        for condition, top in by_condition.items():
            factor_r2 = ", ".join(f"{k} {v:.2f}" for k, v in top["r2_by_factor"].items())
            print(
                f"  best with condition {condition}: {top['site']} at {top['noise']}, accuracy "
                f"{top['accuracy']:.3f}; probe {top['probe_zero_shot']:.3f} -> {top['probed']:.3f} "
                f"(better in {top['folds_improved']} of {folds} folds); factors R² {top['r2']:.3f} "
                f"({factor_r2})"
            )
    for row in reductions_rows:
        print(f"  reduction {row['reduction']:<8} accuracy {row['accuracy']:.3f}")
    return {
        "rows": result.rows,
        "best": best,
        "best_by_condition": by_condition,
        "ceiling": things.ceiling,
        "probe": {
            "zero_shot": probe_result.zero_shot_mean,
            "probed": probe_result.probed_mean,
            "probed_std": probe_result.probed_std,
            "folds": probe_result.rows,
        },
        "regression": {
            "r2": regression.r2_mean,
            "r2_std": regression.r2_std,
            "r2_by_factor": regression.r2_by_target,
            "ooo": regression.ooo_mean,
            "folds": regression.rows,
        },
        "reductions": reductions_rows,
        "paths": {k: str(v) for k, v in paths.items()},
    }
