"""The shapes world: 64×64 images of one coloured shape with known factors and a caption.

Every item is drawn from its own generator seeded by ``(seed, item, split)``, so item ``i`` of
``sample(n, seed)`` is the same whatever ``n`` is, and results never depend on batch size.

Factors of one item (all stored as arrays of length ``items`` in ``ShapesSample.factors``):

==============  =======  ====================================================================
name            dtype    meaning
==============  =======  ====================================================================
``shape``       int64    index into ``SHAPES``
``colour``      int64    index into ``COLOUR_NAMES`` (the keys of ``COLOURS``)
``size``        int64    index into ``SIZES`` (radius in px: ``SIZE_RADII``)
``x``, ``y``    float64  centre of the shape as a fraction of the image width / height, in [0, 1]
``quadrant``    int64    index into ``QUADRANTS``, a function of ``x`` and ``y``
``background``  int64    index into ``BACKGROUND_NAMES`` (the keys of ``BACKGROUNDS``)
``rotation``    float64  rotation of the shape in degrees, uniform in ±``MAX_ROTATION``
``template``    int64    index into ``CAPTION_TEMPLATES`` used for the item's caption
==============  =======  ====================================================================

This module needs only numpy and PIL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_NAMES",
    "CAPTION_TEMPLATES",
    "COLOURS",
    "COLOUR_NAMES",
    "FACTOR_NAMES",
    "HELDOUT_COMBINATIONS",
    "IMAGE_SIZE",
    "MAX_ROTATION",
    "MIDLINE_GAP",
    "QUADRANTS",
    "SHAPES",
    "SIZES",
    "SIZE_RADII",
    "SPLITS",
    "ShapesSample",
    "all_combinations",
    "caption",
    "combinations",
    "item_factors",
    "masks",
    "quadrant_of",
    "render",
    "sample",
    "shape_mask",
]

IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")

# Saturated hues spread round the colour circle; on a grey background a saturated foreground is
# found analytically from its distance to the background colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 25),
    "green": (35, 185, 45),
    "cyan": (25, 205, 215),
    "blue": (35, 65, 230),
    "purple": (140, 45, 210),
    "pink": (240, 95, 185),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# Radius of the circle that holds the shape, in px of the 64×64 image.
SIZE_RADII: dict[str, float] = {"small": 8.0, "large": 14.0}
SIZES: tuple[str, ...] = tuple(SIZE_RADII)

BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (20, 20, 20), "white": (235, 235, 235)}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")

MAX_ROTATION = 15.0
# Centres stay at least this many px from the vertical and horizontal midlines, so the quadrant
# named in the caption is never ambiguous.
MIDLINE_GAP = 4.0

FACTOR_NAMES: tuple[str, ...] = (
    "shape",
    "colour",
    "size",
    "x",
    "y",
    "quadrant",
    "background",
    "rotation",
    "template",
)

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} in the {quadrant}",
    "a {colour} {shape}, {size}, {quadrant}",
    "{quadrant}: a {size} {colour} {shape}",
    "a {size} {colour} {shape} in the {quadrant} on a {background} background",
    "a {colour} {shape} on {background}, {size}, in the {quadrant}",
)

SPLITS: tuple[str, ...] = ("train", "heldout", "all")

Combination = tuple[int, int, int, int, int]  # (shape, colour, size, quadrant, background)


def _heldout_combinations() -> frozenset[Combination]:
    # One (size, quadrant) pair per (shape, colour) concept, in both backgrounds: every concept
    # appears in both splits, each shape and each colour has every (size, quadrant) held out
    # exactly once across its partners, and because a held-out tuple is held out on both
    # backgrounds, no caption of a held-out item (with or without the background) is a training
    # caption. 48 of 384 tuples = 12.5 % of the combinations.
    held = set()
    for shape in range(len(SHAPES)):
        for colour in range(len(COLOURS)):
            slot = (3 * shape + colour) % (len(SIZES) * len(QUADRANTS))
            size, quadrant = divmod(slot, len(QUADRANTS))
            for background in range(len(BACKGROUNDS)):
                held.add((shape, colour, size, quadrant, background))
    return frozenset(held)


HELDOUT_COMBINATIONS: frozenset[Combination] = _heldout_combinations()


def all_combinations() -> list[Combination]:
    """Every (shape, colour, size, quadrant, background) tuple, in lexicographic order."""
    return [
        (s, c, z, q, b)
        for s in range(len(SHAPES))
        for c in range(len(COLOURS))
        for z in range(len(SIZES))
        for q in range(len(QUADRANTS))
        for b in range(len(BACKGROUNDS))
    ]


@cache
def combinations(split: str = "train") -> tuple[Combination, ...]:
    """The (shape, colour, size, quadrant, background) tuples that ``split`` draws from."""
    if split == "all":
        return tuple(all_combinations())
    if split == "train":
        return tuple(c for c in all_combinations() if c not in HELDOUT_COMBINATIONS)
    if split == "heldout":
        return tuple(c for c in all_combinations() if c in HELDOUT_COMBINATIONS)
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def quadrant_of(x: float | np.ndarray, y: float | np.ndarray) -> int | np.ndarray:
    """Index into ``QUADRANTS`` of a centre ``(x, y)`` given as fractions of the image side."""
    quadrant = 2 * (np.asarray(y) >= 0.5) + (np.asarray(x) >= 0.5)
    return int(quadrant) if np.ndim(quadrant) == 0 else quadrant.astype(np.int64)


# ---------------------------------------------------------------------------------- drawing


def _regular(points: int, radius: float, phase: float) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(points) / points
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _area_centroid(points: np.ndarray) -> np.ndarray:
    # Every outline is centred on its centre of mass, so the centre (x, y) of an item is the
    # centroid of its ink, which an analytic reader measures without knowing the shape.
    following = np.roll(points, -1, axis=0)
    cross = points[:, 0] * following[:, 1] - following[:, 0] * points[:, 1]
    return ((points + following) * cross[:, None]).sum(0) / (3 * cross.sum())


@cache
def _outline(shape: int) -> np.ndarray:
    """Polygon vertices (vertices, 2) of a shape in units of its radius, y pointing down."""
    name = SHAPES[shape]
    if name == "circle":
        return _regular(96, 0.9, 0.0)
    if name == "square":
        return _regular(4, 0.75 * np.sqrt(2), np.pi / 4)
    if name == "triangle":
        return _regular(3, 1.0, -np.pi / 2)
    if name == "star":
        outer = _regular(5, 1.0, -np.pi / 2)
        inner = _regular(5, 0.45, -np.pi / 2 + np.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(10, 2)
    if name == "cross":
        arm, half = 0.95, 0.32
        return np.array(
            [
                (half, -arm), (half, -half), (arm, -half), (arm, half), (half, half),
                (half, arm), (-half, arm), (-half, half), (-arm, half), (-arm, -half),
                (-half, -half), (-half, -arm),
            ]
        )  # fmt: skip
    if name == "heart":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        px = 16 * np.sin(t) ** 3
        py = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        points = np.stack([px, py], axis=1)
        points -= _area_centroid(points)
        return 0.95 * points / np.linalg.norm(points, axis=1).max()
    raise AssertionError(name)


def _extent(radius: float) -> float:
    """Largest distance of any drawn pixel from the centre, for any shape and rotation."""
    return 1.07 * radius + 1.0


def _index(value: int | str, names: tuple[str, ...], factor: str) -> int:
    if isinstance(value, str):
        if value not in names:
            raise ValueError(f"unknown {factor} {value!r}; expected one of {names}")
        return names.index(value)
    index = int(value)
    if not 0 <= index < len(names):
        raise ValueError(f"{factor} index {index} out of range 0..{len(names) - 1} ({names})")
    return index


def _coverage(
    shape: int | str,
    size: int | str,
    x: float,
    y: float,
    rotation: float,
    image_size: int,
    supersample: int,
) -> np.ndarray:
    """Fraction of each pixel the shape covers, float32 (height, width) in [0, 1]."""
    shape = _index(shape, SHAPES, "shape")
    size = _index(size, SIZES, "size")
    radius = SIZE_RADII[SIZES[size]] * image_size / IMAGE_SIZE
    angle = -np.deg2rad(rotation)  # y points down, so a negative angle turns counter-clockwise
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = _outline(shape) @ turn.T * radius + np.array([x, y]) * image_size
    points = points * supersample
    mask = Image.new("L", (image_size * supersample, image_size * supersample), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in points], fill=255)
    return np.asarray(mask.reduce(supersample), dtype=np.float32) / 255.0


def shape_mask(
    shape: int | str,
    size: int | str,
    x: float,
    y: float,
    rotation: float = 0.0,
    *,
    image_size: int = IMAGE_SIZE,
    supersample: int = 4,
) -> np.ndarray:
    """The ground-truth mask of one item from the generator's own geometry: bool (height,
    width), True where the shape covers at least half of the pixel (the same polygon and
    supersampling ``render`` draws)."""
    return _coverage(shape, size, x, y, rotation, image_size, supersample) >= 0.5


def masks(factors: dict[str, np.ndarray]) -> np.ndarray:
    """Masks of every item of a sample's ``factors``: bool (items, 64, 64)."""
    count = len(factors["shape"])
    out = np.zeros((count, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for i in range(count):
        out[i] = shape_mask(
            int(factors["shape"][i]), int(factors["size"][i]), float(factors["x"][i]),
            float(factors["y"][i]), float(factors["rotation"][i]),
        )  # fmt: skip
    return out


def render(
    shape: int | str,
    colour: int | str,
    size: int | str,
    x: float,
    y: float,
    background: int | str,
    rotation: float = 0.0,
    *,
    image_size: int = IMAGE_SIZE,
    supersample: int = 4,
) -> np.ndarray:
    """Draw one item: uint8 array (height, width, 3) = (64, 64, 3).

    Factors are indices (or names) as in ``SHAPES``, ``COLOURS``, ``SIZES``, ``BACKGROUNDS``;
    ``x``, ``y`` are the centre as fractions of the image side and ``rotation`` is in degrees
    (counter-clockwise as seen). The shape is drawn at ``supersample``× and box-downsampled, so
    edges are anti-aliased.
    """
    shape = _index(shape, SHAPES, "shape")
    colour = _index(colour, COLOUR_NAMES, "colour")
    size = _index(size, SIZES, "size")
    background = _index(background, BACKGROUND_NAMES, "background")
    alpha = _coverage(shape, size, x, y, rotation, image_size, supersample)[..., None]

    ground = np.array(BACKGROUNDS[BACKGROUND_NAMES[background]], dtype=np.float32)
    ink = np.array(COLOURS[COLOUR_NAMES[colour]], dtype=np.float32)
    image = ground + (ink - ground) * alpha
    return np.rint(image).astype(np.uint8)


# ---------------------------------------------------------------------------------- captions


_ARTICLE_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")


def caption(factors: dict, template: int | str | None = None) -> str:
    """Caption of one item from its factors (a dict of scalars, see ``item_factors``).

    ``template`` is an index into ``CAPTION_TEMPLATES`` or a format string with the fields
    ``{size} {colour} {shape} {quadrant} {background}``; by default the item's own ``template``
    factor, or template 0 when it has none.
    """
    if template is None:
        template = int(factors.get("template", 0))
    if not isinstance(template, str):
        template = CAPTION_TEMPLATES[int(template)]
    quadrant = factors.get("quadrant")
    if quadrant is None:
        quadrant = quadrant_of(factors["x"], factors["y"])
    text = template.format(
        shape=SHAPES[int(factors["shape"])],
        colour=COLOUR_NAMES[int(factors["colour"])],
        size=SIZES[int(factors["size"])],
        quadrant=QUADRANTS[int(quadrant)],
        background=BACKGROUND_NAMES[int(factors["background"])],
    )
    return _ARTICLE_BEFORE_VOWEL.sub("an ", text)


# ---------------------------------------------------------------------------------- sampling


@dataclass
class ShapesSample:
    """``images``: uint8 (items, 64, 64, 3); ``factors``: name -> array (items,); ``captions``;
    ``masks`` (computed on use): bool (items, 64, 64)."""

    images: np.ndarray
    factors: dict[str, np.ndarray]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def item(self, index: int) -> dict:
        """Factors of one item as a dict of Python scalars."""
        return item_factors(self.factors, index)

    @property
    def masks(self) -> np.ndarray:
        """Ground-truth shape masks, bool (items, 64, 64), from the generator's geometry."""
        return masks(self.factors)


def item_factors(factors: dict[str, np.ndarray], index: int) -> dict:
    """Factors of item ``index`` as a dict of Python scalars (ints and floats)."""
    return {name: values[index].item() for name, values in factors.items()}


def _centre(rng: np.random.Generator, high_side: bool, radius: float) -> float:
    """A centre coordinate (fraction of the side) on one side of the midline, shape inside."""
    extent = _extent(radius)
    middle = IMAGE_SIZE / 2
    if high_side:
        low, high = middle + MIDLINE_GAP, IMAGE_SIZE - extent
    else:
        low, high = extent, middle - MIDLINE_GAP
    return rng.uniform(low, high) / IMAGE_SIZE


@cache
def _pool(split: str, shape: int | None, colour: int | None) -> tuple[Combination, ...]:
    pool = tuple(
        combo
        for combo in combinations(split)
        if (shape is None or combo[0] == shape) and (colour is None or combo[1] == colour)
    )
    if not pool:
        raise ValueError(f"split {split!r} has no combination with shape {shape}, colour {colour}")
    return pool


def _draw_factors(seed: int, index: int, split: str, pool: tuple[Combination, ...]) -> dict:
    rng = np.random.default_rng([seed, index, SPLITS.index(split)])
    shape, colour, size, quadrant, background = pool[rng.integers(len(pool))]
    radius = SIZE_RADII[SIZES[size]]
    return {
        "shape": shape,
        "colour": colour,
        "size": size,
        "x": _centre(rng, bool(quadrant % 2), radius),
        "y": _centre(rng, bool(quadrant // 2), radius),
        "quadrant": quadrant,
        "background": background,
        "rotation": rng.uniform(-MAX_ROTATION, MAX_ROTATION),
        "template": int(rng.integers(len(CAPTION_TEMPLATES))),
    }


_FLOAT_FACTORS = ("x", "y", "rotation")


def sample(
    n: int,
    seed: int = 0,
    split: str = "train",
    start: int = 0,
    *,
    shape: int | str | None = None,
    colour: int | str | None = None,
) -> ShapesSample:
    """Items ``start .. start + n - 1`` of the ``split`` stream of ``seed``.

    ``split``: ``"train"`` draws from the combinations not in ``HELDOUT_COMBINATIONS``,
    ``"heldout"`` only from those, ``"all"`` from every combination. Item ``i`` depends only on
    ``(seed, i, split)`` (and on ``shape`` / ``colour``, which restrict the combinations drawn
    from), so ``sample(10).images[3]`` equals ``sample(1, start=3).images[0]``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    pool = _pool(
        split,
        None if shape is None else _index(shape, SHAPES, "shape"),
        None if colour is None else _index(colour, COLOUR_NAMES, "colour"),
    )
    items = [_draw_factors(seed, start + i, split, pool) for i in range(n)]
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, item in enumerate(items):
        images[i] = render(
            item["shape"], item["colour"], item["size"], item["x"], item["y"],
            item["background"], item["rotation"],
        )  # fmt: skip
    factors = {
        name: np.array(
            [item[name] for item in items],
            dtype=np.float64 if name in _FLOAT_FACTORS else np.int64,
        )
        for name in FACTOR_NAMES
    }
    return ShapesSample(images=images, factors=factors, captions=[caption(it) for it in items])
