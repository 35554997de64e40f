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
            "folds": folds, "lambda": options.get("lam"),
            "regulariser": options.get("regulariser"), "transform": str(folder / "transform.npz"),
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
