"""gLocal's probe (Muttenthaler et al., NeurIPS 2023), as its code defines it: ``--probe glocal``.

What differs from diffprobe's default probe (:func:`diffprobe.analysis.probing.fit_probe`):

- **standardisation** by one global scalar mean and one scalar standard deviation of the whole
  concept feature matrix (all concepts, as gLocal standardises its THINGS features), not per
  dimension from the training concepts;
- **initialisation** ``W = sigma·I``, ``b = sigma·1`` with ``sigma = 1e-3`` (default: ``I/sqrt(d)``
  and ``b = 0``);
- **objective** ``(1 - alpha)·global + alpha·local + lam·||W||_F`` with the *unsquared*
  Frobenius norm (default: ``lam·||W||_F²``, so λ values of the two are not comparable):
  ``global`` is the triplet cross-entropy of the softmax over the three dot-product pair
  similarities (temperature 1), ``local`` is the contrastive term: for a batch of reference
  features ``F`` (``contrastive_batch`` rows), teacher = cosine similarities of ``F``, student =
  cosine similarities of ``F W + b``, the diagonal dropped, soft-label cross-entropy of
  ``student / tau`` against ``softmax(teacher / tau)`` per row;
- **training** Adam (lr 1e-3) on triplet batches of 256, the learning rate ramped linearly from
  lr/3 to lr over ``max_epochs`` (PyTorch ``LinearLR`` as gLocal configures it), gradient norm
  clipped at 1, early stopping on the validation loss ``global + local`` (unweighted, as
  gLocal's ``val_overall_loss``) after at least ``min_epochs``, ``patience`` epochs;
- **λ sweep**: :func:`fit_glocal_sweep` fits every λ of ``lambdas`` on the inner training
  concepts and keeps the one with the lowest inner-validation loss.

Differences that remain (docs/alignment.md): gLocal's reference set is ImageNet features of the
same model; here ``reference`` is any feature matrix (default: the inner training concepts'
own features), standardised with the same two scalars. diffprobe keeps the weights of the best
validation epoch (gLocal saves the snapshot of the last validation before stopping).
"""

from __future__ import annotations

import math

import numpy as np

from diffprobe.analysis.probing import LinearTransform, ProbingError

__all__ = ["GLOCAL_DEFAULTS", "contrastive_loss", "fit_glocal", "fit_glocal_sweep", "glocal_loss"]

GLOCAL_DEFAULTS = {
    "alpha": 0.1,
    "tau": 1.0,
    "sigma": 1e-3,
    "lr": 1e-3,
    "max_epochs": 100,
    "min_epochs": 20,
    "patience": 15,
    "batch_size": 256,
    "contrastive_batch": 1024,
}
DEFAULT_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def global_standardisation(values: np.ndarray) -> tuple[float, float]:
    """gLocal's scalar mean and standard deviation of a whole feature matrix."""
    std = float(values.std())
    return float(values.mean()), std if std > 1e-12 else 1.0


def contrastive_loss(teacher, student, tau: float = 1.0):
    """gLocal's local term on two (batch, dims) torch matrices: row-wise soft cross-entropy of
    the student's cosine similarities / tau against softmax(teacher's / tau), diagonal dropped."""
    import torch

    def off_diagonal_cosines(x):
        unit = torch.nn.functional.normalize(x, dim=1)
        similarity = unit @ unit.T
        n = similarity.shape[0]
        return similarity[~torch.eye(n, dtype=torch.bool)].reshape(n, n - 1)

    target = torch.softmax(off_diagonal_cosines(teacher) / tau, dim=1)
    log_q = torch.log_softmax(off_diagonal_cosines(student) / tau, dim=1)
    return -(target * log_q).sum(1).mean()


def glocal_loss(
    weights, bias, inputs, triplets, reference, *, alpha: float, tau: float, lam: float
):
    """(total, global, local) torch scalars of gLocal's objective for standardised concept
    features ``inputs`` (concepts, d), ``triplets`` (n, 3) long and ``reference`` (m, d)."""
    import torch

    z = inputs @ weights + bias
    a, b, c = z[triplets[:, 0]], z[triplets[:, 1]], z[triplets[:, 2]]
    logits = torch.stack([(a * b).sum(1), (a * c).sum(1), (b * c).sum(1)], 1)
    target = torch.zeros(len(triplets), dtype=torch.long)
    global_term = torch.nn.functional.cross_entropy(logits, target)
    local_term = contrastive_loss(reference, reference @ weights + bias, tau)
    total = (1 - alpha) * global_term + alpha * local_term + lam * torch.linalg.norm(weights)
    return total, global_term, local_term


def fit_glocal(
    features: np.ndarray,
    train_triplets: np.ndarray,
    val_triplets: np.ndarray,
    *,
    lam: float = 1e-3,
    reference: np.ndarray | None = None,
    seed: int = 0,
    **options,
) -> tuple[LinearTransform, dict]:
    """gLocal's probe on concept features (concepts, dims), fitted on ``train_triplets`` and
    early-stopped on ``val_triplets``. ``options`` override :data:`GLOCAL_DEFAULTS`.
    ``reference``: raw features (rows, dims) for the local term (default: the concepts of
    ``train_triplets``). Returns the transform (scalar mean / std repeated per dimension) and
    a dict with ``epochs``, ``best_epoch``, ``val_loss``, ``val_accuracy``, ``lambda``."""
    import torch

    unknown = set(options) - set(GLOCAL_DEFAULTS)
    if unknown:
        raise ProbingError(f"unknown gLocal option(s) {', '.join(sorted(unknown))}")
    cfg = {**GLOCAL_DEFAULTS, **options}
    if len(train_triplets) == 0 or len(val_triplets) == 0:
        raise ProbingError(
            f"the probe needs training and validation triplets, got {len(train_triplets)} and "
            f"{len(val_triplets)}; use fewer folds or more triplets"
        )
    values = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    mean, std = global_standardisation(values)
    inputs = torch.as_tensor((values - mean) / std, dtype=torch.float32)
    ref = values[np.unique(train_triplets)] if reference is None else np.asarray(reference)
    ref = torch.as_tensor((ref.reshape(len(ref), -1) - mean) / std, dtype=torch.float32)
    if ref.shape[1] != inputs.shape[1] or len(ref) < 3:
        raise ProbingError(
            f"the reference features must be (rows >= 3, {inputs.shape[1]}), got {tuple(ref.shape)}"
        )
    dims = inputs.shape[1]
    generator = torch.Generator().manual_seed(seed)
    weights = torch.nn.Parameter(torch.eye(dims) * cfg["sigma"])
    bias = torch.nn.Parameter(torch.ones(dims) * cfg["sigma"])
    optimiser = torch.optim.Adam([weights, bias], lr=cfg["lr"])
    scheduler = torch.optim.lr_scheduler.LinearLR(optimiser, total_iters=cfg["max_epochs"])
    train = torch.as_tensor(train_triplets, dtype=torch.long)
    val = torch.as_tensor(val_triplets, dtype=torch.long)
    size = min(cfg["contrastive_batch"], len(ref))
    val_ref = ref[torch.randperm(len(ref), generator=generator)[:size]]
    terms = {"alpha": cfg["alpha"], "tau": cfg["tau"], "lam": lam}
    best = {"loss": math.inf, "epoch": 0, "weights": weights.detach().clone(),
            "bias": bias.detach().clone(), "accuracy": float("nan")}  # fmt: skip
    epoch = 0
    for epoch in range(1, cfg["max_epochs"] + 1):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(order), cfg["batch_size"]):
            batch = train[order[start : start + cfg["batch_size"]]]
            batch_ref = ref[torch.randperm(len(ref), generator=generator)[:size]]
            optimiser.zero_grad()
            loss, _, _ = glocal_loss(weights, bias, inputs, batch, batch_ref, **terms)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([weights, bias], 1.0)
            optimiser.step()
        scheduler.step()
        with torch.no_grad():
            _, global_term, local_term = glocal_loss(weights, bias, inputs, val, val_ref, **terms)
            val_loss = float(global_term + local_term)
            z = inputs @ weights + bias
            a, b, c = z[val[:, 0]], z[val[:, 1]], z[val[:, 2]]
            kept = (a * b).sum(1)
            accuracy = float(((kept > (a * c).sum(1)) & (kept > (b * c).sum(1))).float().mean())
        if val_loss < best["loss"]:
            best = {"loss": val_loss, "epoch": epoch, "weights": weights.detach().clone(),
                    "bias": bias.detach().clone(), "accuracy": accuracy}  # fmt: skip
        elif epoch >= cfg["min_epochs"] and epoch - best["epoch"] >= cfg["patience"]:
            break
    transform = LinearTransform(
        weights=best["weights"].double().numpy(),
        bias=best["bias"].double().numpy(),
        mean=np.full(dims, mean),
        std=np.full(dims, std),
    )
    return transform, {
        "epochs": epoch,
        "best_epoch": best["epoch"],
        "val_loss": best["loss"],
        "val_accuracy": best["accuracy"],
        "lambda": lam,
    }


def fit_glocal_sweep(
    features: np.ndarray,
    train_triplets: np.ndarray,
    val_triplets: np.ndarray,
    *,
    lambdas=DEFAULT_LAMBDAS,
    lam: float | None = None,
    **options,
) -> tuple[LinearTransform, dict]:
    """:func:`fit_glocal` for every λ of ``lambdas`` (or only ``lam`` when given) on the same
    inner split; keeps the fit with the lowest validation loss. The dict adds ``lambda`` (the
    chosen one) and ``val_loss_by_lambda``."""
    grid = [lam] if lam is not None else list(lambdas)
    if not grid:
        raise ProbingError("the λ sweep needs at least one value")
    fits = [fit_glocal(features, train_triplets, val_triplets, lam=value, **options)
            for value in grid]  # fmt: skip
    chosen = min(range(len(fits)), key=lambda i: fits[i][1]["val_loss"])
    transform, info = fits[chosen]
    losses = ";".join(
        f"{value:g}:{fit[1]['val_loss']:.5f}" for value, fit in zip(grid, fits, strict=True)
    )
    return transform, {**info, "val_loss_by_lambda": losses}
