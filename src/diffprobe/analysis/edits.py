"""Edit metrics (pure: arrays in, numbers and tables out): directional CLIP similarity S_dir,
Fréchet distance and KID between feature sets, linearity of a score against edit strength,
PSNR. Features come from any extractor (tiny-clip offline; Inception-v3 for users with its
weights): these functions only see arrays."""

from __future__ import annotations

import numpy as np
from scipy import linalg, stats

__all__ = ["frechet_distance", "kernel_inception_distance", "linearity", "psnr", "s_dir"]


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def s_dir(edited: np.ndarray, original: np.ndarray, target_text: np.ndarray,
          source_text: np.ndarray) -> np.ndarray:  # fmt: skip
    """S_dir = cos(E_I(edit) − E_I(original), E_T(target) − E_T(source)) per item.

    ``edited``, ``original``: image embeddings (items, dim) (normalised here);
    ``target_text``, ``source_text``: text embeddings (dim,). Returns (items,)."""
    delta_image = _unit(edited) - _unit(original)
    delta_text = _unit(target_text) - _unit(source_text)
    return _unit(delta_image) @ _unit(delta_text)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||μ_a − μ_b||² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) of two feature sets (items, dim).

    Needs at least 2 items per set; with fewer items than dimensions the covariances are
    singular and the value is biased upwards (report KID for small n)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if len(a) < 2 or len(b) < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"Fréchet distance needs two sets of ≥ 2 items with the same feature "
                         f"size, got {a.shape} and {b.shape}")  # fmt: skip
    mean = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        offset = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = np.real(root)
    return float(mean @ mean + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def kernel_inception_distance(features_a: np.ndarray, features_b: np.ndarray,
                              subsets: int = 10, subset_size: int | None = None,
                              seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """KID (Bińkowski et al.): unbiased MMD² with the kernel (x·y/d + 1)³, mean and std over
    random subsets of ``subset_size`` (default: the smaller set, at most 1000)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    size = subset_size or min(len(a), len(b), 1000)
    if size < 2:
        raise ValueError("KID needs at least 2 items per set")
    rng = np.random.default_rng(seed)
    dim = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        k_xx, k_yy, k_xy = ((x @ x.T / dim + 1) ** 3, (y @ y.T / dim + 1) ** 3,
                            (x @ y.T / dim + 1) ** 3)  # fmt: skip
        off = size * (size - 1)
        mmd = ((k_xx.sum() - np.trace(k_xx)) / off + (k_yy.sum() - np.trace(k_yy)) / off
               - 2 * k_xy.mean())  # fmt: skip
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def linearity(strengths: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Least-squares slope, intercept and R² of ``scores`` against ``strengths`` and their
    Spearman rank correlation; ``scores`` may be (strengths,) or (strengths, items) (then
    the item mean per strength is fitted)."""
    x = np.asarray(strengths, np.float64)
    y = np.asarray(scores, np.float64)
    if y.ndim == 2:
        y = y.mean(1)
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"linearity needs ≥ 3 strengths with one score each, got {len(x)} "
                         f"strengths and {len(y)} scores")  # fmt: skip
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1 - (residual**2).sum() / total if total > 0 else float("nan")
    rho = stats.spearmanr(x, y).statistic if np.ptp(y) > 0 else float("nan")
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2),
            "spearman": float(rho)}  # fmt: skip


def psnr(reference: np.ndarray, reconstruction: np.ndarray, peak: float = 255.0) -> float:
    """Mean PSNR in dB over items of images (items, ...) on a scale with maximum ``peak``."""
    error = (np.asarray(reference, np.float64) - np.asarray(reconstruction, np.float64)) ** 2
    mse = np.maximum(error.reshape(len(error), -1).mean(1), 1e-12)
    return float(np.mean(10 * np.log10(peak**2 / mse)))
