"""Human alignment: THINGS odd-one-out accuracy, RSA, linear CKA and feature reductions.

Pure functions over numpy arrays of concept features ``(concepts, dims)`` and triplets
``(triplets, 3)`` of 0-based concept indices whose column 2 is the odd one out chosen by people
(columns 0 and 1 the most similar pair):

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

Reading a run and scoring every (site, noise level, condition) is
:func:`diffprobe.stages.align.align_run`; the figures are in :mod:`diffprobe.report.alignment`.
See docs/alignment.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffprobe.errors import DiffprobeError

__all__ = [
    "CHANCE",
    "SIMILARITIES",
    "AlignmentError",
    "cka_matrix",
    "concept_means",
    "human_similarity",
    "linear_cka",
    "normalised_score",
    "ooo_accuracy",
    "ooo_correct",
    "pca_project",
    "reduce_items",
    "restrict_triplets",
    "rsa",
    "similarity_matrix",
]

CHANCE = 1 / 3
SIMILARITIES = ("cosine", "euclidean", "dot")
TIE_RULES = ("strict", "glocal")
ITEM_REDUCTIONS = ("mean", "max", "flatten")


class AlignmentError(DiffprobeError):
    pass


# ------------------------------------------------------------------------------ odd-one-out


def check_metric(metric: str) -> None:
    if metric not in SIMILARITIES:
        raise AlignmentError(
            f"unknown similarity {metric!r}; expected one of {', '.join(SIMILARITIES)}"
        )


def similarity_matrix(features: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """(concepts, concepts) float64 similarity of concept features (concepts, dims).

    ``dot``: inner product. ``cosine``: inner product over the product of norms (NaN for a zero
    vector). ``euclidean``: minus the squared distance (the same order as minus the distance).
    """
    check_metric(metric)
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


def check_ties(ties: str) -> None:
    if ties not in TIE_RULES:
        raise AlignmentError(f"unknown tie rule {ties!r}; expected one of {', '.join(TIE_RULES)}")


def ooo_correct(similarity: np.ndarray, triplets: np.ndarray, ties: str = "strict") -> np.ndarray:
    """Per triplet: True when the pair (column 0, column 1) is the most similar of the three
    pairs under ``similarity`` (concepts, concepts). ``ties="strict"``: strictly the most similar
    (any tie is False); ``"glocal"``: at least as similar as both others, unless all three are
    equal (gLocal's ``argmin``, the people's pair listed first). NaNs are False. (triplets,)."""
    check_ties(ties)
    triplets = np.asarray(triplets, dtype=np.int64)
    n = similarity.shape[0]
    flat = np.ascontiguousarray(similarity).ravel()
    first, second, third = triplets[:, 0], triplets[:, 1], triplets[:, 2]
    kept = flat[first * n + second]
    other_a, other_b = flat[first * n + third], flat[second * n + third]
    if ties == "strict":
        return (kept > other_a) & (kept > other_b)
    all_equal = (kept == other_a) & (kept == other_b)
    return (kept >= other_a) & (kept >= other_b) & ~all_equal


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
    ties: str = "strict",
) -> float:
    """Odd-one-out accuracy of concept features (concepts, dims) on triplets (triplets, 3) whose
    column 2 is the people's odd one out; ties by ``ties`` (see :func:`ooo_correct`). ``pca``:
    project on that many principal components (fitted on all concept features) first."""
    if len(triplets) == 0:
        raise AlignmentError("no triplets to score")
    values = pca_project(features, pca) if pca else features
    return float(ooo_correct(similarity_matrix(values, metric), triplets, ties).mean())


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
