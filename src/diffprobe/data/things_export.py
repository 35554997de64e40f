"""The shapes world in the THINGS file layout, with odd-one-out triplets from a known similarity.

Concepts are colour × shape (8 × 6 = 48), index ``colour * len(SHAPES) + shape``. Layout written
by ``export_things(root)``::

    root/things_concepts.tsv             uniqueID, Word, colour, shape, colour_index, shape_index,
                                         hue_degrees; row order is the concept index
    root/images/<uniqueID>/<uniqueID>_NN.png   NN = 01 .. images_per_concept, 64×64 RGB
    root/triplets/train_90.npy           int64 (triplets, 3), 0-based concept indices,
    root/triplets/test_10.npy            columns 0 and 1 the chosen pair, column 2 the odd one out
    root/triplets/repeated_triplets.npy  int64 (repeated, 3), the repeated triplets (sorted)
    root/triplets/repeated.npy           int64 (repeated, repeats), odd-one-out concept per repeat
    root/triplets/noise_ceiling.json     measured and expected ceilings and their definitions
    root/ground_truth.json               similarity formula, parameters, matrix, temperature

Train and test triplets come from a 90 / 10 split of all unordered triplets of distinct concepts,
so no test triplet is a training triplet; repeated triplets are drawn from the test part.

Ground truth (all parameters in ``ground_truth.json``)::

    colour_similarity[a, b] = exp(-hue_distance(a, b)^2 / (2 * COLOUR_SIGMA^2))     (degrees)
    shape_similarity[a, b]  = exp(-||features[a] - features[b]||^2 / (2 * SHAPE_SIGMA^2))
    similarity[i, j]        = COLOUR_WEIGHT * colour_similarity + SHAPE_WEIGHT * shape_similarity

A simulated participant sees (i, j, k) and picks the most similar pair by a Luce / softmax rule,
P(pair) ∝ exp(similarity(pair) / TEMPERATURE); the odd one out is the item not in that pair.
"""

from __future__ import annotations

import colorsys
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from diffprobe.data import shapes
from diffprobe.data.sources import DataError
from diffprobe.data.things import noise_ceiling
from diffprobe.io import atomic_path, claim_output, write_json, write_text

__all__ = [
    "COLOUR_SIGMA",
    "COLOUR_WEIGHT",
    "SHAPE_FEATURES",
    "SHAPE_FEATURE_NAMES",
    "SHAPES_FACTOR_NAMES",
    "SHAPE_SIGMA",
    "SHAPE_WEIGHT",
    "TEMPERATURE",
    "choice_probabilities",
    "colour_similarity",
    "concept_table",
    "concept_similarity",
    "expected_noise_ceiling",
    "export_things",
    "odd_one_out",
    "shape_similarity",
    "shapes_factor_embedding",
    "simulate_choices",
]

COLOUR_SIGMA = 45.0  # degrees of hue
SHAPE_SIGMA = 0.6
COLOUR_WEIGHT = 0.5
SHAPE_WEIGHT = 0.5
# Chosen so that the best possible model agrees with the simulated choices on about 86 % of
# uniformly drawn triplets (see ``expected_noise_ceiling``).
TEMPERATURE = 0.07

SHAPE_FEATURE_NAMES: tuple[str, ...] = ("curved", "convex", "pointed", "fill")
# curved: outline made of curves; convex: no inward corners; pointed: has acute tips;
# fill: area / area of the enclosing circle (measured on the outlines, rounded).
SHAPE_FEATURES: dict[str, tuple[float, float, float, float]] = {
    "circle": (1.0, 1.0, 0.0, 1.00),
    "square": (0.0, 1.0, 0.0, 0.64),
    "triangle": (0.0, 1.0, 1.0, 0.41),
    "star": (0.0, 0.0, 1.0, 0.42),
    "cross": (0.0, 0.0, 0.0, 0.64),
    "heart": (1.0, 0.0, 0.5, 0.57),
}

CEILING_DEFINITION = (
    "ceiling: leave-one-out agreement on repeated triplets. For each repeated triplet and each of "
    "its responses, predict the response by the most frequent odd one out among the other "
    "responses (ties split evenly) and score 1 if it matches; the ceiling is the mean score. "
    "expected_ceiling: the expected value of that estimate under the ground-truth choice model, "
    "averaged over the repeated triplets. bayes_ceiling: mean over triplets of the largest "
    "choice probability, the expected accuracy of a model that knows the ground-truth similarity "
    "(over the repeated triplets, and over all triplets of distinct concepts)."
)


# ---------------------------------------------------------------------------------- concepts


def _hues() -> np.ndarray:
    return np.array(
        [colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] * 360 for rgb in shapes.COLOURS.values()]
    )


def concept_table() -> list[dict]:
    """One dict per concept, in index order: uniqueID, Word, colour, shape, indices, hue."""
    hues = _hues()
    rows = []
    for colour_index, colour in enumerate(shapes.COLOUR_NAMES):
        for shape_index, shape in enumerate(shapes.SHAPES):
            rows.append(
                {
                    "uniqueID": f"{colour}_{shape}",
                    "Word": f"{colour} {shape}",
                    "colour": colour,
                    "shape": shape,
                    "colour_index": colour_index,
                    "shape_index": shape_index,
                    "hue_degrees": round(float(hues[colour_index]), 1),
                }
            )
    return rows


def colour_similarity() -> np.ndarray:
    """(colours, colours) similarity from the circular hue distance."""
    hues = _hues()
    difference = np.abs(hues[:, None] - hues[None, :]) % 360
    distance = np.minimum(difference, 360 - difference)
    return np.exp(-(distance**2) / (2 * COLOUR_SIGMA**2))


def shape_similarity() -> np.ndarray:
    """(shapes, shapes) similarity from the fixed feature table ``SHAPE_FEATURES``."""
    features = np.array([SHAPE_FEATURES[name] for name in shapes.SHAPES])
    distance = ((features[:, None] - features[None, :]) ** 2).sum(-1)
    return np.exp(-distance / (2 * SHAPE_SIGMA**2))


def concept_similarity() -> np.ndarray:
    """(concepts, concepts) = (48, 48) ground-truth similarity, 1 on the diagonal."""
    colour = np.repeat(np.repeat(colour_similarity(), len(shapes.SHAPES), 0), len(shapes.SHAPES), 1)
    shape = np.tile(shape_similarity(), (len(shapes.COLOURS), len(shapes.COLOURS)))
    return COLOUR_WEIGHT * colour + SHAPE_WEIGHT * shape


# ---------------------------------------------------------------------------------- choices


def choice_probabilities(
    triplets: np.ndarray, similarity: np.ndarray | None = None, temperature: float = TEMPERATURE
) -> np.ndarray:
    """Probability that each item of each triplet is the odd one out: (triplets, 3).

    Item 0 is the odd one out when the pair (1, 2) is chosen, and so on.
    """
    similarity = concept_similarity() if similarity is None else similarity
    triplets = np.asarray(triplets)
    first, second, third = triplets[:, 0], triplets[:, 1], triplets[:, 2]
    pairs = np.stack(
        [similarity[second, third], similarity[first, third], similarity[first, second]], axis=1
    )
    logits = pairs / temperature
    logits -= logits.max(1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(1, keepdims=True)


def odd_one_out(triplets: np.ndarray, similarity: np.ndarray | None = None) -> np.ndarray:
    """Column (0, 1 or 2) of the item outside the most similar pair: (triplets,)."""
    return choice_probabilities(triplets, similarity, temperature=1.0).argmax(1)


def simulate_choices(
    triplets: np.ndarray, rng: np.random.Generator, temperature: float = TEMPERATURE
) -> np.ndarray:
    """Column of the simulated odd one out for each triplet (triplets, 3): (triplets,)."""
    probabilities = choice_probabilities(triplets, temperature=temperature)
    draws = rng.random(len(triplets))[:, None]
    return (draws > np.cumsum(probabilities, axis=1)).sum(1).clip(0, 2)


def _pair_first(triplets: np.ndarray, odd: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Reorder rows so the chosen pair fills columns 0, 1 (random order) and the odd one col 2."""
    rows = np.arange(len(triplets))
    keep = np.stack([(odd + 1) % 3, (odd + 2) % 3], axis=1)
    swap = rng.random(len(triplets)) < 0.5
    keep[swap] = keep[swap][:, ::-1]
    return np.stack(
        [triplets[rows, keep[:, 0]], triplets[rows, keep[:, 1]], triplets[rows, odd]], 1
    )


# ---------------------------------------------------------------------------------- ceilings


def _expected_loo(probabilities: np.ndarray, repeats: int) -> float:
    """Expected ``noise_ceiling`` of one triplet with ``repeats`` responses."""
    others = repeats - 1
    total = 0.0
    for first in range(others + 1):
        for second in range(others + 1 - first):
            counts = np.array([first, second, others - first - second])
            log_ways = (_log_factorial(others) - sum(_log_factorial(c) for c in counts)) + float(
                np.sum(counts * np.log(np.maximum(probabilities, 1e-300)))
            )
            modes = counts == counts.max()
            total += np.exp(log_ways) * float(np.sum(probabilities * modes) / modes.sum())
    return total


def _log_factorial(value: int) -> float:
    return float(np.sum(np.log(np.arange(2, value + 1)))) if value > 1 else 0.0


def expected_noise_ceiling(
    triplets: np.ndarray | None = None,
    repeats: int | None = None,
    temperature: float = TEMPERATURE,
) -> float:
    """Ceiling expected under the ground-truth choice model.

    ``repeats=None``: the Bayes ceiling, mean over ``triplets`` of the largest choice probability
    (the expected accuracy of the best possible model). With ``repeats``: the expected value of
    ``noise_ceiling`` measured with that many responses per triplet. ``triplets=None`` uses every
    triplet of distinct concepts.
    """
    if triplets is None:
        triplets = np.array(list(combinations(range(len(concept_table())), 3)))
    probabilities = choice_probabilities(triplets, temperature=temperature)
    if repeats is None:
        return float(probabilities.max(1).mean())
    return float(np.mean([_expected_loo(row, repeats) for row in probabilities]))


# ---------------------------------------------------------------------------------- export


def _split_triplets(seed: int) -> tuple[np.ndarray, np.ndarray]:
    every = np.array(list(combinations(range(len(concept_table())), 3)), dtype=np.int64)
    order = np.random.default_rng([seed, 0]).permutation(len(every))
    cut = int(round(0.9 * len(every)))
    return every[order[:cut]], every[order[cut:]]


def _draw(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` triplets from ``pool`` with replacement, each with its items in random order."""
    chosen = pool[rng.integers(len(pool), size=n)]
    return np.take_along_axis(chosen, rng.permuted(np.tile([0, 1, 2], (n, 1)), axis=1), axis=1)


EXPORT_KIND = "things-export"


def export_things(
    root: str | Path,
    images_per_concept: int = 12,
    n_train: int = 36_000,
    n_test: int = 4_000,
    n_repeat_triplets: int = 500,
    repeats: int = 20,
    seed: int = 0,
    temperature: float = TEMPERATURE,
) -> Path:
    """Write the shapes world in the THINGS layout under ``root`` (see the module docstring).

    Image ``j`` of concept ``k`` is item ``k * images_per_concept + j`` of the ``"all"`` split
    stream of ``seed`` with its shape and colour fixed, so sizes, positions, backgrounds and
    rotations vary. ``root`` is claimed as a diffprobe output folder (new, empty or an earlier
    export). Returns ``root``.
    """
    root = claim_output(root, EXPORT_KIND)
    table = concept_table()

    columns = list(table[0])
    lines = ["\t".join(columns)] + ["\t".join(str(row[c]) for c in columns) for row in table]
    write_text(root / "things_concepts.tsv", "\n".join(lines) + "\n")

    for index, row in enumerate(table):
        folder = root / "images" / row["uniqueID"]
        drawn = shapes.sample(
            images_per_concept,
            seed=seed,
            split="all",
            start=index * images_per_concept,
            shape=row["shape_index"],
            colour=row["colour_index"],
        )
        for number, image in enumerate(drawn.images, start=1):
            with atomic_path(folder / f"{row['uniqueID']}_{number:02d}.png") as temporary:
                Image.fromarray(image).save(temporary, format="PNG")

    train_pool, test_pool = _split_triplets(seed)
    for name, pool, n, stream in [
        ("train_90", train_pool, n_train, 1),
        ("test_10", test_pool, n_test, 2),
    ]:
        rng = np.random.default_rng([seed, stream])
        triplets = _draw(pool, n, rng)
        odd = simulate_choices(triplets, rng, temperature)
        _save_array(root / "triplets" / f"{name}.npy", _pair_first(triplets, odd, rng))

    rng = np.random.default_rng([seed, 3])
    count = min(n_repeat_triplets, len(test_pool))
    repeated = np.sort(test_pool[rng.choice(len(test_pool), size=count, replace=False)], axis=1)
    columns_chosen = np.stack(
        [simulate_choices(repeated, rng, temperature) for _ in range(repeats)], axis=1
    )
    choices = np.take_along_axis(repeated, columns_chosen, axis=1).astype(np.int64)
    _save_array(root / "triplets" / "repeated_triplets.npy", repeated)
    _save_array(root / "triplets" / "repeated.npy", choices)

    ceiling = {
        "ceiling": noise_ceiling(choices),
        "expected_ceiling": expected_noise_ceiling(repeated, repeats, temperature),
        "bayes_ceiling": expected_noise_ceiling(repeated, None, temperature),
        "bayes_ceiling_all_triplets": expected_noise_ceiling(None, None, temperature),
        "chance": 1 / 3,
        "repeated_triplets": count,
        "repeats": repeats,
        "temperature": temperature,
        "definition": CEILING_DEFINITION,
    }
    write_json(root / "triplets" / "noise_ceiling.json", ceiling)

    truth = {
        "concepts": [row["uniqueID"] for row in table],
        "concept_index": f"colour_index * {len(shapes.SHAPES)} + shape_index",
        "similarity": (
            "COLOUR_WEIGHT * exp(-hue_distance_degrees^2 / (2 * COLOUR_SIGMA^2)) + "
            "SHAPE_WEIGHT * exp(-||shape_features[a] - shape_features[b]||^2 / (2 * SHAPE_SIGMA^2))"
        ),
        "choice_model": (
            "P(pair) = softmax over the three pairs of similarity(pair) / TEMPERATURE; "
            "the odd one out is the item outside the chosen pair"
        ),
        "parameters": {
            "COLOUR_SIGMA": COLOUR_SIGMA,
            "SHAPE_SIGMA": SHAPE_SIGMA,
            "COLOUR_WEIGHT": COLOUR_WEIGHT,
            "SHAPE_WEIGHT": SHAPE_WEIGHT,
            "TEMPERATURE": temperature,
            "hue_degrees": dict(zip(shapes.COLOUR_NAMES, _hues().round(2).tolist(), strict=True)),
            "shape_feature_names": list(SHAPE_FEATURE_NAMES),
            "shape_features": {name: list(values) for name, values in SHAPE_FEATURES.items()},
        },
        "triplet_files": "columns 0 and 1: the chosen (most similar) pair; column 2: odd one out",
        "split": f"90 / 10 split of all unordered triplets of distinct concepts; seed {seed}",
        "similarity_matrix": concept_similarity().round(6).tolist(),
    }
    write_json(root / "ground_truth.json", truth)
    return root


def _save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as temporary:
        np.save(temporary, array, allow_pickle=False)


SHAPES_FACTOR_NAMES = ("hue_cos", "hue_sin", "curved", "convex", "pointed", "fill")


def shapes_factor_embedding(concepts: list[dict]) -> np.ndarray:
    """The true factors of the shapes-world concepts (a THINGS export): (concepts, 6) =
    cos and sin of the hue, and the four shape features of ``things_export.SHAPE_FEATURES``
    (the quantities the export's ground-truth similarity is built from); column names in
    ``SHAPES_FACTOR_NAMES``."""
    if not concepts or not {"hue_degrees", "shape"} <= set(concepts[0]):
        raise DataError(
            "the true factors need the shapes-world columns hue_degrees and shape in "
            "things_concepts.tsv (written by diffprobe.data.things_export)"
        )
    hue = np.radians([float(row["hue_degrees"]) for row in concepts])
    shape = np.array([SHAPE_FEATURES[row["shape"]] for row in concepts], dtype=np.float64)
    return np.column_stack([np.cos(hue), np.sin(hue), shape])
