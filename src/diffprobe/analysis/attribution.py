"""Attribution maps: pure maths on captured attention (arrays in, arrays out).

Definitions (the choices every function below states once):

- A **raw map** of one attention site, denoiser call and item is the image-query x text-key
  quadrant of the attention probabilities, softmax over all keys, mean over heads
  (:mod:`diffprobe.hooks.attention`): (image tokens, text tokens).
- Its **grid** comes from the site's token count and the image's aspect ratio
  (:func:`token_grid`), never from a hard-coded latent size.
- **Aggregation**: each site's maps are resized bilinearly to the finest grid of the sites
  aggregated (:func:`to_common_grid`), then averaged over the chosen sites (a layer group; by
  default every site but the UNet mid block, :func:`default_sites`, as DAAM) and the chosen
  denoiser calls (a timestep range). DAAM sums instead of averaging; the two differ
  by a constant factor, which the normalisation below removes.
- A **word map** is the sum of the maps of the word's tokens (every occurrence; a word split
  into several tokens sums its pieces), then resized bilinearly to the image size.
- **Thresholding** (for IoU) normalises a map to [0, 1] by its own minimum and maximum
  (:func:`normalise`) and keeps pixels ``>= threshold``; DAAM's published τ is 0.4.
- **Weighting** ``rollout`` (:func:`attention_rollout`, :func:`rollout_maps`): the map of an
  *input* word instead of a text *position*. A causal text encoder (CLIP) mixes each word
  into every later position, so later positions' maps also show that word; rollout gives
  input token t the maps of the positions that read it, Σ_j R[j, t] · map_j, R the text
  encoder's attention rollout (Abnar & Zuidema 2020). ``rollout-words`` then gives each
  pixel's share of those maps over the prompt's word tokens (:func:`word_share`: start and end
  tokens out, DAAM's ``normalize=True``), so the word that the attended positions draw most
  from gets most of the pixel. ``output-rollout-words`` does the same on the value-space
  scores of UNet cross-attention (``(W_o o_i) · (W_o v_t)``, the pixel's attention output
  against each token's value: ConceptAttention's output space where text tokens have no
  outputs) instead of the probabilities.
- **Output-space maps** (ConceptAttention style, MMDiT/FLUX): the image-token outputs dotted
  with the concept tokens' outputs, softmax over the concepts (:func:`concept_maps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError

__all__ = [
    "WEIGHTINGS",
    "ThresholdError",
    "attention_rollout",
    "centre_of_mass",
    "centred_gaussian",
    "concept_maps",
    "default_sites",
    "iou",
    "layer_group",
    "locate_tokens",
    "mean_iou",
    "normalise",
    "rollout_maps",
    "word_share",
    "threshold_sweep",
    "timestep_range",
    "to_common_grid",
    "to_grid",
    "token_grid",
    "upsample",
    "word_map",
]


WEIGHTINGS = ("attention", "rollout", "rollout-words", "output-rollout-words")


class ThresholdError(DiffprobeError, ValueError):
    """A threshold outside (0, 1)."""


def token_grid(image_tokens: int, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of ``image_tokens`` tokens laid out over an image of ``height`` x
    ``width`` px: the factor pair of ``image_tokens`` whose aspect ratio is closest to the
    image's (exact for every UNet level and DiT patch grid of a size the model takes)."""
    if image_tokens < 1:
        raise DiffprobeError(f"an attention site has {image_tokens} image tokens")
    target = math.log(height / width)
    best = None
    for rows in range(1, image_tokens + 1):
        if image_tokens % rows:
            continue
        columns = image_tokens // rows
        error = abs(math.log(rows / columns) - target)
        if best is None or error < best[0] - 1e-12:
            best = (error, rows, columns)
    return best[1], best[2]


def to_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(..., image tokens, text tokens) -> (..., text tokens, rows, columns); tokens are in
    row-major order (diffusers' flattening of (height, width), DiT patches alike)."""
    rows, columns = grid
    if maps.shape[-2] != rows * columns:
        raise DiffprobeError(f"{maps.shape[-2]} image tokens do not fill a {rows}x{columns} grid")
    moved = maps.transpose(-1, -2)
    return moved.reshape(*moved.shape[:-1], rows, columns)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (..., rows, columns) to (..., *size) (align_corners=False)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    resized = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return resized.reshape(*lead, *size)


def to_common_grid(maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Maps of several sites (each (..., rows_l, columns_l), same leading axes) resized to the
    finest grid among them and stacked on a new axis 0: ((sites, ..., rows, columns), grid)."""
    if not maps:
        raise DiffprobeError("no attention maps to aggregate")
    finest = max((tuple(m.shape[-2:]) for m in maps), key=lambda g: g[0] * g[1])
    return torch.stack([upsample(m, finest) for m in maps]), finest


def locate_tokens(prompt_ids: Sequence[int], word_ids: Sequence[int]) -> list[int]:
    """Positions in ``prompt_ids`` of every occurrence of the token sequence ``word_ids``."""
    prompt, word = list(prompt_ids), list(word_ids)
    if not word:
        return []
    return [
        position + offset
        for position in range(len(prompt) - len(word) + 1)
        if prompt[position : position + len(word)] == word
        for offset in range(len(word))
    ]


def word_map(maps: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """Sum of the token maps at ``positions``: (text tokens, ...) -> (...)."""
    if not positions:
        raise DiffprobeError("a word map needs at least one token position")
    return maps[list(positions)].sum(0)


def normalise(maps: np.ndarray | torch.Tensor) -> np.ndarray:
    """Each map (..., H, W) rescaled to [0, 1] by its own min and max (a flat map -> zeros)."""
    values = np.asarray(maps, dtype=np.float64)
    low = values.min(axis=(-2, -1), keepdims=True)
    high = values.max(axis=(-2, -1), keepdims=True)
    span = np.where(high - low > 0, high - low, 1.0)
    return (values - low) / span


def check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, (int, float)) and 0.0 < float(threshold) < 1.0):
        raise ThresholdError(
            f"threshold {threshold!r}: a threshold on maps normalised to [0, 1] lies strictly "
            "between 0 and 1 (DAAM uses 0.4)"
        )
    return float(threshold)


def iou(prediction: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Intersection over union of boolean (..., H, W) arrays; 1 where both are empty."""
    prediction, mask = np.asarray(prediction, bool), np.asarray(mask, bool)
    if prediction.shape != mask.shape:
        raise DiffprobeError(f"map of shape {prediction.shape} for a mask of shape {mask.shape}")
    inter = (prediction & mask).sum(axis=(-2, -1))
    union = (prediction | mask).sum(axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def mean_iou(maps: np.ndarray, masks: np.ndarray, threshold: float = 0.4) -> float:
    """Mean over items of the IoU of each normalised map (items, H, W) thresholded at
    ``threshold`` with its boolean mask (items, H, W)."""
    threshold = check_threshold(threshold)
    return float(iou(normalise(maps) >= threshold, masks).mean())


def threshold_sweep(
    maps: np.ndarray, masks: np.ndarray, thresholds: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, mIoU at each) for normalised maps against masks; default 0.05 .. 0.95."""
    taus = np.round(np.arange(0.05, 0.951, 0.05), 2) if thresholds is None else thresholds
    taus = np.array([check_threshold(float(t)) for t in taus])
    normalised = normalise(maps)
    scores = np.array([iou(normalised >= t, masks).mean() for t in taus])
    return taus, scores


def centred_gaussian(height: int, width: int, sigma: float = 0.25) -> np.ndarray:
    """A centred Gaussian map (height, width), ``sigma`` as a fraction of each side: the
    baseline that knows nothing but "objects tend to be central"."""
    ys = (np.arange(height) + 0.5) / height - 0.5
    xs = (np.arange(width) + 0.5) / width - 0.5
    return np.exp(-0.5 * ((ys[:, None] / sigma) ** 2 + (xs[None, :] / sigma) ** 2))


def centre_of_mass(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) centre of mass of non-negative maps (..., H, W) as fractions of the side, pixel
    centres at (index + ½) / side (the shapes world's convention)."""
    values = np.clip(np.asarray(maps, dtype=np.float64), 0, None)
    height, width = values.shape[-2:]
    total = np.maximum(values.sum(axis=(-2, -1)), 1e-30)
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    x = (values.sum(axis=-2) * xs).sum(-1) / total
    y = (values.sum(axis=-1) * ys).sum(-1) / total
    return x, y


def concept_maps(scores: torch.Tensor, concepts: Sequence[Sequence[int]]) -> torch.Tensor:
    """ConceptAttention-style maps: ``scores`` (..., image tokens, text tokens) of image
    outputs against text-token outputs; each concept is a list of token positions whose
    scores are summed; softmax over the concepts per image token -> (..., concepts, image
    tokens)."""
    columns = torch.stack([scores[..., list(c)].sum(-1) for c in concepts], dim=-1)
    return columns.softmax(-1).movedim(-1, -2)


def layer_group(site: str) -> str:
    """The layer group of an attention site: ``down``/``mid``/``up`` (UNets), ``joint`` (SD3, FLUX double-stream),
    ``single`` (FLUX single-stream)."""
    if ".down_blocks." in site:
        return "down"
    if ".mid_block." in site:
        return "mid"
    if ".up_blocks." in site:
        return "up"
    if ".single_transformer_blocks." in site:
        return "single"
    if ".transformer_blocks." in site and site.startswith("transformer."):
        return "joint"
    return "other"


def default_sites(sites: Sequence[str]) -> list[str]:
    """The sites aggregated by default: every one but the UNet mid block's, as DAAM (it never
    hooks the mid block and skips maps on its grid, SD 1.x's 8x8: ``daam/trace.py``). On
    `tiny` the mid block's 4x4 maps score below a centred Gaussian
    (``docs/attribution.md``). Families without a mid block keep every site."""
    kept = [s for s in sites if layer_group(s) != "mid"]
    return kept or list(sites)


def timestep_range(noise_level: float) -> str:
    """``early`` (noise level > 2/3, the first calls of a generation), ``middle``, ``late``
    (noise level < 1/3)."""
    if noise_level > 2 / 3:
        return "early"
    if noise_level >= 1 / 3:
        return "middle"
    return "late"


def attention_rollout(attentions: np.ndarray | torch.Tensor) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020) of a text encoder: ``attentions`` (layers,
    tokens, tokens), each layer's self-attention averaged over heads, rows the queries, layers
    in order. Each layer becomes 0.5 · A + 0.5 · I (the residual stream), rows renormalised;
    R = Ã_L ⋯ Ã_1. Returns R (tokens, tokens), float64: R[j, t] is how much position j's
    output draws from input token t (each row sums to 1)."""
    layers = np.asarray(attentions, dtype=np.float64)
    if layers.ndim != 3 or layers.shape[1] != layers.shape[2]:
        raise DiffprobeError(
            f"attention rollout needs (layers, tokens, tokens) attention; got {layers.shape}"
        )
    identity = np.eye(layers.shape[-1])
    result = identity.copy()
    for attention in layers:
        mixed = 0.5 * attention + 0.5 * identity
        result = (mixed / mixed.sum(-1, keepdims=True)) @ result
    return result


def rollout_maps(maps: np.ndarray, rollout: np.ndarray) -> np.ndarray:
    """Maps of input tokens from maps of text positions: ``maps`` (positions, ...) and
    ``rollout`` (positions, tokens), R[j, t] = share of input token t in position j ->
    (tokens, ...) = Σ_j R[j, t] · maps[j]."""
    values = np.asarray(maps)
    weights = np.asarray(rollout, dtype=np.float64)
    if weights.shape[0] != values.shape[0]:
        raise DiffprobeError(
            f"a rollout over {weights.shape[0]} positions for maps of {values.shape[0]} tokens"
        )
    flat = values.reshape(values.shape[0], -1).astype(np.float64)
    return (weights.T @ flat).reshape(weights.shape[1], *values.shape[1:]).astype(values.dtype)


def word_share(maps: np.ndarray, words: Sequence[bool]) -> np.ndarray:
    """Each pixel's share over the word tokens: ``maps`` (tokens, ...), negative values set
    to 0, divided by the sum of the maps of the tokens where ``words`` is True (start and end
    tokens False; DAAM's ``normalize=True``); every token is divided, word or not."""
    values = np.clip(np.asarray(maps), 0, None)
    chosen = np.asarray(words, dtype=bool)
    if chosen.shape != values.shape[:1] or not chosen.any():
        raise DiffprobeError(
            f"a word share needs one flag per token ({values.shape[0]}) and at least one word"
        )
    total = values[chosen].sum(0, keepdims=True)
    return values / np.maximum(total, np.finfo(np.float32).tiny)


def check_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise DiffprobeError(
            f"weighting {weighting!r}: expected one of {', '.join(WEIGHTINGS)} (attention: the "
            "cross-attention map of each text position; rollout: of each input word, through "
            "the text encoder's attention rollout; rollout-words: then each pixel's share over "
            "the prompt's words; output-rollout-words: the same on value-space scores)"
        )
    return weighting
