import csv
import json
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from diffprobe.data import shapes, things_export


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return things_export.export_things(
        tmp_path_factory.mktemp("things"),
        images_per_concept=3,
        n_train=3000,
        n_test=600,
        n_repeat_triplets=60,
        repeats=10,
        seed=0,
    )


def test_layout(root):
    with open(root / "things_concepts.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert len(rows) == len(shapes.COLOURS) * len(shapes.SHAPES) == 48
    assert {"uniqueID", "Word", "colour", "shape"} <= set(rows[0])
    assert len({row["uniqueID"] for row in rows}) == 48
    for index, row in enumerate(rows):
        assert index == int(row["colour_index"]) * len(shapes.SHAPES) + int(row["shape_index"])
        assert row["Word"] == f"{row['colour']} {row['shape']}"
        files = sorted((root / "images" / row["uniqueID"]).glob("*.png"))
        assert [f.name for f in files] == [f"{row['uniqueID']}_{n:02d}.png" for n in (1, 2, 3)]
    for name in ("train_90", "test_10", "repeated", "repeated_triplets"):
        assert (root / "triplets" / f"{name}.npy").exists()
    assert (root / "triplets" / "noise_ceiling.json").exists()
    truth = json.loads((root / "ground_truth.json").read_text())
    assert {"similarity", "parameters", "similarity_matrix", "choice_model"} <= set(truth)
    np.testing.assert_allclose(
        truth["similarity_matrix"], things_export.concept_similarity(), atol=1e-6
    )


def test_images_show_their_concept(root):
    image = np.asarray(Image.open(root / "images" / "blue_star" / "blue_star_02.png"))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    colours = {tuple(pixel) for pixel in image.reshape(-1, 3)}
    assert shapes.COLOURS["blue"] in colours


def test_triplets(root):
    train = np.load(root / "triplets" / "train_90.npy", allow_pickle=False)
    test = np.load(root / "triplets" / "test_10.npy", allow_pickle=False)
    assert train.shape == (3000, 3) and test.shape == (600, 3)
    for triplets in (train, test):
        assert triplets.dtype == np.int64
        assert triplets.min() >= 0 and triplets.max() < 48
        assert np.all(
            (triplets[:, 0] != triplets[:, 1])
            & (triplets[:, 0] != triplets[:, 2])
            & (triplets[:, 1] != triplets[:, 2])
        )
        # Column 2 is the odd one out under the stored similarity far more often than chance.
        agreement = np.mean(things_export.odd_one_out(triplets) == 2)
        assert 0.75 < agreement < 0.95
    as_sets = {frozenset(t) for t in train.tolist()}
    assert as_sets.isdisjoint({frozenset(t) for t in test.tolist()})


def test_noise_ceiling(root):
    ceiling = json.loads((root / "triplets" / "noise_ceiling.json").read_text())
    assert 1 / 3 < ceiling["ceiling"] <= 1
    assert 1 / 3 < ceiling["expected_ceiling"] <= ceiling["bayes_ceiling"] <= 1
    assert abs(ceiling["ceiling"] - ceiling["expected_ceiling"]) < 0.06
    assert 0.8 < ceiling["bayes_ceiling_all_triplets"] < 0.9
    choices = np.load(root / "triplets" / "repeated.npy")
    repeated = np.load(root / "triplets" / "repeated_triplets.npy")
    assert choices.shape == (60, 10) and repeated.shape == (60, 3)
    assert np.all(np.any(choices[:, :, None] == repeated[:, None, :], axis=2))
    assert ceiling["ceiling"] == pytest.approx(things_export.noise_ceiling(choices))


def test_noise_ceiling_by_hand():
    assert things_export.noise_ceiling(np.array([[4, 4, 4, 4]])) == 1.0
    # Each 4 is predicted by {4, 7} (tie: half credit); the 7 is predicted by 4 (no credit).
    assert things_export.noise_ceiling(np.array([[4, 4, 7]])) == pytest.approx(1 / 3)
    assert things_export.noise_ceiling(np.array([[1, 2, 3]])) == pytest.approx(0.0)


def test_expected_ceiling_matches_simulation():
    triplets = np.array(list(combinations(range(48), 3)))[::97]
    rng = np.random.default_rng(0)
    columns = np.stack([things_export.simulate_choices(triplets, rng) for _ in range(400)], 1)
    probabilities = things_export.choice_probabilities(triplets)
    frequencies = np.stack([(columns == c).mean(1) for c in range(3)], 1)
    np.testing.assert_allclose(frequencies, probabilities, atol=0.1)
    expected = things_export.expected_noise_ceiling(triplets, repeats=5)
    measured = things_export.noise_ceiling(columns[:, :5])
    assert abs(expected - measured) < 0.05
    assert expected <= things_export.expected_noise_ceiling(triplets)


def test_similarity_structure():
    similarity = things_export.concept_similarity()
    assert similarity.shape == (48, 48)
    np.testing.assert_allclose(similarity, similarity.T)
    np.testing.assert_allclose(np.diag(similarity), 1.0)
    index = {row["uniqueID"]: i for i, row in enumerate(things_export.concept_table())}
    red_circle = similarity[index["red_circle"]]
    assert red_circle[index["orange_circle"]] > red_circle[index["blue_circle"]]
    assert red_circle[index["red_square"]] > red_circle[index["red_star"]]
