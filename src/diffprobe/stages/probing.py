"""The probing stages (``diffprobe probe | regress``): linear probes on odd-one-out triplets
and ridge regressions onto a target embedding, K-fold over objects, per (site, noise level,
condition) of a run, with the fitted transforms saved as ``.npz`` (no pickle)."""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffprobe.analysis import probing
from diffprobe.analysis.alignment import restrict_triplets
from diffprobe.data.things import read_embedding
from diffprobe.data.things_export import SHAPES_FACTOR_NAMES, shapes_factor_embedding
from diffprobe.io import check_output, claim_output, write_bytes, write_csv
from diffprobe.stages.align import load_concept_features

PROBE_KIND, REGRESS_KIND = "probe", "regress"


def probe_options(
    method: str,
    *,
    lam: float | None = None,
    lambdas: str = "1e-4,1e-3,1e-2,1e-1,1",
    alpha: float = 0.1,
    tau: float = 1.0,
    regulariser: str = "frobenius",
    pca: int | None = None,
    lr: float | None = None,
    max_epochs: int | None = None,
    patience: int | None = None,
    batch_size: int | None = None,
) -> dict:
    """The fit options of ``diffprobe probe --probe METHOD`` (checked before any work):
    ``default`` takes lam (1e-3), regulariser, pca, lr (1e-2), max_epochs (500), patience (50),
    batch_size; ``glocal`` takes lam (or sweeps ``lambdas``), alpha, tau, lr (1e-3), max_epochs
    (100), patience (15), batch_size (256) and refuses ``pca`` and ``regulariser``."""
    probing.fitter(method)
    for name, value in (("--max-epochs", max_epochs), ("--patience", patience),
                        ("--batch-size", batch_size)):  # fmt: skip
        if value is not None and value < 1:
            raise probing.ProbingError(f"{name} {value}: expected an integer >= 1")
    for name, value in (("--lambda", lam), ("--lr", lr)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise probing.ProbingError(f"{name} {value}: expected a finite number >= 0")
    given = {"lr": lr, "max_epochs": max_epochs, "patience": patience, "batch_size": batch_size}
    given = {k: v for k, v in given.items() if v is not None}
    if method == "default":
        return {"method": method, "lam": 1e-3 if lam is None else lam,
                "regulariser": regulariser, "pca": pca, **given}  # fmt: skip
    if pca or regulariser != "frobenius":
        raise probing.ProbingError(
            "--probe glocal has its own regulariser (unsquared Frobenius) and works on the full "
            "features; leave out --pca and --regulariser, or use --probe default"
        )
    if not 0 <= alpha <= 1 or not tau > 0:
        raise probing.ProbingError(
            f"--alpha {alpha} must lie in [0, 1] and --tau {tau} must be > 0"
        )
    try:
        grid = [float(v) for v in lambdas.split(",") if v.strip()]
    except ValueError:
        grid = []
    if not grid or not all(np.isfinite(v) and v >= 0 for v in grid):
        raise probing.ProbingError(
            f"--lambdas {lambdas!r}: expected comma-separated numbers >= 0, e.g. 1e-3,1e-2,1e-1"
        )
    return {"method": method, "lam": lam, "lambdas": tuple(grid), "alpha": alpha, "tau": tau,
            **given}  # fmt: skip


def _slug(*parts: str) -> str:
    return "__".join(p.replace("/", "_").replace(":", "~") for p in parts)


def _concept_features(run, things, sites, noises, conditions, reduction, triplets, progress):
    """Concept-averaged features of the selected arrays, the concepts they cover, and the
    chosen triplets restricted to those concepts."""
    features, covered = load_concept_features(run, things, sites=sites, noises=noises,
                                              conditions=conditions, reduction=reduction,
                                              progress=progress)  # fmt: skip
    return features, covered, restrict_triplets(things.get_triplets(triplets), covered)


def probe_run(
    run,
    things,
    out: str | Path,
    *,
    triplets: str | Path = "train",
    sites: Sequence[str] | None = None,
    noises: Sequence[str] | None = None,
    conditions: Sequence[str] | None = None,
    reduction: str = "mean",
    folds: int = 3,
    val_fraction: float = 0.25,
    seed: int = 0,
    progress: bool = True,
    echo=None,
    **options,
) -> dict:
    """Linear probing (triplet cross-entropy, K-fold over objects; ``options`` go to
    :func:`diffprobe.analysis.probing.probe`) per site × noise level × condition of ``run``:
    ``probe.csv`` (per fold), ``probe_summary.csv`` (mean ± std) and the transforms (.npz:
    weights, bias, mean, std) per fold and fitted on all concepts, in the probe folder ``out``.
    ``echo`` (a callable) gets one line per array. Returns ``{"rows", "summary", "concepts",
    "triplets"}``."""
    check_output(out, PROBE_KIND)  # before the work: a refused folder costs nothing
    features, covered, used = _concept_features(run, things, sites, noises, conditions,
                                                reduction, triplets, progress)  # fmt: skip
    out = claim_output(out, PROBE_KIND)
    rows, summary = [], []
    bar = tqdm(features.items(), desc="probe", unit="array", disable=not progress,
               file=sys.stderr)  # fmt: skip
    for (site, noise_key, cond), values in bar:
        result = probing.probe(values, used, folds=folds, val_fraction=val_fraction, seed=seed,
                               **options)  # fmt: skip
        folder = out / "transforms" / _slug(site, noise_key, cond)
        for fold, transform in enumerate(result.transforms):
            save_transform(transform, folder / f"fold{fold}.npz")
        final, _ = probing.fit_probe_all(values, used, val_fraction=val_fraction, seed=seed,
                                         **options)  # fmt: skip
        save_transform(final, folder / "transform.npz")
        base = {"site": site, "noise": noise_key, "condition": cond, "reduction": reduction}
        rows += [{**base, **row} for row in result.rows]
        summary.append({
            **base,
            "zero_shot_mean": result.zero_shot_mean, "zero_shot_std": result.zero_shot_std,
            "probed_mean": result.probed_mean, "probed_std": result.probed_std,
            "folds": folds, "probe": options.get("method", "default"),
            "lambda": options.get("lam") if options.get("lam") is not None else ";".join(
                f"{row.get('lambda')}" for row in result.rows),
            "regulariser": options.get("regulariser", "frobenius-unsquared"),
            "transform": str(folder / "transform.npz"),
        })  # fmt: skip
        if echo is not None:
            echo(f"{site} {noise_key} {cond}: zero-shot {result.zero_shot_mean:.3f} ± "
                 f"{result.zero_shot_std:.3f} -> probed {result.probed_mean:.3f} ± "
                 f"{result.probed_std:.3f}")  # fmt: skip
    write_csv(out / "probe.csv", rows)
    write_csv(out / "probe_summary.csv", summary)
    return {"rows": rows, "summary": summary, "concepts": int(np.sum(covered)),
            "triplets": len(used)}  # fmt: skip


def target_embedding(things, target: str) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """The regression target: an embedding file (.npy or text, concepts × dims), or
    ``"shapes-factors"`` (the shapes world's true factors); with the factor names if known."""
    if target == "shapes-factors":
        return shapes_factor_embedding(things.concepts), SHAPES_FACTOR_NAMES
    return read_embedding(target, things.n_concepts), None


def regress_run(
    run,
    things,
    out: str | Path,
    target: str,
    *,
    triplets: str | Path = "test",
    sites: Sequence[str] | None = None,
    noises: Sequence[str] | None = None,
    conditions: Sequence[str] | None = None,
    reduction: str = "mean",
    folds: int = 5,
    metric: str = "cosine",
    seed: int = 0,
    progress: bool = True,
    echo=None,
) -> dict:
    """Ridge regression from features to ``target`` (:func:`target_embedding`), K-fold over
    objects, per site × noise level × condition: R² and the odd-one-out accuracy of the
    prediction (``regression.csv`` per fold, ``regression_summary.csv``) in the folder ``out``."""
    embedding, names = target_embedding(things, target)
    check_output(out, REGRESS_KIND)  # before the work: a refused folder costs nothing
    features, covered, used = _concept_features(run, things, sites, noises, conditions,
                                                reduction, triplets, progress)  # fmt: skip
    out = claim_output(out, REGRESS_KIND)
    rows, summary = [], []
    for (site, noise_key, cond), values in features.items():
        result = probing.regress(values, embedding[covered], folds=folds, triplets=used,
                                 metric=metric, target_names=names, seed=seed)  # fmt: skip
        base = {"site": site, "noise": noise_key, "condition": cond, "reduction": reduction}
        rows += [{**base, **row} for row in result.rows]
        target_ooo = float(np.nanmean([r["target_ooo"] for r in result.rows]))
        summary.append({
            **base, "r2_mean": result.r2_mean, "r2_std": result.r2_std,
            "ooo_mean": result.ooo_mean, "target_ooo_mean": target_ooo, "folds": folds,
            "metric": metric, **{f"r2_{k}_mean": v for k, v in result.r2_by_target.items()},
        })  # fmt: skip
        if echo is not None:
            echo(f"{site} {noise_key} {cond}: R² {result.r2_mean:.3f} ± {result.r2_std:.3f}, "
                 f"OOO of the prediction {result.ooo_mean:.3f} (target itself {target_ooo:.3f})")  # fmt: skip
    write_csv(out / "regression.csv", rows)
    write_csv(out / "regression_summary.csv", summary)
    return {"rows": rows, "summary": summary}


def save_transform(transform: probing.LinearTransform, path: str | Path) -> Path:
    """Write a probe's ``weights``, ``bias``, ``mean``, ``std`` to ``path`` (.npz, no pickle)."""
    buffer = io.BytesIO()
    np.savez(buffer, **transform.arrays())
    return write_bytes(path, buffer.getvalue())


def load_transform(path: str | Path) -> probing.LinearTransform:
    """Read a transform written by :func:`save_transform` (``allow_pickle=False``)."""
    with np.load(Path(path), allow_pickle=False) as stored:
        return probing.LinearTransform.from_arrays(stored, str(path))
