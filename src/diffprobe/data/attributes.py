"""Read the factors of the shapes world off images, e.g. off images a model generated.

Background, colour, position, quadrant and size are read analytically:

1. the background colour is the median of the 2-px border ring; ``background`` is the nearest
   entry of ``BACKGROUNDS``;
2. the ink of each pixel is its RGB distance to that background, and the foreground weight is the
   ink rescaled to [0, 1] against the image's own strongest ink (so blur and contrast loss do not
   matter);
3. ``colour``: an anti-aliased or blurred pixel is a mix ``a·ink + (1 - a)·background``, so every
   candidate colour defines a line from the background; the colour whose line passes closest to the
   strongly inked pixels wins;
4. ``x``, ``y``: centroid of the foreground weight (pixel centres at (column + ½) / 64), which is
   the definition the generator uses for a shape's centre; ``quadrant`` follows from them;
5. ``size``: the ink area divided by the unit area of the read shape gives a radius, compared with
   the geometric mean of the two ``SIZE_RADII``.

``shape`` is read by a small CNN on the foreground weight, cropped around the centroid, so it never
sees colour or background. It is trained by ``diffprobe.train.reader.train_attribute_reader()`` on generator images with
blur, noise, colour jitter and JPEG augmentation; its weights ship in
``diffprobe/assets/attribute_reader.safetensors`` and are loaded once, on first use.

Items with no readable foreground get ``-1`` for the integer attributes and NaN for ``x``, ``y``.
"""

from __future__ import annotations

import io
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

from diffprobe.data import shapes

__all__ = [
    "READER_PATH",
    "ShapeReader",
    "attribute_accuracy",
    "degrade",
    "foreground_masks",
    "read_attributes",
]

READER_PATH = Path(str(resources.files("diffprobe"))) / "assets" / "attribute_reader.safetensors"

CROP = 48  # side of the window around the centroid that the shape CNN sees, in px
_BORDER = 2
# Below this ink (RGB distance to the background) an image counts as blank.
_MIN_INK = 40.0
_NO_READING = -1


# ---------------------------------------------------------------------------------- analytic part


def _background(images: np.ndarray) -> np.ndarray:
    """Median border colour, float (items, 3)."""
    ring = np.concatenate(
        [
            images[:, :_BORDER].reshape(len(images), -1, 3),
            images[:, -_BORDER:].reshape(len(images), -1, 3),
            images[:, _BORDER:-_BORDER, :_BORDER].reshape(len(images), -1, 3),
            images[:, _BORDER:-_BORDER, -_BORDER:].reshape(len(images), -1, 3),
        ],
        axis=1,
    )
    return np.median(ring.astype(np.float32), axis=1)


def _foreground(images: np.ndarray, ground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ink (items, height, width) and the per-item strongest ink (items,)."""
    ink = np.linalg.norm(images.astype(np.float32) - ground[:, None, None, :], axis=-1)
    flat = ink.reshape(len(images), -1)
    # A high quantile rather than the max, so single noisy pixels do not set the scale; 0.997 of
    # 4096 pixels leaves the 12 strongest, fewer than the smallest shape covers.
    strongest = np.quantile(flat, 0.997, axis=1)
    return ink, strongest


def _weights(ink: np.ndarray, strongest: np.ndarray) -> np.ndarray:
    """Foreground weight in [0, 1]: 0 below 30 % of the strongest ink, 1 above 70 %."""
    scale = np.maximum(strongest, _MIN_INK)[:, None, None]
    return np.clip((ink / scale - 0.3) / 0.4, 0.0, 1.0)


def _unit_areas() -> np.ndarray:
    areas = []
    for index in range(len(shapes.SHAPES)):
        points = shapes._outline(index)
        following = np.roll(points, -1, axis=0)
        areas.append(
            0.5 * abs(np.sum(points[:, 0] * following[:, 1] - following[:, 0] * points[:, 1]))
        )
    return np.array(areas)


def _read_colour(
    images: np.ndarray, ground: np.ndarray, ink: np.ndarray, strongest: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Colour index (items,) and per-pixel mixing coefficient of the chosen colour (≤ 1)."""
    palette = np.array(list(shapes.COLOURS.values()), dtype=np.float32)  # (colours, 3)
    pixels = images.astype(np.float32) - ground[:, None, None, :]  # (items, h, w, 3)
    core = ink >= 0.5 * np.maximum(strongest, _MIN_INK)[:, None, None]
    colours = np.full(len(images), _NO_READING, dtype=np.int64)
    alpha = np.zeros(ink.shape, dtype=np.float32)
    for item in range(len(images)):
        if strongest[item] < _MIN_INK:
            continue
        mixed = pixels[item][core[item]]  # (pixels, 3)
        weight = ink[item][core[item]]
        lines = palette - ground[item]  # (colours, 3)
        lengths = np.maximum((lines**2).sum(1), 1.0)
        amount = np.clip(mixed @ lines.T / lengths, 0.0, 1.2)  # (pixels, colours)
        residual = np.linalg.norm(mixed[:, None, :] - amount[..., None] * lines, axis=-1)
        colours[item] = int(np.argmin((residual * weight[:, None]).sum(0)))
        line = lines[colours[item]]
        alpha[item] = np.minimum(pixels[item] @ line / lengths[colours[item]], 1.0)
    return colours, alpha


def _dilate(masks: np.ndarray, pixels: int) -> np.ndarray:
    """Box dilation of boolean masks (items, height, width) by ``pixels`` in each direction."""
    height, width = masks.shape[1:]
    padded = np.pad(masks, ((0, 0), (pixels, pixels), (pixels, pixels)))
    rows = np.zeros((len(masks), height + 2 * pixels, width), dtype=bool)
    for shift in range(2 * pixels + 1):
        rows |= padded[:, :, shift : shift + width]
    out = np.zeros(masks.shape, dtype=bool)
    for shift in range(2 * pixels + 1):
        out |= rows[:, shift : shift + height]
    return out


def _centroid(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    side = weights.shape[-1]
    centres = (np.arange(side) + 0.5) / side
    mass = weights.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (weights.sum(1) * centres).sum(1) / mass
        y = (weights.sum(2) * centres).sum(1) / mass
    return x, y


def _box3(images: np.ndarray) -> np.ndarray:
    """3×3 box average of (items, height, width, channels), edges repeated; float32."""
    padded = np.pad(images.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows = padded[:, :, :-2] + padded[:, :, 1:-1] + padded[:, :, 2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0


def _locate(
    images: np.ndarray, ground: np.ndarray, ink: np.ndarray, strongest: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Foreground weight, the region near the shape, centroid x, y and blank flags.

    Position and region come from a 3×3-smoothed copy, which divides pixel noise by 3 so that
    noise does not pull the centroid towards the middle; the weight the shape CNN sees is not
    smoothed.
    """
    smooth_ink, smooth_strongest = _foreground(_box3(images), ground)
    smooth_weights = _weights(smooth_ink, smooth_strongest)
    blank = smooth_strongest < _MIN_INK
    x, y = _centroid(smooth_weights)
    x[blank], y[blank] = np.nan, np.nan
    near = _dilate(smooth_weights > 0, 4)
    return _weights(ink, strongest), near, x, y, blank


def _crops(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Windows (items, CROP, CROP) of the foreground weight centred on the centroid."""
    items, side = len(weights), weights.shape[-1]
    padded = np.pad(weights, ((0, 0), (CROP, CROP), (CROP, CROP)))
    crops = np.zeros((items, CROP, CROP), dtype=np.float32)
    for item in range(items):
        if not np.isfinite(x[item]):
            continue
        left = int(round(x[item] * side)) - CROP // 2 + CROP
        top = int(round(y[item] * side)) - CROP // 2 + CROP
        crops[item] = padded[item, top : top + CROP, left : left + CROP]
    return crops


# ---------------------------------------------------------------------------------- shape CNN


class ShapeReader(nn.Module):
    """CNN from foreground weight (items, 1, CROP, CROP) to shape logits (items, len(SHAPES))."""

    def __init__(self, width: int = 24, classes: int = len(shapes.SHAPES)) -> None:
        super().__init__()

        def block(inputs: int, outputs: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(inputs, outputs, 3, padding=1),
                nn.BatchNorm2d(outputs),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(1, width),
            nn.MaxPool2d(2),  # 24
            block(width, 2 * width),
            nn.MaxPool2d(2),  # 12
            block(2 * width, 2 * width),
            nn.MaxPool2d(2),  # 6
            block(2 * width, 4 * width),
        )
        self.head = nn.Linear(8 * width, classes)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        features = self.features(crops)
        pooled = torch.cat([features.mean((2, 3)), features.amax((2, 3))], dim=1)
        return self.head(pooled)


@cache
def _load_reader(path: str) -> ShapeReader:
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise FileNotFoundError(
            f"no shape reader weights at {path}; train them with "
            "`python -m diffprobe.data.attributes`"
        )
    model = ShapeReader()
    model.load_state_dict(load_file(path))
    return model.eval()


def _classify(crops: np.ndarray, model: ShapeReader, batch_size: int = 512) -> np.ndarray:
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(crops), batch_size):
            batch = torch.from_numpy(crops[start : start + batch_size]).unsqueeze(1)
            predictions.append(model(batch).argmax(1).numpy())
    return np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------- public API


def foreground_masks(images: np.ndarray) -> np.ndarray:
    """The reader's segmentation: bool (items, height, width), True where a pixel's foreground
    weight (its ink against the border's background colour, scaled by the image's strongest
    ink: 0 below 30 %, 1 above 70 %) is at least ½. The ground-truth mask of a generated image,
    whose shape geometry is unknown."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 (items, height, width, 3), got {images.dtype} {images.shape}"
        )
    ink, strongest = _foreground(images, _background(images))
    return _weights(ink, strongest) >= 0.5


def read_attributes(
    images: np.ndarray, reader_path: str | Path | None = None
) -> dict[str, np.ndarray]:
    """Read the factors of shapes-world images.

    ``images``: uint8 (items, 64, 64, 3). Returns ``colour``, ``shape``, ``size``, ``quadrant``,
    ``background`` (int64 indices into the constants of ``diffprobe.data.shapes``, ``-1`` where no
    foreground is found) and ``x``, ``y`` (float64 centroid as a fraction of the side, NaN where
    no foreground is found), each of length ``items``.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 (items, height, width, 3), got {images.dtype} {images.shape}"
        )
    ground = _background(images)
    palette = np.array(list(shapes.BACKGROUNDS.values()), dtype=np.float32)
    background = np.linalg.norm(ground[:, None] - palette[None], axis=-1).argmin(1)

    ink, strongest = _foreground(images, ground)
    weights, near, x, y, blank = _locate(images, ground, ink, strongest)
    colour, alpha = _read_colour(images, ground, ink, strongest)
    quadrant = np.where(blank, _NO_READING, 2 * (y >= 0.5) + (x >= 0.5)).astype(np.int64)

    model = _load_reader(str(reader_path or READER_PATH))
    shape = _classify(_crops(weights, x, y), model).astype(np.int64)
    shape[blank] = _NO_READING

    # Sizes are read from the ink area, which blur preserves: the mixing coefficient sums to the
    # area in px. It is summed unclipped near the shape, where zero-mean noise cancels out.
    area = np.where(near, alpha, 0.0).sum((1, 2)) * (64 / images.shape[2]) ** 2
    radius = np.sqrt(area / _unit_areas()[np.clip(shape, 0, None)])
    radii = list(shapes.SIZE_RADII.values())
    size = np.where(blank, _NO_READING, radius > np.sqrt(radii[0] * radii[1])).astype(np.int64)
    return {
        "colour": colour,
        "shape": shape,
        "size": size,
        "x": x.astype(np.float64),
        "y": y.astype(np.float64),
        "quadrant": quadrant,
        "background": background.astype(np.int64),
    }


_COMPARED = ("colour", "shape", "size", "quadrant", "background")


def attribute_accuracy(
    images: np.ndarray, factors: dict[str, np.ndarray], reader_path: str | Path | None = None
) -> dict[str, float]:
    """Fraction of items whose read attribute equals the true factor, per attribute.

    ``factors``: as in ``ShapesSample.factors`` (at least the compared names); also returns
    ``position_error``, the mean distance in px between read and true centres. Where
    ``factors`` has ``template``, ``background`` is scored only over items whose caption
    template names the background (the others were free to draw either); the count is in
    ``background_items``.
    """
    read = read_attributes(images, reader_path)
    scores = {
        name: float(np.mean(read[name] == np.asarray(factors[name])))
        for name in _COMPARED
        if name in factors
    }
    if "background" in scores and "template" in factors:
        stated = np.array(["{background}" in shapes.CAPTION_TEMPLATES[t]
                           for t in np.asarray(factors["template"])])  # fmt: skip
        scores["background_items"] = int(stated.sum())
        scores["background"] = (
            float(np.mean(read["background"][stated] == np.asarray(factors["background"])[stated]))
            if stated.any() else float("nan")
        )  # fmt: skip
    if "x" in factors and "y" in factors:
        distance = np.hypot(read["x"] - factors["x"], read["y"] - factors["y"])
        scores["position_error"] = float(np.nanmean(distance) * images.shape[2])
    return scores


# ---------------------------------------------------------------------------------- degradation


def _blur(image: Image.Image, rng: np.random.Generator, sigma: float | None) -> Image.Image:
    radius = rng.uniform(0.0, 1.6) if sigma is None else sigma
    return image.filter(ImageFilter.GaussianBlur(radius)) if radius > 0.05 else image


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def degrade(
    images: np.ndarray,
    seed: int = 0,
    *,
    blur: float | None = None,
    noise: float | None = None,
    jpeg: int | None = None,
    jitter: float | None = None,
    soften: bool | None = None,
) -> np.ndarray:
    """Degrade uint8 images (items, h, w, 3) the way a small generator does.

    Each argument fixes one degradation (``blur``: gaussian sigma in px; ``noise``: gaussian sigma
    in 0..255 units; ``jpeg``: JPEG quality; ``jitter``: largest per-channel gain/offset change as
    a fraction; ``soften``: down- and up-sample by 2); ``None`` draws it at random per item from
    ``seed`` and ``0`` / ``False`` turns it off. Item ``i`` depends only on ``(seed, i)``.
    """
    out = np.empty_like(images)
    for item, array in enumerate(images):
        rng = np.random.default_rng([seed, item, 7])
        image = Image.fromarray(array)
        do_soften = rng.random() < 0.3 if soften is None else soften
        if do_soften:
            small = image.resize((array.shape[1] // 2, array.shape[0] // 2), Image.BILINEAR)
            image = small.resize((array.shape[1], array.shape[0]), Image.BILINEAR)
        image = _blur(image, rng, blur)
        pixels = np.asarray(image, dtype=np.float32)
        spread = rng.uniform(0.0, 0.12) if jitter is None else jitter
        gain = 1.0 + rng.uniform(-spread, spread, size=3)
        offset = 255.0 * rng.uniform(-spread, spread, size=3) / 2
        sigma = rng.uniform(0.0, 18.0) if noise is None else noise
        pixels = pixels * gain + offset + rng.normal(0.0, 1.0, pixels.shape) * sigma
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
        quality = (int(rng.integers(25, 95)) if rng.random() < 0.5 else 0) if jpeg is None else jpeg
        if quality:
            image = _jpeg(image, quality)
        out[item] = np.asarray(image)
    return out
