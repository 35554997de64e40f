"""Linear probing on odd-one-out triplets and ridge regression onto a target embedding.

Both cross-validate over objects (concepts): the concepts are split into K folds, and a triplet
takes part in a split only when its three concepts all lie in that split, so no concept of a
reported fold is ever seen in training.

**Probe** (diffprobe's default; ``method="glocal"`` gives gLocal's own probe, see
:mod:`diffprobe.analysis.glocal` and docs/alignment.md for every difference): features are
standardised per dimension with the mean and standard deviation of the training concepts,
optionally projected on ``pca`` principal axes, and mapped by a linear transform
``z = x_std @ W + b`` initialised ``W = I/sqrt(d)``, ``b = 0``. The loss is the triplet
cross-entropy: a softmax over the three pair similarities (dot products of ``z``) with the
people's pair (columns 0, 1) as the target, plus ``lam`` times a regulariser, ``frobenius``
(the *squared* norm ``||W||²``; gLocal's is unsquared) or ``identity``
(``||W - mean(diag W)·I||²``, a pull towards a scaled identity); no local contrastive term.
Optimised with full-batch (or minibatch) Adam on the CPU; early stopping on the OOO accuracy
(then loss) of an inner validation split of the training concepts, never on the reported fold.
Each fold reports the zero-shot accuracy (raw features, cosine) and the probed accuracy
(transformed features, dot product) on the same held-out triplets.

**Regression**: ridge (scikit-learn ``RidgeCV`` on standardised features) from features to a
target embedding per fold; R² on the held-out concepts and the odd-one-out accuracy of the
predicted embedding on the held-out triplets.

Transforms are saved as ``.npz`` with ``weights`` (dims_in, dims_out), ``bias`` (dims_out,),
``mean`` and ``std`` (dims_in,), loadable with ``np.load(path, allow_pickle=False)``; apply one
with :meth:`LinearTransform.apply`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from diffprobe.analysis.alignment import AlignmentError, ooo_accuracy

log = logging.getLogger(__name__)

__all__ = [
    "LinearTransform",
    "ProbeResult",
    "RegressionResult",
    "fit_probe",
    "object_folds",
    "probe",
    "regress",
    "triplets_within",
]

REGULARISERS = ("frobenius", "identity")
# Above this many feature dimensions a full (dims, dims) probe needs ``pca``.
MAX_DIMS = 4096


class ProbingError(AlignmentError):
    pass


@dataclass
class LinearTransform:
    """``apply(x) = ((x - mean) / std) @ weights + bias`` for features (items, dims_in)."""

    weights: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def apply(self, features: np.ndarray) -> np.ndarray:
        """Transformed features (items, dims_out)."""
        values = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
        if values.shape[1] != len(self.mean):
            raise ProbingError(
                f"the transform takes {len(self.mean)} features per item, got "
                f"{values.shape[1]}; use features of the site it was fitted on"
            )
        return (values - self.mean) / self.std @ self.weights + self.bias

    ARRAYS = ("weights", "bias", "mean", "std")

    def arrays(self) -> dict[str, np.ndarray]:
        """The four arrays by name (what ``transform.npz`` files hold)."""
        return {name: np.asarray(getattr(self, name)) for name in self.ARRAYS}

    @classmethod
    def from_arrays(cls, arrays, where: str = "the arrays") -> LinearTransform:
        """A transform from a mapping with the four arrays (e.g. an opened ``.npz``)."""
        missing = set(cls.ARRAYS) - set(arrays.keys() if hasattr(arrays, "keys") else arrays)
        if missing:
            raise ProbingError(
                f"{where} is not a probe transform: it lacks {', '.join(sorted(missing))}"
            )
        return cls(*(np.asarray(arrays[k]) for k in cls.ARRAYS))


# ------------------------------------------------------------------------------ splits


def _finite(values: np.ndarray, what: str = "concept features") -> np.ndarray:
    """``values`` as float64, or :class:`ProbingError` when any is NaN or infinite (they would
    turn every fitted weight into NaN)."""
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1) if values.size else []
    if np.any(bad):
        raise ProbingError(
            f"{int(np.sum(bad))} of {len(values)} rows of {what} hold NaN or infinite values "
            f"(first row {int(np.flatnonzero(bad)[0])}); leave those concepts out"
        )
    return values


def object_folds(
    n_concepts: int, folds: int, seed: int = 0, present: np.ndarray | None = None
) -> list[np.ndarray]:
    """Split concept indices (those ``present``, default all) into ``folds`` random parts of
    near-equal size: a list of sorted index arrays."""
    candidates = np.arange(n_concepts) if present is None else np.flatnonzero(present)
    if folds < 2:
        raise ProbingError(f"cross-validation needs at least 2 folds, got {folds}")
    if len(candidates) < folds:
        raise ProbingError(f"{len(candidates)} concepts cannot be split into {folds} folds")
    order = np.random.default_rng([seed, 7]).permutation(candidates)
    return [np.sort(part) for part in np.array_split(order, folds)]


def triplets_within(triplets: np.ndarray, concepts: np.ndarray, n_concepts: int) -> np.ndarray:
    """The triplets whose three concepts are all in ``concepts`` (indices): (kept, 3)."""
    member = np.zeros(n_concepts, dtype=bool)
    member[concepts] = True
    return triplets[member[triplets].all(axis=1)]


def _inner_split(
    train: np.ndarray, val_fraction: float, seed: int, stream: int
) -> tuple[np.ndarray, np.ndarray]:
    """Training concepts split into inner training and validation concepts; ``stream`` (>= 0)
    gives every fold its own draw."""
    if not 0 < val_fraction < 1:
        raise ProbingError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    order = np.random.default_rng([seed, 11, stream]).permutation(train)
    n_val = max(1, int(round(val_fraction * len(order))))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# ------------------------------------------------------------------------------ probe


def _principal_axes(centred: np.ndarray, components: int) -> np.ndarray:
    """Orthonormal principal axes (dims, k) of centred rows (rows, dims)."""
    keep = min(components, *centred.shape)
    if centred.shape[1] > centred.shape[0]:
        eigenvalues, eigenvectors = np.linalg.eigh(centred @ centred.T)
        order = np.argsort(eigenvalues)[::-1][:keep]
        axes = centred.T @ eigenvectors[:, order]
        return axes / np.maximum(np.linalg.norm(axes, axis=0), 1e-12)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    return axes[:keep].T


def penalty(weights, regulariser: str = "frobenius"):
    """The regulariser of a (dims, dims) torch weight matrix: ``frobenius`` = ``||W||²``,
    ``identity`` = ``||W - mean(diag W)·I||²`` (zero for every multiple of the identity)."""
    import torch

    if regulariser == "frobenius":
        return (weights**2).sum()
    if regulariser == "identity":
        eye = torch.eye(weights.shape[0], dtype=weights.dtype)
        return ((weights - torch.diagonal(weights).mean() * eye) ** 2).sum()
    raise ProbingError(
        f"unknown regulariser {regulariser!r}; expected one of {', '.join(REGULARISERS)}"
    )


def _triplet_loss(embedding, triplets, accuracy: bool = False):
    """Cross-entropy of the softmax over the three pair similarities (dot products), the pair
    (column 0, column 1) being the target; with ``accuracy`` also the fraction of triplets where
    that pair is strictly the most similar: (loss, accuracy) as floats."""
    import torch

    first, second, third = (
        embedding[triplets[:, 0]],
        embedding[triplets[:, 1]],
        embedding[triplets[:, 2]],
    )
    logits = torch.stack(
        [(first * second).sum(1), (first * third).sum(1), (second * third).sum(1)], 1
    )
    loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(triplets), dtype=torch.long))
    if not accuracy:
        return loss
    correct = (logits[:, 0] > logits[:, 1]) & (logits[:, 0] > logits[:, 2])
    return float(loss), float(correct.float().mean())


def fit_probe(
    features: np.ndarray,
    train_triplets: np.ndarray,
    val_triplets: np.ndarray,
    *,
    lam: float = 1e-3,
    regulariser: str = "frobenius",
    pca: int | None = None,
    lr: float = 1e-2,
    max_epochs: int = 500,
    patience: int = 50,
    batch_size: int | None = None,
    seed: int = 0,
) -> tuple[LinearTransform, dict]:
    """Fit a linear probe on concept features (concepts, dims) with ``train_triplets``, early
    stopping on ``val_triplets`` (both (triplets, 3), column 2 the odd one out).

    Standardisation statistics come from the concepts of ``train_triplets``. ``batch_size``:
    None for full-batch Adam, else minibatches of that many triplets per step. Returns the
    transform (with ``pca`` folded into its weights) and a dict with ``epochs``,
    ``best_epoch``, ``val_accuracy``, ``val_loss``, ``train_loss``. The kept weights are those of
    the epoch with the best validation accuracy (ties: lower validation loss); training stops
    after ``patience`` epochs without a better one.
    """
    import torch

    if regulariser not in REGULARISERS:
        raise ProbingError(
            f"unknown regulariser {regulariser!r}; expected one of {', '.join(REGULARISERS)}"
        )
    if len(train_triplets) == 0 or len(val_triplets) == 0:
        raise ProbingError(
            f"the probe needs training and validation triplets, got {len(train_triplets)} and "
            f"{len(val_triplets)}; use fewer folds or more triplets"
        )
    if len(val_triplets) < 30:
        log.warning(
            "early stopping rests on %d validation triplets; use more triplets or fewer "
            "folds for a steadier probe",
            len(val_triplets),
        )
    values = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if not pca and values.shape[1] > MAX_DIMS:
        raise ProbingError(
            f"a {values.shape[1]} × {values.shape[1]} probe is too large; pass pca=K (--pca K) "
            "to probe on K principal components, or pool the features"
        )
    seen = np.unique(train_triplets)
    mean = values[seen].mean(0)
    std = values[seen].std(0)
    std = np.where(std > 1e-12, std, 1.0)
    standard = (values - mean) / std
    projection = None
    if pca:
        projection = _principal_axes(standard[seen] - standard[seen].mean(0), pca)
        standard = standard @ projection
    inputs = torch.as_tensor(standard, dtype=torch.float32)
    dims = inputs.shape[1]

    generator = torch.Generator().manual_seed(seed)
    weights = torch.nn.Parameter(torch.eye(dims) / dims**0.5)
    bias = torch.nn.Parameter(torch.zeros(dims))
    optimiser = torch.optim.Adam([weights, bias], lr=lr)
    train_index = torch.as_tensor(train_triplets, dtype=torch.long)
    val_index = torch.as_tensor(val_triplets, dtype=torch.long)

    # Early stopping on validation accuracy, ties broken by the validation loss: the loss can
    # rise for a while as the scale of W grows (confident mistakes) while accuracy still climbs.
    best = {
        "accuracy": -1.0,
        "loss": float("inf"),
        "epoch": 0,
        "weights": weights.detach().clone(),
        "bias": bias.detach().clone(),
    }
    train_loss = float("nan")
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        if batch_size is None:
            batches = [train_index]
        else:
            order = torch.randperm(len(train_index), generator=generator)
            batches = [
                train_index[order[s : s + batch_size]] for s in range(0, len(order), batch_size)
            ]
        for batch in batches:
            optimiser.zero_grad()
            loss = _triplet_loss(inputs @ weights + bias, batch) + lam * penalty(
                weights, regulariser
            )
            loss.backward()
            optimiser.step()
            train_loss = float(loss.detach())
        with torch.no_grad():
            val_loss, val_accuracy = _triplet_loss(
                inputs @ weights + bias, val_index, accuracy=True
            )
        better = val_accuracy > best["accuracy"] + 1e-12 or (
            val_accuracy >= best["accuracy"] - 1e-12 and val_loss < best["loss"] - 1e-6
        )
        if better:
            best = {
                "accuracy": val_accuracy,
                "loss": val_loss,
                "epoch": epoch,
                "weights": weights.detach().clone(),
                "bias": bias.detach().clone(),
            }
        elif epoch - best["epoch"] >= patience:
            break
    learned = best["weights"].double().numpy()
    transform = LinearTransform(
        weights=learned if projection is None else projection @ learned,
        bias=best["bias"].double().numpy(),
        mean=mean,
        std=std,
    )
    return transform, {
        "epochs": epoch,
        "best_epoch": best["epoch"],
        "val_accuracy": best["accuracy"],
        "val_loss": best["loss"],
        "train_loss": train_loss,
    }


PROBE_METHODS = ("default", "glocal")


def fitter(method: str):
    """The fit function of a probe ``method``: ``default`` (:func:`fit_probe`) or ``glocal``
    (gLocal's probe with its λ sweep, :func:`diffprobe.analysis.glocal.fit_glocal_sweep`)."""
    if method == "default":
        return fit_probe
    if method == "glocal":
        from diffprobe.analysis.glocal import fit_glocal_sweep

        return fit_glocal_sweep
    raise ProbingError(f"unknown probe {method!r}; expected one of {', '.join(PROBE_METHODS)}")


@dataclass
class ProbeResult:
    """Per-fold rows (fold, triplet counts, zero_shot, probed, epochs) and the fold transforms."""

    rows: list[dict]
    transforms: list[LinearTransform] = field(default_factory=list)

    def _values(self, key: str) -> np.ndarray:
        return np.array([row[key] for row in self.rows], dtype=np.float64)

    @property
    def zero_shot_mean(self) -> float:
        return float(self._values("zero_shot").mean())

    @property
    def zero_shot_std(self) -> float:
        return float(self._values("zero_shot").std())

    @property
    def probed_mean(self) -> float:
        return float(self._values("probed").mean())

    @property
    def probed_std(self) -> float:
        return float(self._values("probed").std())


def probe(
    features: np.ndarray,
    triplets: np.ndarray,
    *,
    folds: int = 3,
    val_fraction: float = 0.25,
    zero_shot_metric: str = "cosine",
    seed: int = 0,
    progress: bool = False,
    method: str = "default",
    **fit_options,
) -> ProbeResult:
    """K-fold (over objects) linear probing of concept features (concepts, dims) on triplets.

    For each fold the held-out concepts' triplets are scored; the remaining concepts are split
    into inner training and validation concepts (``val_fraction``) for early stopping.
    ``fit_options`` go to :func:`fit_probe` (``lam``, ``regulariser``, ``pca``, ``lr``,
    ``max_epochs``, ``patience``, ``batch_size``), or with ``method="glocal"`` to
    :func:`diffprobe.analysis.glocal.fit_glocal_sweep`. Rows: fold, train / val / test triplet
    counts, zero_shot and probed accuracy, epochs, best_epoch. No fit ever sees a triplet with a
    held-out concept (tests/test_fidelity.py changes their labels and checks the fold's
    transform stays the same).
    """
    fit = fitter(method)
    from tqdm.auto import tqdm

    values = _finite(features)
    triplets = np.asarray(triplets, dtype=np.int64)
    n = len(values)
    present = np.zeros(n, dtype=bool)
    present[np.unique(triplets)] = True
    rows, transforms = [], []
    parts = object_folds(n, folds, seed, present)
    for fold, held_out in enumerate(
        tqdm(parts, desc="probe", unit="fold", disable=not progress, file=sys.stderr)
    ):
        rest = np.setdiff1d(np.flatnonzero(present), held_out)
        inner_train, inner_val = _inner_split(rest, val_fraction, seed, fold + 1)
        train = triplets_within(triplets, inner_train, n)
        val = triplets_within(triplets, inner_val, n)
        test = triplets_within(triplets, held_out, n)
        if len(test) == 0:
            raise ProbingError(
                f"fold {fold} has no held-out triplet (all three concepts in the "
                "fold); use fewer folds or more triplets"
            )
        transform, info = fit(values, train, val, seed=seed + fold, **fit_options)
        transforms.append(transform)
        rows.append(
            {
                "fold": fold,
                "train_triplets": len(train),
                "val_triplets": len(val),
                "test_triplets": len(test),
                "test_concepts": len(held_out),
                "zero_shot": ooo_accuracy(values, test, zero_shot_metric),
                "probed": ooo_accuracy(transform.apply(values), test, "dot"),
                **info,
            }
        )
    return ProbeResult(rows, transforms)


def fit_probe_all(
    features: np.ndarray,
    triplets: np.ndarray,
    *,
    val_fraction: float = 0.25,
    seed: int = 0,
    method: str = "default",
    **fit_options,
) -> tuple[LinearTransform, dict]:
    """One probe on all concepts (to apply to new features), early-stopped on a validation
    split of ``val_fraction`` of the concepts."""
    fit = fitter(method)
    triplets = np.asarray(triplets, dtype=np.int64)
    n = len(features)
    concepts = np.unique(triplets)
    train_concepts, val_concepts = _inner_split(concepts, val_fraction, seed, 0)
    return fit(
        features,
        triplets_within(triplets, train_concepts, n),
        triplets_within(triplets, val_concepts, n),
        seed=seed,
        **fit_options,
    )


# ------------------------------------------------------------------------------ regression


@dataclass
class RegressionResult:
    """Per-fold rows (fold, r2, alpha, ooo, target_ooo, zero_shot, counts) and the out-of-fold
    predicted embedding (concepts, target dims)."""

    rows: list[dict]
    predicted: np.ndarray

    def _values(self, key: str) -> np.ndarray:
        return np.array([row[key] for row in self.rows], dtype=np.float64)

    @property
    def r2_mean(self) -> float:
        return float(self._values("r2").mean())

    @property
    def r2_std(self) -> float:
        return float(self._values("r2").std())

    @property
    def ooo_mean(self) -> float:
        return float(np.nanmean(self._values("ooo")))

    @property
    def r2_by_target(self) -> dict[str, float]:
        """Mean over folds of the held-out R² of each target dimension."""
        names = [k[3:] for k in self.rows[0] if k.startswith("r2_")] if self.rows else []
        return {name: float(self._values(f"r2_{name}").mean()) for name in names}


def regress(
    features: np.ndarray,
    target: np.ndarray,
    *,
    folds: int = 5,
    alphas: Sequence[float] = tuple(np.logspace(-4, 4, 9)),
    triplets: np.ndarray | None = None,
    metric: str = "cosine",
    target_names: Sequence[str] | None = None,
    seed: int = 0,
) -> RegressionResult:
    """Ridge regression from concept features (concepts, dims) to a target embedding
    (concepts, target dims), K-fold over concepts; the penalty is chosen from ``alphas`` per
    fold and per target dimension by RidgeCV's leave-one-out on the training concepts.

    Rows per fold: ``r2`` (uniform average over target dims, on held-out concepts), ``r2_<name>``
    per target dimension (names from ``target_names``, default ``0``, ``1``, ...), and with
    ``triplets``: ``ooo`` (accuracy of the predicted embedding on the held-out triplets,
    ``metric``), ``target_ooo`` (of the target itself on them), ``zero_shot`` (of the features).
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    values = _finite(features).reshape(len(features), -1)
    target = _finite(target, "the target embedding")
    if target.ndim == 1:
        target = target[:, None]
    if len(target) != len(values):
        raise ProbingError(f"the target has {len(target)} rows for {len(values)} concepts")
    names = (
        list(target_names) if target_names is not None else [str(j) for j in range(target.shape[1])]
    )
    if len(names) != target.shape[1]:
        raise ProbingError(f"{len(names)} target names for {target.shape[1]} target dimensions")
    n = len(values)
    predicted = np.full_like(target, np.nan)
    rows = []
    for fold, held_out in enumerate(object_folds(n, folds, seed)):
        train = np.setdiff1d(np.arange(n), held_out)
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=list(alphas), alpha_per_target=True))
        model.fit(values[train], target[train])
        predicted[held_out] = model.predict(values[held_out]).reshape(len(held_out), -1)
        per_dim = r2_score(target[held_out], predicted[held_out], multioutput="raw_values")
        row = {
            "fold": fold,
            "train_concepts": len(train),
            "test_concepts": len(held_out),
            "r2": float(np.mean(per_dim)),
            **{f"r2_{name}": float(value) for name, value in zip(names, per_dim, strict=True)},
        }
        if triplets is not None:
            test = triplets_within(np.asarray(triplets, dtype=np.int64), held_out, n)
            local = np.full(n, -1, dtype=np.int64)
            local[held_out] = np.arange(len(held_out))
            test = local[test]
            row["test_triplets"] = len(test)
            row["ooo"] = row["target_ooo"] = row["zero_shot"] = float("nan")
            if len(test):
                row["ooo"] = ooo_accuracy(predicted[held_out], test, metric)
                row["target_ooo"] = ooo_accuracy(target[held_out], test, metric)
                row["zero_shot"] = ooo_accuracy(values[held_out], test, "cosine")
        rows.append(row)
    return RegressionResult(rows, predicted)
