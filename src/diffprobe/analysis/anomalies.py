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
output table. The sections at the end read a run folder (:func:`analyse_run`, used by
``diffprobe anomalies RUN``), extract the cropped images the corner ratio needs
(:func:`corner_features` in memory, :func:`extract_cropped` into run folders) and run the demo.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffprobe.errors import DiffprobeError

log = logging.getLogger(__name__)


class AnomalyError(DiffprobeError, ValueError):
    pass


DEFAULT_BINNINGS = (2, 4, 8, 16, 32)
DEFAULT_THRESHOLD = 2.0
REFERENCES = ("mean", "median")
LABEL_FORMAT = "diffprobe-anomaly-labels/1"
LABEL_TABLE_FORMAT = "diffprobe-anomaly-label-table/1"

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


def crop_border(images: np.ndarray, border: int | tuple[int, int]) -> np.ndarray:
    """Crop ``border`` pixels (rows, columns) from every side and resize back (PIL bicubic).

    ``images``: uint8 (items, H, W, 3) -> uint8 (items, H, W, 3)."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise AnomalyError(
            f"images must be uint8 (items, H, W, 3), got {images.dtype} {images.shape}"
        )
    by, bx = (border, border) if isinstance(border, int) else border
    height, width = images.shape[1:3]
    out = np.empty_like(images)
    for i, image in enumerate(images):
        inner = Image.fromarray(image[by : height - by, bx : width - bx])
        out[i] = np.asarray(inner.resize((width, height), Image.BICUBIC))
    return out


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (items, H, W, 3) -> uint8 (items, size, size, 3) (PIL bicubic; as is when equal)."""
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return images
    return np.stack(
        [np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images]
    )


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


# ----------------------------------------------------------------------------------- labels


def write_label_file(
    path: str | Path,
    item: str,
    groups: Iterable[dict | tuple[int, int]],
    *,
    index: int | None = None,
    site: str | None = None,
    grid: tuple[int, int] | None = None,
) -> Path:
    """Write the hand-marked anomalies of one image (a JSON file).

    ``groups``: ``{"x": column, "y": row}`` (or ``(y, x)``) of each group's upper-left token in the
    site's token grid. ``item`` is the run's item id; ``index`` its position in the run; ``site``
    limits the labels to one site (None: every site). An empty ``groups`` records that the image
    was looked at and holds no anomaly (it still counts for precision)."""
    entries = []
    for g in groups:
        y, x = (g["y"], g["x"]) if isinstance(g, dict) else g
        entries.append({"x": int(x), "y": int(y)})
    payload = {
        "format": LABEL_FORMAT,
        "item": str(item),
        "index": index,
        "site": site,
        "grid": list(grid) if grid is not None else None,
        "groups": entries,
    }
    path = Path(path)
    _write_text_atomic(path, json.dumps(payload, indent=1))
    return path


def read_label_file(path: str | Path) -> dict:
    """One label file -> ``{"item", "index", "site", "grid", "groups": [{"x", "y"}]}``."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AnomalyError(f"cannot read label file {path}: {err}") from None
    if not isinstance(payload, dict) or "item" not in payload or "groups" not in payload:
        raise AnomalyError(
            f"label file {path} needs the keys 'item' and 'groups' ([{{'x': .., 'y': ..}}]); "
            "write it with diffprobe.analysis.anomalies.write_label_file"
        )
    for g in payload["groups"]:
        if not isinstance(g, dict) or not {"x", "y"} <= set(g):
            raise AnomalyError(f"label file {path}: every group needs 'x' and 'y', got {g!r}")
    return {
        "item": str(payload["item"]),
        "index": payload.get("index"),
        "site": payload.get("site"),
        "grid": payload.get("grid"),
        "groups": [{"x": int(g["x"]), "y": int(g["y"])} for g in payload["groups"]],
    }


def labels_to_table(
    files: str | Path | Iterable[str | Path], item_ids: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Label files (a folder of ``*.json`` or a list of files) -> a table of numpy arrays.

    ``item``, ``item_id``, ``site``, ``y``, ``x``: one entry per labelled group;
    ``image_item``, ``image_item_id``, ``image_site``: one entry per label file (the images that
    were looked at). ``item`` is the index in ``item_ids`` (the run's manifest order) when given,
    else the file's ``index``. ``site`` is "" for labels that apply to every site."""
    if isinstance(files, (str, Path)) and Path(files).is_dir():
        paths = sorted(Path(files).glob("*.json"))
        if not paths:
            raise AnomalyError(f"no label files (*.json) in {files}")
    elif isinstance(files, (str, Path)):
        paths = [Path(files)]
    else:
        paths = [Path(p) for p in files]
    lookup = {item_id: i for i, item_id in enumerate(item_ids)} if item_ids is not None else None
    table: dict[str, list] = {
        k: []
        for k in ("item", "item_id", "site", "y", "x", "image_item", "image_item_id", "image_site")
    }
    for path in paths:
        label = read_label_file(path)
        if lookup is not None:
            if label["item"] not in lookup:
                raise AnomalyError(
                    f"label file {path} names item '{label['item']}', which is not in the run"
                )
            index = lookup[label["item"]]
            if label["index"] is not None and int(label["index"]) != index:
                raise AnomalyError(
                    f"label file {path}: item '{label['item']}' is item {index} of the run, the "
                    f"file says index {label['index']}; fix or drop its 'index'"
                )
        elif label["index"] is None:
            raise AnomalyError(
                f"label file {path} has no 'index'; pass item_ids (the run's item ids)"
            )
        else:
            index = int(label["index"])
        site = label["site"] or ""
        table["image_item"].append(index)
        table["image_item_id"].append(label["item"])
        table["image_site"].append(site)
        for g in label["groups"]:
            table["item"].append(index)
            table["item_id"].append(label["item"])
            table["site"].append(site)
            table["y"].append(g["y"])
            table["x"].append(g["x"])
    return {
        k: np.asarray(v, dtype=str if "id" in k or "site" in k else np.int64)
        for k, v in table.items()
    }


def save_label_table(table: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write a label table as ``.npz`` (string columns as unicode arrays: no pickle needed)."""
    path = Path(path)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        format=np.asarray(LABEL_TABLE_FORMAT),
        **{k: np.asarray(v) for k, v in table.items()},
    )
    _write_bytes_atomic(path, buffer.getvalue())
    return path


def load_label_table(path: str | Path) -> dict[str, np.ndarray]:
    """Read a table written by :func:`save_label_table` (``allow_pickle=False``)."""
    with np.load(Path(path), allow_pickle=False) as data:
        if "format" not in data or str(data["format"]) != LABEL_TABLE_FORMAT:
            raise AnomalyError(
                f"{path} is not a diffprobe anomaly label table ({LABEL_TABLE_FORMAT})"
            )
        return {k: data[k] for k in data.files if k != "format"}


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


# ------------------------------------------------------------------------------ file helpers


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary shared files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_text_atomic(path: Path, text: str) -> None:
    _write_bytes_atomic(Path(path), text.encode())


def write_table(
    path: str | Path,
    rows: list[dict],
    definitions: Sequence[str] = (),
    parameters: dict | None = None,
) -> Path:
    """Write rows as CSV, preceded by ``# name: definition`` comment lines (read it with
    ``pandas.read_csv(path, comment="#")`` or :func:`read_table`)."""
    buffer = io.StringIO()
    for key in definitions:
        buffer.write(f"# {key}: {DEFINITIONS[key]}\n")
    for key, value in (parameters or {}).items():
        buffer.write(f"# parameter {key} = {value}\n")
    fields = list(rows[0]) if rows else []
    for row in rows[1:]:
        fields += [k for k in row if k not in fields]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    path = Path(path)
    _write_text_atomic(path, buffer.getvalue())
    return path


def read_table(path: str | Path) -> list[dict]:
    """Rows of a table written by :func:`write_table` (comment lines skipped; values as text)."""
    lines = [line for line in Path(path).read_text().splitlines() if not line.startswith("#")]
    return list(csv.DictReader(lines))


# ------------------------------------------------------------------ model level: the crops


def spatial_features(
    model: Any,
    images: np.ndarray,
    sites: Sequence[str],
    *,
    noise_level: float | None = 0.2,
    timestep: float | None = None,
    seed: int = 0,
    prompt: str = "",
    batch_size: int = 16,
    size: int | None = None,
    grid: tuple[int, int] | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Token maps (items, H, W, C) of ``sites`` for uint8 ``images`` (items, H, W, 3), in memory.

    One denoiser pass per batch, at ``noise_level`` (or ``timestep``), with ``prompt`` (default the
    empty prompt); item ``i`` gets the noise of item ``i`` of an extraction with ``seed``, so the
    maps equal those of ``diffprobe extract`` on the same images (pooling none)."""
    import torch
    from tqdm.auto import tqdm

    from diffprobe.hooks.engine import capture

    if timestep is not None:
        noise_level = None
    size = size or model.resolution
    parts: dict[str, list] = {site: [] for site in sites}
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, disable=not progress, desc="features", file=sys.stderr):
        items = list(range(start, min(start + batch_size, len(images))))
        with torch.no_grad():
            x0 = model.encode_images(images[items[0] : items[-1] + 1], size)
            cond = model.encode_prompt([prompt] * len(items))
            x_t, t = model.add_noise(
                x0, noise_level=noise_level, timestep=timestep, seed=seed, items=items
            )
            with capture(model, list(sites), stop_early=True) as cache:
                model.denoise(x_t, t, cond)
        for site in sites:
            parts[site].append(cache.last(site).float().cpu())
    return {site: to_grid(torch.cat(values).numpy(), grid) for site, values in parts.items()}


def corner_features(
    model: Any,
    images: np.ndarray,
    sites: Sequence[str],
    *,
    noise_level: float | None = 0.2,
    timestep: float | None = None,
    seed: int = 0,
    prompt: str = "",
    batch_size: int = 16,
    size: int | None = None,
    grid: tuple[int, int] | None = None,
    progress: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The two maps of the corner ratio for every site: ``{site: (original, cropped)}``.

    ``images``: uint8 (items, H, W, 3), resized to the model's image size first. For each site,
    the cropped images are the images cropped by one token's pixel width per side (image size /
    the site's grid) and resized back with PIL (:func:`crop_border`); both sets go through
    :func:`spatial_features` with the same noise, seed and prompt. Pass the result to
    ``corner_ratio(cropped, original)``."""
    size = size or model.resolution
    images = resize_images(np.asarray(images), size)
    kwargs = dict(
        noise_level=noise_level,
        timestep=timestep,
        seed=seed,
        prompt=prompt,
        batch_size=batch_size,
        size=size,
        grid=grid,
        progress=progress,
    )
    original = spatial_features(model, images, sites, **kwargs)
    by_border: dict[tuple[int, int], list[str]] = {}
    for site in sites:
        by_border.setdefault(token_border(size, original[site].shape[1:3]), []).append(site)
    result = {}
    for border, group in by_border.items():
        cropped = spatial_features(model, crop_border(images, border), group, **kwargs)
        for site in group:
            result[site] = (original[site], cropped[site])
    return result


# ------------------------------------------------------------------ run level: read and crop


def load_run_images(run: Any) -> np.ndarray:
    """uint8 (items, size, size, 3) images of a run, at the run's image size.

    Shapes-world items are regenerated (``data/shapes.py``) from their ids, image-folder and
    THINGS items are read from their manifest paths; both are checked against the manifest's
    sha256."""
    import hashlib

    from diffprobe.data.sources import _center_square, _read_image

    manifest = run.manifest
    size = int(run.info["image_size"])
    kind = run.info["data"]["kind"]
    if kind == "shapes":
        from diffprobe.data import shapes

        images = []
        for item in manifest:
            match = re.fullmatch(r"shapes-(\d+)-(\w+)-(\d+)", item["id"])
            if not match:
                raise AnomalyError(f"shapes item id {item['id']!r} is not shapes-SEED-SPLIT-INDEX")
            seed, split, index = int(match.group(1)), match.group(2), int(match.group(3))
            image = shapes.sample(1, seed=seed, split=split, start=index).images[0]
            if item.get("sha256") and hashlib.sha256(image.tobytes()).hexdigest() != item["sha256"]:
                raise AnomalyError(
                    f"regenerated shapes item {item['id']} differs from the one extracted (sha256); "
                    "the shapes world changed since the run: re-extract it"
                )
            images.append(image)
        return resize_images(np.stack(images), size)
    images = []
    for item in manifest:
        path = item.get("path")
        if not path or not Path(path).is_file():
            raise AnomalyError(
                f"image of item {item['id']} is not at {path!r}; the run's images must stay where "
                "they were extracted from (or pass --no-corner and skip the overlays)"
            )
        if (
            item.get("sha256")
            and hashlib.sha256(Path(path).read_bytes()).hexdigest() != item["sha256"]
        ):
            raise AnomalyError(
                f"{path} changed since the run was extracted (sha256); re-extract the run"
            )
        images.append(resize_images(_center_square(_read_image(Path(path)))[None], size)[0])
    return np.stack(images)


def _plan_like(run: Any, sites: Sequence[str]):
    from diffprobe.extract.engine import Condition, ExtractionPlan

    info = run.info
    noise = info["noise"]
    by_level = all("noise_level" in n for n in noise)
    return ExtractionPlan(
        sites=list(sites),
        noise_levels=[n["noise_level"] for n in noise] if by_level else None,
        timesteps=None if by_level else [n["timestep"] for n in noise],
        conditions=[Condition(**c) for c in info["conditions"]],
        pooling="none",
        seed=info["seed"],
        image_size=info["image_size"],
        chunk_items=info["chunk_items"],
        store_dtype=info["store_dtype"],
    )


def extract_cropped(
    run: Any,
    model: Any,
    out: str | Path,
    sites: Sequence[str],
    grids: dict[str, tuple[int, int]],
    *,
    images: np.ndarray | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract the cropped images of ``run`` with the run's own grid (noise levels, conditions,
    seed, image size), one run folder per token border: ``out/cropped-<rows>x<cols>px``.

    Returns ``{site: Run}``. Re-running resumes the folders (they are ordinary run folders)."""
    import hashlib

    from diffprobe.data.sources import Item, Source
    from diffprobe.extract.engine import extract
    from diffprobe.extract.store import open_run

    size = int(run.info["image_size"])
    images = load_run_images(run) if images is None else images
    by_border: dict[tuple[int, int], list[str]] = {}
    for site in sites:
        by_border.setdefault(token_border(size, grids[site]), []).append(site)
    runs = {}
    for border, group in by_border.items():
        cropped = crop_border(images, border)
        items = [
            Item(
                id=m["id"],
                label=m["label"],
                caption=m.get("caption"),
                sha256=hashlib.sha256(image.tobytes()).hexdigest(),
                loader=lambda image=image: image,
            )
            for m, image in zip(run.manifest, cropped, strict=True)
        ]
        source = Source(
            "cropped",
            f"{run.root} cropped by {border[0]}x{border[1]} px per side and "
            "resized back (diffprobe anomalies)",
            items,
        )
        folder = Path(out) / f"cropped-{border[0]}x{border[1]}px"
        extract(
            model,
            source,
            _plan_like(run, group),
            folder,
            batch_size=batch_size,
            overwrite=True,
            progress=progress,
        )
        opened = open_run(folder)
        for site in group:
            runs[site] = opened
    return runs


# --------------------------------------------------------------------------------- plots


def _save_figure(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _write_bytes_atomic(Path(path), buffer.getvalue())


def _short(site: str) -> str:
    return site.removeprefix("unet.").removeprefix("transformer.")


def plot_probe_accuracy(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Probe accuracy by site: one panel per axis, one line per binning, chance dotted."""
    from matplotlib.figure import Figure

    sites = list(dict.fromkeys(r["site"] for r in rows))
    labels = list(dict.fromkeys(r["binning"] for r in rows))
    labels = sorted(labels, key=lambda b: (b == "exact", int(b) if b != "exact" else 0))
    figure = Figure(figsize=(max(5.0, 1.1 * len(sites) + 2), 3.4))
    axes = figure.subplots(1, 2, sharey=True)
    for ax, axis in zip(axes, ("row", "col"), strict=True):
        for k, label in enumerate(labels):
            colour = f"C{k}"
            picked = {r["site"]: r for r in rows if r["axis"] == axis and r["binning"] == label}
            xs = [i for i, s in enumerate(sites) if s in picked]
            ax.plot(xs, [picked[sites[i]]["accuracy"] for i in xs], "o-", color=colour, label=label)
            ax.plot(xs, [picked[sites[i]]["chance"] for i in xs], ":", color=colour)
        ax.set_xticks(
            range(len(sites)), [_short(s) for s in sites], rotation=45, ha="right", fontsize=7
        )
        ax.set_title(f"{axis} probe", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (dotted: chance)")
    axes[1].legend(title="bins", fontsize=7, title_fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    _save_figure(figure, Path(path))
    return Path(path)


def plot_corner_ratio(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Corner ratio by site (log2 axis; 1 = no corner artifact)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.0, 0.8 * len(rows) + 2), 3.2))
    ax = figure.subplots()
    from matplotlib.ticker import ScalarFormatter

    ratios = [r["ratio"] for r in rows]
    # bars start at 1 (no artifact), so ratios below 1 point down
    ax.bar(
        range(len(rows)),
        [v - 1 for v in ratios],
        bottom=1.0,
        color=["C3" if v > 1 else "C0" for v in ratios],
    )
    for i, v in enumerate(ratios):
        ax.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom" if v > 1 else "top", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    if all(v > 0 for v in ratios):
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        low, high = min(ratios + [1.0]), max(ratios + [1.0])
        ax.set_ylim(low / 1.25, high * 1.25)
    ax.set_xticks(
        range(len(rows)), [_short(r["site"]) for r in rows], rotation=45, ha="right", fontsize=7
    )
    ax.set_ylabel("corner ratio (cropped / inner)")
    ax.set_title(title or "corner artifacts", fontsize=9)
    _save_figure(figure, Path(path))
    return Path(path)


def plot_norm_overlays(
    images: np.ndarray | None,
    norms: dict[str, np.ndarray],
    detections: dict[str, dict],
    path: str | Path,
    items: Sequence[int] = (0, 1, 2, 3),
    group: int = 2,
    title: str = "",
) -> Path:
    """Norm maps over the images (rows: sites, columns: items); detected groups boxed."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    sites = list(norms)
    items = [i for i in items if i < len(next(iter(norms.values())))]
    figure = Figure(figsize=(1.6 * len(items) + 0.5, 1.6 * len(sites) + 0.4))
    axes = np.atleast_2d(figure.subplots(len(sites), len(items), squeeze=False))
    for r, site in enumerate(sites):
        height, width = norms[site].shape[1:]
        for c, item in enumerate(items):
            ax = axes[r, c]
            extent = (-0.5, width - 0.5, height - 0.5, -0.5)
            if images is not None:
                ax.imshow(images[item], extent=extent)
                ax.imshow(
                    norms[site][item],
                    cmap="magma",
                    alpha=0.6,
                    extent=extent,
                    interpolation="nearest",
                )
            else:
                ax.imshow(norms[site][item], cmap="magma", interpolation="nearest")
            found = detections[site]
            for y, x in zip(
                found["y"][found["item"] == item], found["x"][found["item"] == item], strict=True
            ):
                ax.add_patch(
                    Rectangle((x - 0.5, y - 0.5), group, group, fill=False, ec="cyan", lw=1.2)
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(_short(site), fontsize=7)
            if r == 0:
                ax.set_title(f"item {item}", fontsize=7)
    if title:
        figure.suptitle(title, fontsize=8)
    _save_figure(figure, Path(path))
    return Path(path)


def plot_similarity_maps(
    images: np.ndarray | None,
    maps: dict[str, np.ndarray],
    queries: dict[str, tuple[int, int, int]],
    path: str | Path,
    items: Sequence[int] = (0, 1, 2, 3),
    title: str = "",
) -> Path:
    """Cosine to the query token (star) for a few images per site (rows: sites)."""
    from matplotlib.figure import Figure

    sites = list(maps)
    items = [i for i in items if i < len(next(iter(maps.values())))]
    columns = len(items) + (1 if images is not None else 0)
    figure = Figure(figsize=(1.6 * columns + 0.8, 1.6 * len(sites) + 0.4))
    axes = np.atleast_2d(figure.subplots(len(sites), columns, squeeze=False))
    for r, site in enumerate(sites):
        query_item, qy, qx = queries[site]
        offset = 0
        if images is not None:
            height, width = maps[site].shape[1:]
            axes[r, 0].imshow(images[query_item], extent=(-0.5, width - 0.5, height - 0.5, -0.5))
            axes[r, 0].plot([qx], [qy], "*", color="yellow", ms=9, mec="k")
            axes[r, 0].set_title(f"query: item {query_item}" if r == 0 else "", fontsize=7)
            offset = 1
        for c, item in enumerate(items):
            ax = axes[r, c + offset]
            shown = ax.imshow(
                maps[site][item], cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest"
            )
            ax.plot([qx], [qy], "*", color="yellow", ms=7, mec="k")
            if r == 0:
                ax.set_title(
                    f"item {item}" + (" (within)" if item == query_item else ""), fontsize=7
                )
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(_short(site), fontsize=7)
    figure.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6, label="cosine")
    if title:
        figure.suptitle(title, fontsize=8)
    _save_figure(figure, Path(path))
    return Path(path)


# ----------------------------------------------------------------------------- run analysis


def _load_model(run: Any, model: Any, device: str, dtype: str | None) -> Any:
    import diffprobe

    if model is not None and not isinstance(model, (str, Path)):
        return model
    info = run.info["model"]
    name = model or info.get("name") or info.get("source")
    last: Exception | None = None
    for candidate in [name, info.get("source")]:
        if not candidate:
            continue
        try:
            return diffprobe.load(candidate, dtype=dtype or info.get("dtype"), device=device)
        except DiffprobeError as err:
            last = err
    raise AnomalyError(
        f"the corner ratio extracts cropped images, but the run's model ({name}) could not be "
        f"loaded ({last if name else 'none recorded'}); pass --model MODEL or --no-corner"
    )


def analyse_run(
    run: Any,
    out: str | Path,
    *,
    sites: Sequence[str] | None = None,
    noises: Sequence[str] | None = None,
    conditions: Sequence[str] | None = None,
    grid: tuple[int, int] | str | None = None,
    binnings: Iterable[int] = DEFAULT_BINNINGS,
    test_fraction: float = 0.5,
    threshold: float = DEFAULT_THRESHOLD,
    group: int = 2,
    reference: str = "mean",
    corner: bool = True,
    corner_size: int = 1,
    model: Any = None,
    device: str = "cpu",
    dtype: str | None = None,
    batch_size: int = 16,
    labels: str | Path | None = None,
    tolerance: int = 1,
    query: tuple[float, float] = (0.5, 0.5),
    query_item: int = 0,
    plots: bool = True,
    show: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Every anomaly measurement on a run folder extracted with pooling "none"; tables, plots and
    ``summary.json`` go to ``out``. Returns the summary (also the numbers of every table).

    Writes ``position_probes.csv``, ``corner_ratio.csv`` (with ``corner``: the cropped images are
    extracted into ``out/cropped-*`` with ``model``, default the run's model),
    ``high_norm_counts.csv`` (per site), ``high_norm_per_image.csv``,
    ``high_norm_detections.csv``, ``norm_maps.npz``, ``similarity.csv``, ``similarity_maps.npz``,
    with ``labels`` (a folder of label files or a label table .npz) ``labels.npz`` and
    ``label_comparison.csv``, and with ``plots`` one PNG per measurement and (noise, condition).
    """
    from tqdm.auto import tqdm

    from diffprobe.extract.store import open_run

    run = open_run(run) if isinstance(run, (str, Path)) else run
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if run.info.get("pooling") != "none":
        raise AnomalyError(
            f"run {run.root} was extracted with pooling '{run.info.get('pooling')}'; anomalies need "
            "spatial features: extract again with --pooling none"
        )
    sites = list(sites or run.sites)
    noises = list(noises or run.noise_keys)
    conditions = list(conditions or run.conditions)
    for name, chosen, available in (
        ("site", sites, run.sites),
        ("noise", noises, run.noise_keys),
        ("condition", conditions, run.conditions),
    ):
        missing = [c for c in chosen if c not in available]
        if missing:
            raise AnomalyError(
                f"{name} {missing[0]!r} is not in {run.root}; it has {', '.join(available)}"
            )
    grid = parse_grid(grid)
    ids = [m["id"] for m in run.manifest]
    n_items = len(ids)
    parameters = {
        "run": str(run.root),
        "binnings": list(binnings),
        "test_fraction": test_fraction,
        "threshold": threshold,
        "group": group,
        "reference": reference,
        "corner": corner_size,
        "tolerance": tolerance,
        "query": list(query),
        "query_item": query_item,
        "seed": seed,
    }

    images = None
    try:
        images = load_run_images(run)
    except (AnomalyError, OSError) as err:
        if corner:
            raise
        log.warning("no images for the overlays: %s", err)

    label_table = None
    if labels is not None:
        labels = Path(labels)
        label_table = (
            load_label_table(labels) if labels.suffix == ".npz" else labels_to_table(labels, ids)
        )
        save_label_table(label_table, out / "labels.npz")

    keys = [(s, n, c) for s in sites for n in noises for c in conditions]
    grids: dict[str, tuple[int, int]] = {}
    for site in sites:
        # the stored shape, without reading the array
        shape = run.array(site, noises[0], conditions[0]).shape
        grids[site] = to_grid(np.zeros((1, *shape[1:]), np.float32), grid).shape[1:3]
    cropped_runs = {}
    if corner:
        loaded = _load_model(run, model, device, dtype)
        cropped_runs = extract_cropped(
            run, loaded, out, sites, grids, images=images, batch_size=batch_size, progress=progress
        )

    probe_rows: list[dict] = []
    corner_rows: list[dict] = []
    count_rows: list[dict] = []
    image_rows: list[dict] = []
    detection_rows: list[dict] = []
    similarity_rows: list[dict] = []
    comparison_rows: list[dict] = []
    norms_out, similarity_out = {}, {}
    by_view: dict[tuple[str, str], dict] = {}
    shown = list(range(min(show, n_items)))
    for key in tqdm(keys, disable=not progress, desc="anomalies", file=sys.stderr):
        site, noise, condition = key
        maps = to_grid(run.get(site, noise, condition), grid)
        base = {
            "site": site,
            "noise": noise,
            "condition": condition,
            "grid": f"{maps.shape[1]}x{maps.shape[2]}",
        }
        for row in position_probe(maps, binnings=binnings, test_fraction=test_fraction, seed=seed):
            probe_rows.append({**base, **row})
        if corner:
            cropped = to_grid(cropped_runs[site].get(site, noise, condition), grid)
            border = token_border(int(run.info["image_size"]), grids[site])
            corner_rows.append(
                {
                    **base,
                    "border_px": f"{border[0]}x{border[1]}",
                    **corner_ratio(cropped, maps, corner_size),
                    "cropped_run": str(cropped_runs[site].root),
                }
            )
            del cropped
        norms = norm_maps(maps)
        found = detect_high_norm(norms, threshold, group, reference)
        counts = detections_per_image(found, n_items)
        scores = group_scores(norms, group, reference)
        count_rows.append(
            {
                **base,
                "detections": int(len(found["item"])),
                "images_with_detections": int((counts > 0).sum()),
                "images": n_items,
                "mean_per_image": float(counts.mean()),
                "max_score": float(scores.max()),
                "mean_norm": float(norms.mean()),
            }
        )
        for item in range(n_items):
            image_rows.append(
                {
                    **base,
                    "item": item,
                    "item_id": ids[item],
                    "detections": int(counts[item]),
                    "max_score": float(scores[item].max()),
                }
            )
        for item, y, x, score in zip(
            found["item"], found["y"], found["x"], found["score"], strict=True
        ):
            detection_rows.append(
                {
                    **base,
                    "item": int(item),
                    "item_id": ids[item],
                    "y": int(y),
                    "x": int(x),
                    "score": float(score),
                }
            )
        if label_table is not None:
            comparison_rows.append(
                {**base, **compare_with_labels(found, label_table, site=site, tolerance=tolerance)}
            )
        qy = min(int(query[0] * maps.shape[1]), maps.shape[1] - 1)
        qx = min(int(query[1] * maps.shape[2]), maps.shape[2] - 1)
        q_item = min(query_item, n_items - 1)
        sims = similarity_maps(maps, q_item, qy, qx).astype(np.float32)
        stats = position_similarity(maps) if n_items > 1 else {}
        similarity_rows.append(
            {
                **base,
                "query_item": q_item,
                "query_y": qy,
                "query_x": qx,
                "same_position_similarity": stats.get("same_position_similarity", float("nan")),
                "cross_image_similarity": stats.get("cross_image_similarity", float("nan")),
            }
        )
        name = f"{site}|{noise}|{condition}"
        norms_out[name] = norms.astype(np.float32)
        similarity_out[name] = sims
        view = by_view.setdefault(
            (noise, condition), {"norms": {}, "found": {}, "sims": {}, "queries": {}}
        )
        # the plots need only the images they show
        view["norms"][site], view["found"][site] = norms_out[name], found
        view["sims"][site], view["queries"][site] = (
            sims[: max(shown + [q_item]) + 1],
            (q_item, qy, qx),
        )

    write_table(
        out / "position_probes.csv",
        probe_rows,
        ["token_map", "position_probe", "chance"],
        parameters,
    )
    write_table(
        out / "high_norm_counts.csv", count_rows, ["norm", "anomaly_score", "detection"], parameters
    )
    write_table(
        out / "high_norm_per_image.csv",
        image_rows,
        ["norm", "anomaly_score", "detection"],
        parameters,
    )
    write_table(
        out / "high_norm_detections.csv",
        detection_rows,
        ["norm", "anomaly_score", "detection"],
        parameters,
    )
    write_table(
        out / "similarity.csv",
        similarity_rows,
        ["similarity_map", "same_position_similarity", "cross_image_similarity"],
        parameters,
    )
    if corner:
        write_table(
            out / "corner_ratio.csv", corner_rows, ["corner_similarity", "corner_ratio"], parameters
        )
    if label_table is not None:
        write_table(
            out / "label_comparison.csv", comparison_rows, ["detection", "matching"], parameters
        )
    for name, arrays in (("norm_maps.npz", norms_out), ("similarity_maps.npz", similarity_out)):
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        _write_bytes_atomic(out / name, buffer.getvalue())

    figures = []
    if plots:
        for (noise, condition), view in by_view.items():
            tag = f"{noise}_{condition}"
            title = f"{noise}, {condition}"
            figures.append(
                plot_probe_accuracy(
                    [r for r in probe_rows if r["noise"] == noise and r["condition"] == condition],
                    out / f"probe_accuracy_{tag}.png",
                    f"position probes ({title})",
                )
            )
            if corner:
                figures.append(
                    plot_corner_ratio(
                        [
                            r
                            for r in corner_rows
                            if r["noise"] == noise and r["condition"] == condition
                        ],
                        out / f"corner_ratio_{tag}.png",
                        f"corner ratio ({title})",
                    )
                )
            if not shown:
                continue
            figures.append(
                plot_norm_overlays(
                    images,
                    view["norms"],
                    view["found"],
                    out / f"norm_maps_{tag}.png",
                    shown,
                    group,
                    f"token norms, threshold {threshold} x {reference} ({title})",
                )
            )
            figures.append(
                plot_similarity_maps(
                    images,
                    view["sims"],
                    view["queries"],
                    out / f"similarity_maps_{tag}.png",
                    shown,
                    f"cosine to the query token ({title})",
                )
            )
    summary = {
        "definitions": DEFINITIONS,
        "parameters": parameters,
        "position_probes": probe_rows,
        "corner_ratio": corner_rows,
        "high_norm": count_rows,
        "similarity": similarity_rows,
        "label_comparison": comparison_rows,
        "figures": [str(f) for f in figures],
    }
    _write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, default=float))
    return summary


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


# ------------------------------------------------------------------------------------ demo

DEMO_SITES = (
    "unet.down_blocks.0",
    "unet.down_blocks.1",
    "unet.mid_block",
    "unet.up_blocks.1",
    "unet.up_blocks.2",
)


def demo(
    model: str | Path | Any = "tiny",
    out: str | Path = Path("runs/demo/anomalies"),
    items: int = 64,
    *,
    sites: Sequence[str] | None = None,
    noise_level: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """``make demo``: anomalies of ``model`` on ``items`` shapes-world images.

    Extracts unpooled features at ``sites`` (default: those of :data:`DEMO_SITES` the model has)
    at ``noise_level`` with the empty prompt into ``out/run``, then runs :func:`analyse_run`
    (position probes, corner ratios with the cropped images, high-norm counts, similarity maps)
    into ``out``, prints a short table and returns the numbers per site:
    ``{"sites": {site: {"grid", "row_exact", "col_exact", "row_chance", "col_chance",
    "corner_ratio", "high_norm_groups", "probes": {...}}}, "out": str}``."""
    import diffprobe
    from diffprobe.data.sources import open_source
    from diffprobe.extract.engine import ExtractionPlan, extract

    out = Path(out)
    loaded = diffprobe.load(model) if isinstance(model, (str, Path)) else model
    available = set(loaded.site_names(loaded.denoiser_name))
    chosen = list(sites) if sites is not None else [s for s in DEMO_SITES if s in available]
    skipped = [s for s in (sites or DEMO_SITES) if s not in available]
    if sites is not None and skipped:
        raise AnomalyError(
            f"sites {skipped} are not in {loaded.name}; `diffprobe sites MODEL` lists them"
        )
    if skipped:
        log.info("demo sites not in %s: %s", loaded.name, ", ".join(skipped))
    print(
        f"== anomalies on {loaded.name}: {items} shapes-world items, noise level {noise_level} ==",
        flush=True,
    )
    plan = ExtractionPlan(
        sites=chosen,
        noise_levels=[noise_level],
        pooling="none",
        seed=seed,
        chunk_items=max(items, 1),
    )
    root = extract(
        loaded,
        open_source(f"shapes:{items}:{seed}"),
        plan,
        out / "run",
        overwrite=True,
        progress=progress,
    )
    summary = analyse_run(root, out, model=loaded, seed=seed, progress=progress)
    for line in summary_lines(summary):
        print("  " + line, flush=True)
    print(f"  tables and plots in {out}/", flush=True)
    numbers: dict[str, dict] = {}
    for r in summary["position_probes"]:
        entry = numbers.setdefault(r["site"], {"grid": r["grid"], "probes": {}})
        entry["probes"][f"{r['axis']}_{r['binning']}"] = {
            "accuracy": r["accuracy"],
            "chance": r["chance"],
        }
        if r["binning"] == "exact":
            entry[f"{r['axis']}_exact"] = r["accuracy"]
            entry[f"{r['axis']}_chance"] = r["chance"]
    for r in summary["corner_ratio"]:
        numbers[r["site"]]["corner_ratio"] = r["ratio"]
    for r in summary["high_norm"]:
        numbers[r["site"]]["high_norm_groups"] = r["detections"]
        numbers[r["site"]]["images_with_high_norm"] = r["images_with_detections"]
    return {"sites": numbers, "out": str(out), "items": items, "noise_level": noise_level}
