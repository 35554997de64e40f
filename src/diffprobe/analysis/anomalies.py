"""Anomalies of spatial representations, after Loos & Linhardt, "Latent Diffusion U-Net
Representations Contain Positional Embeddings and Anomalies" (ICLR 2025 DeLTa workshop).

Four measurements on spatial (unpooled) features of any site, each a pure function over arrays:

- **position probes**: linear classifiers from one token's features to its row / column bin,
  trained and tested on different images (:func:`position_probe`);
- **corner artifacts**: how much more alike the corner tokens of a map are than the same content
  away from the corners (:func:`corner_ratio`);
- **high-norm tokens**: norm maps, the anomaly score of 2×2 token groups and their detection
  (:func:`norm_maps`, :func:`group_scores`, :func:`detect_high_norm`), compared with hand-made
  labels (:func:`compare_with_labels`, label files: :func:`write_label_file`);
- **similarity maps**: the cosine of every token to a query token, within and across images
  (:func:`similarity_maps`, :func:`position_similarity`).

Every function takes token maps ``(items, height, width, channels)``; :func:`to_grid` turns UNet
features ``(items, channels, height, width)`` or transformer tokens ``(items, tokens, channels)``
into that layout. The definitions are stated once, in :data:`DEFINITIONS`, and copied into every
output table. Reading a run folder, extracting the cropped images the corner ratio needs and the
demo are :mod:`diffprobe.stages.anomalies`; label files are :mod:`diffprobe.data.anomaly_labels`;
the figures :mod:`diffprobe.report.anomalies`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from diffprobe.errors import DiffprobeError

log = logging.getLogger(__name__)


class AnomalyError(DiffprobeError, ValueError):
    pass


DEFAULT_BINNINGS = (2, 4, 8, 16, 32)
DEFAULT_THRESHOLD = 2.0
REFERENCES = ("mean", "median")

DEFINITIONS: dict[str, str] = {
    "token_map": "features of one site as (items, height, width, channels); UNet maps "
    "(items, C, H, W) are transposed, transformer tokens (items, H*W, C) reshaped row-major",
    "position_probe": "linear softmax classifier (multinomial logistic regression, penalty "
    "l2*|W|^2/2, full-batch L-BFGS on features standardised with the training tokens' mean and "
    "std) from one token's channel vector to its row bin (axis=row) or column bin (axis=col); "
    "bin = floor(index * bins / grid_size); trained on the tokens of one set of images and "
    "scored on the tokens of the other images (split by image); bins = grid size is 'exact'",
    "chance": "accuracy of always answering the most frequent bin among the test tokens "
    "(= 1/bins when bins divides the grid size)",
    "corner_similarity": "mean over images of the mean cosine similarity between tokens of "
    "different corners of the same image's map; a corner is the k x k tokens at each of the four "
    "corners (k = corner, default 1: 4 tokens, 6 pairs)",
    "corner_ratio": "corner_similarity(map of the cropped image) / corner_similarity(original "
    "map with its outer ring of tokens removed). The cropped image is the original image cropped "
    "by one token's pixel width per side (image_size / grid px) and resized back to image_size "
    "(PIL bicubic), run through the model at the same noise level, seed and conditioning; its "
    "corner tokens hold the content that lies one token inside the corners of the original map, "
    "i.e. at the corners of the original map with its outer ring removed. ratio > 1: the same "
    "content is more alike when it sits at the map's corners (corner artifact)",
    "norm": "L2 norm of a token's feature vector over channels",
    "anomaly_score": "mean norm of the group x group tokens whose upper-left token is (y, x), "
    "divided by the reference of the same image's norm map (reference = mean or median of all "
    "its token norms)",
    "detection": "groups with anomaly_score > threshold, kept greedily in order of decreasing "
    "score, dropping every group that overlaps an already kept group of the same image "
    "(non-maximum suppression); (y, x) = the group's upper-left token in the site's token grid",
    "matching": "a detection matches a label of the same image (and the same site, or a label "
    "without a site) when max(|dy|, |dx|) <= tolerance; detections are matched one to one in "
    "order of decreasing score, each to its nearest unmatched label; precision = matched "
    "detections / detections on labelled images; recall = matched labels / labels",
    "similarity_map": "cosine similarity of every token of every image to the query token "
    "(item, y, x): the query's own image gives the within-image map, the others the across-image "
    "maps; the query position is given as fractions (row, column) of the grid",
    "same_position_similarity": "mean cosine similarity between tokens at the same grid position "
    "in different images",
    "cross_image_similarity": "mean cosine similarity between tokens of different images at any "
    "positions (the baseline for same_position_similarity)",
}

# ---------------------------------------------------------------------------------- layout


def parse_grid(text: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"16x16"`` / ``"16"`` / ``(16, 16)`` -> ``(16, 16)``; None stays None."""
    if text is None:
        return None
    if not isinstance(text, str):
        height, width = (int(v) for v in text)
        return height, width
    match = re.fullmatch(r"\s*(\d+)\s*(?:[x×,]\s*(\d+))?\s*", text)
    if not match:
        raise AnomalyError(f"grid {text!r}: expected HxW (e.g. 32x32) or one number for a square")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


def to_grid(features: Any, grid: tuple[int, int] | str | None = None) -> np.ndarray:
    """Features of one site -> token maps ``(items, height, width, channels)`` (float32).

    ``features``: UNet maps ``(items, channels, height, width)`` or transformer tokens
    ``(items, tokens, channels)``; for the latter ``grid`` = ``(height, width)`` with
    ``height * width == tokens`` (row-major, as diffusers patchifies), inferred for a square grid.
    """
    array = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features)
    array = array.astype(np.float32, copy=False)
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(0, 2, 3, 1))
    if array.ndim == 3:
        items, tokens, channels = array.shape
        shape = parse_grid(grid)
        if shape is None:
            side = math.isqrt(tokens)
            if side * side != tokens:
                raise AnomalyError(
                    f"{tokens} tokens per item do not form a square grid; pass grid=(height, "
                    "width) (--grid HxW) with height * width == tokens"
                )
            shape = (side, side)
        if shape[0] * shape[1] != tokens:
            raise AnomalyError(
                f"grid {shape} holds {shape[0] * shape[1]} tokens, features have {tokens}"
            )
        return np.ascontiguousarray(array.reshape(items, shape[0], shape[1], channels))
    raise AnomalyError(
        f"features of shape {array.shape} are not spatial: expected (items, C, H, W) or "
        "(items, tokens, C); extract with pooling 'none' (--pooling none)"
    )


def _check_maps(maps: np.ndarray, what: str = "token maps") -> np.ndarray:
    maps = np.asarray(maps)
    if maps.ndim != 4:
        raise AnomalyError(
            f"{what} must be (items, height, width, channels), got shape {maps.shape}; "
            "to_grid(features) converts UNet and transformer features"
        )
    return maps


def _unit(vectors: np.ndarray, axis: int = -1) -> np.ndarray:
    vectors = vectors.astype(np.float64, copy=False)
    norms = np.linalg.norm(vectors, axis=axis, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


# ------------------------------------------------------------------------- position probes


def position_bins(index: np.ndarray, size: int, bins: int) -> np.ndarray:
    """Bin of each row (or column) index in a grid of ``size``: ``floor(index * bins / size)``."""
    return (np.asarray(index, dtype=np.int64) * bins) // size


def binnings_for(size: int, binnings: Iterable[int] = DEFAULT_BINNINGS) -> list[tuple[str, int]]:
    """``(label, bins)`` for every binning below the grid size, then ``("exact", size)``."""
    chosen = sorted({int(b) for b in binnings if 2 <= int(b) < size})
    return [(str(b), b) for b in chosen] + [("exact", size)]


def split_images(
    items: int, test_fraction: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of image indices into (train, test); both non-empty."""
    if items < 2:
        raise AnomalyError(f"position probes need at least 2 images (train and test), got {items}")
    if not 0.0 < test_fraction < 1.0:
        raise AnomalyError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(items)
    n_test = min(max(int(round(items * test_fraction)), 1), items - 1)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def fit_softmax(
    features: np.ndarray,
    labels: np.ndarray,
    classes: int,
    *,
    l2: float = 1e-4,
    max_iter: int = 100,
    device: str | None = None,
):
    """Multinomial logistic regression by full-batch L-BFGS (torch): features (tokens, C),
    integer labels (tokens,) -> a function mapping features to predicted labels.

    Features are standardised with their own mean and std (kept for prediction)."""
    import torch

    x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
    mean = x.mean(0, keepdim=True)
    std = x.std(0, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], classes, device=x.device, requires_grad=True)
    bias = torch.zeros(classes, device=x.device, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimiser.zero_grad()
        loss = (
            torch.nn.functional.cross_entropy(x @ weight + bias, y)
            + 0.5 * l2 * weight.square().sum()
        )
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    weight, bias = weight.detach(), bias.detach()

    def predict(new: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = (torch.as_tensor(np.asarray(new, dtype=np.float32), device=x.device) - mean) / std
            return (z @ weight + bias).argmax(1).cpu().numpy()

    return predict


def position_probe(
    maps: np.ndarray,
    *,
    binnings: Iterable[int] = DEFAULT_BINNINGS,
    test_fraction: float = 0.5,
    seed: int = 0,
    max_train_tokens: int = 20_000,
    max_test_tokens: int = 50_000,
    l2: float = 1e-4,
    max_iter: int = 100,
    device: str | None = None,
) -> list[dict]:
    """Accuracy of linear probes for each token's row and column, on images not trained on.

    ``maps``: token maps ``(items, height, width, channels)``. For each axis and each binning in
    ``binnings`` below the grid size, plus the exact position: a probe (:func:`fit_softmax`) is
    trained on the tokens of the training images (at most ``max_train_tokens``, a seeded subset)
    and scored on the tokens of the test images. Returns one row per (axis, binning) with
    ``accuracy`` and ``chance`` (see :data:`DEFINITIONS`).
    """
    maps = _check_maps(maps)
    items, height, width, channels = maps.shape
    train, test = split_images(items, test_fraction, seed)
    rng = np.random.default_rng(seed + 1)
    rows_index, cols_index = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")

    def tokens(images: np.ndarray, limit: int):
        x = maps[images].reshape(-1, channels)
        r = np.broadcast_to(rows_index, (len(images), height, width)).reshape(-1)
        c = np.broadcast_to(cols_index, (len(images), height, width)).reshape(-1)
        if len(x) > limit:
            keep = np.sort(rng.choice(len(x), size=limit, replace=False))
            x, r, c = x[keep], r[keep], c[keep]
        return x, r, c

    x_train, row_train, col_train = tokens(train, max_train_tokens)
    x_test, row_test, col_test = tokens(test, max_test_tokens)
    results = []
    for axis, size, y_train_index, y_test_index in (
        ("row", height, row_train, row_test),
        ("col", width, col_train, col_test),
    ):
        for label, bins in binnings_for(size, binnings):
            y_train = position_bins(y_train_index, size, bins)
            y_test = position_bins(y_test_index, size, bins)
            predict = fit_softmax(x_train, y_train, bins, l2=l2, max_iter=max_iter, device=device)
            accuracy = float((predict(x_test) == y_test).mean())
            chance = float(np.bincount(y_test, minlength=bins).max() / len(y_test))
            results.append(
                {
                    "axis": axis,
                    "binning": label,
                    "bins": bins,
                    "grid_size": size,
                    "accuracy": accuracy,
                    "chance": chance,
                    "train_images": len(train),
                    "test_images": len(test),
                    "train_tokens": len(x_train),
                    "test_tokens": len(x_test),
                }
            )
    return results


# ----------------------------------------------------------------------------------- corners


def corner_similarity(maps: np.ndarray, corner: int = 1) -> np.ndarray:
    """Per image: the mean cosine similarity between tokens of different corners of its map
    (``corner`` x ``corner`` tokens at each corner). ``maps`` (items, H, W, C) -> (items,)."""
    maps = _check_maps(maps)
    items, height, width, channels = maps.shape
    k = int(corner)
    if k < 1 or height < 2 * k or width < 2 * k:
        raise AnomalyError(
            f"corners of {k}x{k} tokens need a grid of at least {2 * k}x{2 * k}, got {height}x{width}"
        )
    blocks = [
        maps[:, :k, :k],
        maps[:, :k, width - k :],
        maps[:, height - k :, :k],
        maps[:, height - k :, width - k :],
    ]
    tokens = _unit(
        np.stack([b.reshape(items, k * k, channels) for b in blocks], 1).reshape(
            items, 4 * k * k, channels
        )
    )
    gram = np.einsum("nic,njc->nij", tokens, tokens)
    which = np.repeat(np.arange(4), k * k)
    pairs = which[:, None] < which[None, :]
    return gram[:, pairs].mean(1)


def inner_map(maps: np.ndarray, ring: int = 1) -> np.ndarray:
    """The map with its outer ``ring`` of tokens removed: (items, H - 2r, W - 2r, C)."""
    maps = _check_maps(maps)
    return maps[:, ring : maps.shape[1] - ring, ring : maps.shape[2] - ring]


def corner_ratio(cropped: np.ndarray, original: np.ndarray, corner: int = 1) -> dict:
    """The corner-artifact ratio of one site (see :data:`DEFINITIONS`, ``corner_ratio``).

    ``cropped``: token maps (items, H, W, C) of the images cropped by one token's pixel width per
    side and resized back; ``original``: token maps (items, H, W, C) of the original images, same
    items in the same order. Compares the corners of ``cropped`` with the corners of
    ``original`` with its outer ring removed, which hold the same content.
    Returns ``cropped_corner_similarity``, ``reference_corner_similarity``, their ``ratio`` and
    ``difference``, and ``items``.
    """
    cropped, original = _check_maps(cropped, "cropped maps"), _check_maps(original, "original maps")
    if cropped.shape != original.shape:
        raise AnomalyError(
            f"cropped maps {cropped.shape} and original maps {original.shape} must have the same "
            "shape (the same items at the same site and image size)"
        )
    at_corners = float(corner_similarity(cropped, corner).mean())
    reference = float(corner_similarity(inner_map(original), corner).mean())
    return {
        "cropped_corner_similarity": at_corners,
        "reference_corner_similarity": reference,
        "ratio": at_corners / reference if reference != 0 else float("nan"),
        "difference": at_corners - reference,
        "items": int(cropped.shape[0]),
    }


def token_border(image_size: int, grid: tuple[int, int]) -> tuple[int, int]:
    """One token's size in pixels (rows, columns) for a grid over an ``image_size`` image."""
    height, width = grid
    border = (int(round(image_size / height)), int(round(image_size / width)))
    if min(border) < 1 or 2 * max(border) >= image_size:
        raise AnomalyError(
            f"a {height}x{width} grid over {image_size} px has no usable one-token border"
        )
    if image_size % height or image_size % width:
        log.warning(
            "a %dx%d grid does not divide %d px; cropping %s px per side",
            height,
            width,
            image_size,
            border,
        )
    return border


def inner_crop(images: np.ndarray, border: int | tuple[int, int], *,
               min_border: int = 0) -> np.ndarray:  # fmt: skip
    """Cut ``border`` pixels (rows, columns; each at least ``min_border``) from every side:
    uint8 (items, H, W, 3) -> a view (items, H - 2·by, W - 2·bx, 3)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise AnomalyError(
            f"images must be uint8 (items, H, W, 3), got {images.dtype} {images.shape}"
        )
    by, bx = (border, border) if isinstance(border, int) else border
    height, width = images.shape[1:3]
    if by < min_border or bx < min_border or 2 * by >= height or 2 * bx >= width:
        raise AnomalyError(f"a border of {by}x{bx} px does not fit {height}x{width} images")
    return images[:, by : height - by, bx : width - bx]


def crop_border(images: np.ndarray, border: int | tuple[int, int]) -> np.ndarray:
    """Crop ``border`` pixels (rows, columns) from every side and resize back (PIL bicubic).

    ``images``: uint8 (items, H, W, 3) -> uint8 (items, H, W, 3)."""
    from PIL import Image

    inner = inner_crop(images, border)
    height, width = np.shape(images)[1:3]
    out = np.empty((len(inner), height, width, 3), dtype=np.uint8)
    for i, image in enumerate(inner):
        out[i] = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))
    return out


# --------------------------------------------------------------------------- high-norm tokens


def norm_maps(maps: np.ndarray) -> np.ndarray:
    """L2 norm over channels of every token: (items, H, W, C) -> (items, H, W)."""
    return np.linalg.norm(_check_maps(maps).astype(np.float64, copy=False), axis=-1)


def _reference(norms: np.ndarray, reference: str) -> np.ndarray:
    if reference not in REFERENCES:
        raise AnomalyError(f"reference must be one of {REFERENCES}, got {reference!r}")
    flat = norms.reshape(len(norms), -1)
    value = flat.mean(1) if reference == "mean" else np.median(flat, 1)
    return np.maximum(value, 1e-12)[:, None, None]


def group_scores(norms: np.ndarray, group: int = 2, reference: str = "mean") -> np.ndarray:
    """Anomaly score of every ``group`` x ``group`` token group (see :data:`DEFINITIONS`).

    ``norms`` (items, H, W) -> (items, H - group + 1, W - group + 1); entry (y, x) belongs to the
    group whose upper-left token is (y, x)."""
    norms = np.asarray(norms, dtype=np.float64)
    if norms.ndim != 3:
        raise AnomalyError(f"norm maps must be (items, H, W), got {norms.shape}")
    items, height, width = norms.shape
    if group < 1 or group > min(height, width):
        raise AnomalyError(f"group size {group} does not fit a {height}x{width} grid")
    total = np.zeros((items, height - group + 1, width - group + 1))
    for dy in range(group):
        for dx in range(group):
            total += norms[:, dy : height - group + 1 + dy, dx : width - group + 1 + dx]
    return total / (group * group) / _reference(norms, reference)


def detect_high_norm(
    norms: np.ndarray, threshold: float = DEFAULT_THRESHOLD, group: int = 2, reference: str = "mean"
) -> dict[str, np.ndarray]:
    """High-norm token groups of every image (see :data:`DEFINITIONS`, ``detection``).

    ``norms`` (items, H, W) -> ``{"item", "y", "x", "score"}``, one entry per detection, sorted by
    item and decreasing score; (y, x) is the upper-left token of the group."""
    scores = group_scores(norms, group, reference)
    found: dict[str, list] = {"item": [], "y": [], "x": [], "score": []}
    for item in range(len(scores)):
        ys, xs = np.nonzero(scores[item] > threshold)
        order = np.argsort(-scores[item, ys, xs], kind="stable")
        kept: list[tuple[int, int]] = []
        for y, x in zip(ys[order], xs[order], strict=True):
            if all(abs(int(y) - ky) >= group or abs(int(x) - kx) >= group for ky, kx in kept):
                kept.append((int(y), int(x)))
                found["item"].append(item)
                found["y"].append(int(y))
                found["x"].append(int(x))
                found["score"].append(float(scores[item, y, x]))
    return {
        "item": np.asarray(found["item"], dtype=np.int64),
        "y": np.asarray(found["y"], dtype=np.int64),
        "x": np.asarray(found["x"], dtype=np.int64),
        "score": np.asarray(found["score"], dtype=np.float64),
    }


def detections_per_image(detections: dict[str, np.ndarray], items: int) -> np.ndarray:
    """Number of detections of every image: (items,)."""
    return np.bincount(detections["item"], minlength=items)


# ------------------------------------------------------------------------------- similarity


def similarity_maps(maps: np.ndarray, item: int, y: int, x: int) -> np.ndarray:
    """Cosine similarity of every token of every image to the query token ``maps[item, y, x]``.

    (items, H, W, C) -> (items, H, W): ``[item]`` is the within-image map, the others the
    across-image maps (``[:, y, x]`` compares the same position across images)."""
    maps = _check_maps(maps)
    query = _unit(maps[item, y, x])
    return np.einsum("nhwc,c->nhw", _unit(maps), query)


def position_similarity(maps: np.ndarray) -> dict[str, Any]:
    """Same-position vs any-position similarity across images (see :data:`DEFINITIONS`).

    Returns ``same_position_map`` (H, W): mean cosine between tokens at that position in
    different images; ``same_position_similarity`` (its mean) and ``cross_image_similarity``."""
    maps = _check_maps(maps)
    items, height, width, channels = maps.shape
    if items < 2:
        raise AnomalyError("similarity across images needs at least 2 images")
    unit = _unit(maps).reshape(items, height * width, channels)
    position_sum = unit.sum(0)  # (P, C)
    self_pairs = np.einsum("npc,npc->p", unit, unit)
    same = (np.einsum("pc,pc->p", position_sum, position_sum) - self_pairs) / (items * (items - 1))
    per_image = unit.sum(1)  # (N, C)
    total = position_sum.sum(0)
    cross = (total @ total - np.einsum("nc,nc->", per_image, per_image)) / (
        items * (items - 1) * (height * width) ** 2
    )
    return {
        "same_position_map": same.reshape(height, width),
        "same_position_similarity": float(same.mean()),
        "cross_image_similarity": float(cross),
    }


# --------------------------------------------------------------------- labels vs detections


def compare_with_labels(
    detections: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    *,
    site: str | None = None,
    tolerance: int = 1,
) -> dict:
    """Precision and recall of detections against hand-made labels (see :data:`DEFINITIONS`,
    ``matching``). Only images with a label file (for this site, or for every site) count."""

    def for_site(sites: np.ndarray) -> np.ndarray:
        return (
            (sites == "") | (sites == (site or ""))
            if site is not None
            else np.ones(len(sites), bool)
        )

    labelled = set(labels["image_item"][for_site(labels["image_site"])].tolist())
    keep = for_site(labels["site"])
    label_item, label_y, label_x = labels["item"][keep], labels["y"][keep], labels["x"][keep]
    matched_detections = 0
    n_detections = 0
    matched_labels: set[int] = set()
    for item in sorted(labelled):
        mine = np.nonzero(detections["item"] == item)[0]
        mine = mine[np.argsort(-detections["score"][mine], kind="stable")]
        candidates = np.nonzero(label_item == item)[0]
        n_detections += len(mine)
        for d in mine:
            best, best_distance = None, None
            for c in candidates:
                if int(c) in matched_labels:
                    continue
                distance = max(
                    abs(int(label_y[c]) - int(detections["y"][d])),
                    abs(int(label_x[c]) - int(detections["x"][d])),
                )
                if distance <= tolerance and (best_distance is None or distance < best_distance):
                    best, best_distance = int(c), distance
            if best is not None:
                matched_labels.add(best)
                matched_detections += 1
    n_labels = int(np.isin(label_item, list(labelled)).sum())
    return {
        "labelled_images": len(labelled),
        "labels": n_labels,
        "detections": n_detections,
        "matched": matched_detections,
        "precision": matched_detections / n_detections if n_detections else float("nan"),
        "recall": len(matched_labels) / n_labels if n_labels else float("nan"),
        "tolerance": tolerance,
    }
