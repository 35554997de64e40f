"""Linear probing and regression: planted structure is found, folds are over objects, early
stopping never sees the reported fold, transforms round-trip through .npz."""

import numpy as np
import pytest

from diffprobe.analysis import probing
from diffprobe.analysis.alignment import ooo_accuracy, similarity_matrix
from diffprobe.analysis.probing import (
    fit_probe,
    object_folds,
    probe,
    regress,
    triplets_within,
)
from diffprobe.stages.probing import load_transform, save_transform


def answered_triplets(embedding: np.ndarray, n: int, rng, metric: str = "dot") -> np.ndarray:
    """Random triplets with the pair most similar under ``embedding`` in columns 0, 1."""
    drawn = np.argsort(rng.random((n, len(embedding))), axis=1)[:, :3]
    similarity = similarity_matrix(embedding, metric)
    pairs = np.stack(
        [
            similarity[drawn[:, 1], drawn[:, 2]],
            similarity[drawn[:, 0], drawn[:, 2]],
            similarity[drawn[:, 0], drawn[:, 1]],
        ],
        1,
    )
    odd = pairs.argmax(1)
    rows = np.arange(n)
    return np.stack([drawn[rows, (odd + 1) % 3], drawn[rows, (odd + 2) % 3], drawn[rows, odd]], 1)


@pytest.fixture(scope="module")
def planted():
    """Features = a random linear mix of a 4-d ground-truth embedding and 28 louder noise dims."""
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(120, 4))
    noise = 2.0 * rng.normal(size=(120, 28))
    mix = np.linalg.qr(rng.normal(size=(32, 32)))[0]
    features = np.hstack([truth @ rng.normal(size=(4, 4)), noise]) @ mix
    triplets = answered_triplets(truth, 40_000, rng)
    return features, triplets, truth


@pytest.mark.slow
def test_probe_improves_held_out_ooo(planted):
    features, triplets, truth = planted
    assert ooo_accuracy(truth, triplets, "dot") == 1.0
    result = probe(features, triplets, folds=3, lam=1e-3, lr=3e-2, max_epochs=300, seed=0)
    assert len(result.rows) == 3
    for row in result.rows:
        assert row["probed"] > row["zero_shot"] + 0.25, row
    assert result.zero_shot_mean < 0.55
    assert result.probed_mean > 0.8
    assert result.probed_std < 0.1


@pytest.mark.slow
def test_identity_regulariser_and_pca(planted):
    features, triplets, _ = planted
    result = probe(
        features,
        triplets,
        folds=3,
        regulariser="identity",
        lam=1e-2,
        lr=3e-2,
        max_epochs=300,
        seed=1,
    )
    assert result.probed_mean > result.zero_shot_mean + 0.2
    # The identity pull: zero for any multiple of I, off-diagonal mass and diagonal spread
    # otherwise; Frobenius is the plain sum of squares.
    import torch

    scaled = 3.0 * torch.eye(4)
    assert float(probing.penalty(scaled, "identity")) == 0.0
    assert float(probing.penalty(scaled, "frobenius")) == pytest.approx(36.0)
    skewed = scaled.clone()
    skewed[0, 1], skewed[2, 2] = 0.5, 5.0  # diagonal mean 3.5: deviations -0.5 ×3 and 1.5
    assert float(probing.penalty(skewed, "identity")) == pytest.approx(0.25 + 3 * 0.25 + 2.25)
    # PCA is folded into the saved weights: (dims in, components).
    with_pca = probe(features, triplets, folds=3, pca=8, max_epochs=5, seed=1)
    assert with_pca.transforms[0].weights.shape == (32, 8)
    with pytest.raises(probing.ProbingError, match="regulariser"):
        probe(features, triplets, folds=3, regulariser="l1")


def test_folds_are_over_objects_and_early_stopping_never_sees_the_test_fold(planted, monkeypatch):
    features, triplets, _ = planted
    parts = object_folds(120, 3, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(120))
    assert all(40 == len(p) for p in parts)
    calls = []
    real = probing.fit_probe

    def recording(values, train, val, **options):
        calls.append((np.unique(train), np.unique(val)))
        return real(values, train, val, **{**options, "max_epochs": 2})

    monkeypatch.setattr(probing, "fit_probe", recording)
    result = probe(features, triplets, folds=3, seed=0)
    assert len(calls) == 3
    for (train_concepts, val_concepts), held_out, row in zip(
        calls, parts, result.rows, strict=True
    ):
        assert not set(train_concepts) & set(held_out)
        assert not set(val_concepts) & set(held_out)
        assert not set(train_concepts) & set(val_concepts)
        assert row["test_triplets"] == len(triplets_within(triplets, held_out, 120)) > 0


def test_transform_round_trip_and_new_features(planted, tmp_path):
    features, triplets, _ = planted
    train = triplets_within(triplets, np.arange(80), 120)
    val = triplets_within(triplets, np.arange(80, 120), 120)
    transform, info = fit_probe(features, train, val, max_epochs=40, seed=0)
    assert 1 <= info["best_epoch"] <= info["epochs"] <= 40
    path = save_transform(transform, tmp_path / "transform.npz")
    with np.load(path, allow_pickle=False) as stored:
        assert set(stored.files) == {"weights", "bias", "mean", "std"}
        manual = (features - stored["mean"]) / stored["std"] @ stored["weights"] + stored["bias"]
    loaded = load_transform(path)
    assert np.allclose(loaded.apply(features), manual)
    # New items (not used in fitting) map the same way, one at a time or together.
    fresh = np.random.default_rng(9).normal(size=(3, 32))
    assert np.allclose(loaded.apply(fresh)[1], loaded.apply(fresh[1:2])[0])
    # Standardisation statistics come from the training concepts only.
    seen = np.unique(train)
    assert np.allclose(loaded.mean, features[seen].mean(0))
    with pytest.raises(probing.ProbingError, match="32 features"):
        loaded.apply(np.zeros((2, 5)))


def test_regression_recovers_planted_factors():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(90, 12))
    factors = features @ rng.normal(size=(12, 3))  # noiseless linear
    triplets = answered_triplets(factors, 20_000, rng, metric="euclidean")
    result = regress(
        features,
        factors,
        folds=3,
        triplets=triplets,
        metric="euclidean",
        target_names=["a", "b", "c"],
        seed=0,
    )
    assert len(result.rows) == 3
    assert all(row["r2"] > 0.999 for row in result.rows)
    assert list(result.r2_by_target) == ["a", "b", "c"]
    assert all(value > 0.999 for value in result.r2_by_target.values())
    assert np.allclose(result.predicted, factors, atol=0.05 * factors.std())
    for row in result.rows:
        assert row["target_ooo"] == 1.0 and row["ooo"] > 0.95 and row["test_triplets"] > 0
    # Unrelated features cannot predict the factors.
    unrelated = regress(rng.normal(size=(90, 12)), factors, folds=3, seed=0)
    assert unrelated.r2_mean < 0.3
    # Only the first factor is linear in the features: the per-dimension R² tells them apart.
    mixed = np.column_stack([factors[:, 0], rng.normal(size=90)])
    split = regress(features, mixed, folds=3, seed=0).r2_by_target
    assert split["0"] > 0.999 and split["1"] < 0.3
    with pytest.raises(probing.ProbingError, match="rows"):
        regress(features, factors[:10], folds=3)
