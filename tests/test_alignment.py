"""Human alignment: OOO accuracy against a brute-force loop, ceiling, RSA, CKA, reductions, the
THINGS loader's validation, and the align / probe / regress CLI end to end on a THINGS export."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from diffprobe.analysis import alignment
from diffprobe.analysis.alignment import (
    concept_means,
    human_similarity,
    linear_cka,
    normalised_score,
    ooo_accuracy,
    ooo_correct,
    reduce_items,
    restrict_triplets,
    rsa,
    similarity_matrix,
)
from diffprobe.data.sources import DataError
from diffprobe.data.things import load_things, noise_ceiling, read_triplets, validate_triplets
from diffprobe.data.things_export import export_things
from diffprobe.stages.demo import alignment_demo
from diffprobe.stages.probing import load_transform

# ---------------------------------------------------------------------------- brute force


def loop_similarity(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    if metric == "dot":
        return float(np.dot(a, b))
    if metric == "cosine":
        return float(np.dot(a, b) / np.sqrt(np.dot(a, a)) / np.sqrt(np.dot(b, b)))
    return -float(np.sum((a - b) ** 2))


def loop_correct(features: np.ndarray, triplets: np.ndarray, metric: str) -> np.ndarray:
    """Per triplet, in plain Python: is (column 0, column 1) strictly the most similar pair?"""
    out = []
    for first, second, third in triplets.tolist():
        kept = loop_similarity(features[first], features[second], metric)
        other_a = loop_similarity(features[first], features[third], metric)
        other_b = loop_similarity(features[second], features[third], metric)
        out.append(kept > other_a and kept > other_b)
    return np.array(out)


def random_triplets(rng, n_concepts: int, n: int) -> np.ndarray:
    return np.argsort(rng.random((n, n_concepts)), axis=1)[:, :3].astype(np.int64)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_ooo_equals_brute_force_loop(metric):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(30, 7))
    triplets = random_triplets(rng, 30, 1500)
    expected = loop_correct(features, triplets, metric)
    assert np.array_equal(ooo_correct(similarity_matrix(features, metric), triplets), expected)
    assert ooo_accuracy(features, triplets, metric) == pytest.approx(expected.mean(), abs=1e-12)
    assert 0.2 < expected.mean() < 0.5  # random features: near chance, so both outcomes occur


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_ties_count_as_wrong(metric):
    # Small integer features: every similarity is exact, so equal similarities really tie.
    rng = np.random.default_rng(2)
    features = rng.integers(-2, 3, size=(25, 5)).astype(np.float64)
    # Planted: s(0, 1) == s(0, 2) > s(1, 2) under all three similarities; concept 3 breaks it.
    features[:4] = 0
    features[0, :3] = (2, 0, 0)
    features[1, :3] = (1, 2, 0)
    features[2, :3] = (1, 0, 2)
    features[3, :3] = (2, 1, 0)
    planted = np.array([[0, 1, 2], [0, 2, 1], [0, 3, 2]])
    correct = ooo_correct(similarity_matrix(features, metric), planted)
    assert correct.tolist() == [False, False, True]
    triplets = np.concatenate([planted, random_triplets(rng, 25, 1500)])
    expected = loop_correct(features, triplets, metric)
    assert np.array_equal(ooo_correct(similarity_matrix(features, metric), triplets), expected)
    ties = [
        len(
            {
                loop_similarity(features[a], features[b], metric)
                for a, b in [(t[0], t[1]), (t[0], t[2]), (t[1], t[2])]
            }
        )
        < 3
        for t in triplets.tolist()
    ]
    assert sum(ties) > 20  # integer features tie often: the rule is exercised beyond the plant


def test_ooo_with_pca_equals_projected_features():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(40, 12))
    triplets = random_triplets(rng, 40, 800)
    centred = features - features.mean(0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ axes[:4].T
    expected = loop_correct(projected, triplets, "cosine").mean()
    assert ooo_accuracy(features, triplets, "cosine", pca=4) == pytest.approx(expected)


def test_ceiling_and_normalised_score_by_hand():
    # Row 1: each of the three 4s is predicted by the other responses (two 4s, one 7): 3 of 4.
    # Row 2: the two 1s each see a three-way tie (1, 2, 3), scored 1/3; the 2 and 3 see 1 win.
    choices = np.array([[4, 4, 4, 7], [1, 2, 3, 1]])
    ceiling = noise_ceiling(choices)
    assert ceiling == pytest.approx((3 + 2 / 3) / 8)
    assert normalised_score(0.4, ceiling) == pytest.approx((0.4 - 1 / 3) / (11 / 24 - 1 / 3))
    assert normalised_score(0.4, ceiling) == pytest.approx(8 / 15)
    assert normalised_score(1 / 3, 0.7) == 0 and normalised_score(0.7, 0.7) == pytest.approx(1)
    assert np.isnan(normalised_score(0.5, None))


def test_human_similarity_and_rsa():
    triplets = np.array([[0, 1, 2], [0, 1, 3], [2, 0, 1], [3, 2, 0]])
    human = human_similarity(triplets, 4)
    assert human[0, 1] == pytest.approx(2 / 3) and human[1, 0] == pytest.approx(2 / 3)
    assert human[0, 2] == pytest.approx(1 / 3) and human[2, 3] == pytest.approx(1.0)
    assert human[0, 3] == 0.0 and np.isnan(human[1, 1])
    # Planted: triplets answered by a known embedding; the embedding's RSA is high, noise's low.
    rng = np.random.default_rng(4)
    truth = rng.normal(size=(30, 3))
    drawn = random_triplets(rng, 30, 6000)
    similarity = similarity_matrix(truth, "euclidean")
    pairs = np.stack(
        [
            similarity[drawn[:, 1], drawn[:, 2]],
            similarity[drawn[:, 0], drawn[:, 2]],
            similarity[drawn[:, 0], drawn[:, 1]],
        ],
        1,
    )
    odd = pairs.argmax(1)
    rows = np.arange(len(drawn))
    answered = np.stack(
        [drawn[rows, (odd + 1) % 3], drawn[rows, (odd + 2) % 3], drawn[rows, odd]], 1
    )
    human = human_similarity(answered, 30)
    assert rsa(similarity, human) > 0.6
    assert abs(rsa(similarity_matrix(rng.normal(size=(30, 3)), "euclidean"), human)) < 0.2


def test_linear_cka():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 8))
    rotation = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    assert linear_cka(x, 3 * x @ rotation + 2) == pytest.approx(1.0)
    y = rng.normal(size=(50, 20))
    # Independent path: the feature-space formula ||Yc' Xc||² / (||Xc' Xc|| ||Yc' Yc||).
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = np.linalg.norm(yc.T @ xc) ** 2 / (
        np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    )
    assert linear_cka(x, y) == pytest.approx(expected)
    assert linear_cka(x, y) < 0.5
    matrix = alignment.cka_matrix([x, y, x @ rotation])
    assert np.allclose(np.diag(matrix), 1) and np.allclose(matrix, matrix.T)
    assert matrix[0, 2] == pytest.approx(1.0) and matrix[0, 1] == pytest.approx(expected)


def test_reductions_and_concept_means():
    rng = np.random.default_rng(6)
    maps = rng.normal(size=(6, 3, 4, 5))
    assert np.allclose(reduce_items(maps, "mean"), maps.mean((2, 3)))
    assert np.allclose(reduce_items(maps, "max"), maps.max((2, 3)))
    assert reduce_items(maps, "flatten").shape == (6, 60)
    tokens = rng.normal(size=(6, 9, 4))
    assert np.allclose(reduce_items(tokens, "max"), tokens.max(1))
    assert alignment.parse_reduction("pca-16") == ("flatten", 16)
    with pytest.raises(alignment.AlignmentError, match="pca-K"):
        alignment.parse_reduction("median")
    concepts = np.array([2, 0, 2, -1, 0, 2])
    means, counts = concept_means(reduce_items(maps, "mean"), concepts, 4)
    assert counts.tolist() == [2, 0, 3, 0]
    assert np.allclose(means[2], maps[[0, 2, 5]].mean((0, 2, 3)))
    assert np.isnan(means[1]).all()
    covered = np.array([True, False, True, True])
    triplets = np.array([[0, 2, 3], [0, 1, 2], [3, 2, 0]])
    assert restrict_triplets(triplets, covered).tolist() == [[0, 1, 2], [2, 1, 0]]


# ---------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def things_root(tmp_path_factory):
    return export_things(
        tmp_path_factory.mktemp("things"),
        images_per_concept=1,
        n_train=3000,
        n_test=2000,
        n_repeat_triplets=40,
        repeats=10,
        seed=0,
    )


def copy_root(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "things"
    shutil.copytree(root, copy)
    return copy


def test_loader_reads_export(things_root):
    things = load_things(things_root)
    assert things.n_concepts == 48 and things.unique_ids[0] == "red_circle"
    assert things.triplets["train"].shape == (3000, 3) and things.triplets["test"].shape == (
        2000,
        3,
    )
    stored = json.loads((things_root / "triplets" / "noise_ceiling.json").read_text())
    assert things.ceiling == stored["ceiling"]
    manifest = [
        {"id": "blue_star/blue_star_01.png", "label": "blue star"},
        {"id": "x.png", "label": "red_circle"},
        {"id": "y.png", "label": "red square"},
        {"id": "z.png", "label": "nothing"},
    ]
    assert things.item_concepts(manifest).tolist() == [5 * 6 + 3, 0, 1, -1]


def test_loader_validation_errors(things_root, tmp_path):
    with pytest.raises(DataError, match=r"outside 0\.\.47.*row 1: \[3, 48, 5\]"):
        validate_triplets(np.array([[0, 1, 2], [3, 48, 5]]), 48, "t.npy")
    with pytest.raises(DataError, match=r"outside"):
        validate_triplets(np.array([[-1, 1, 2]]), 48)
    with pytest.raises(DataError, match=r"repeat a concept, first at row 0: \[7, 2, 7\]"):
        validate_triplets(np.array([[7, 2, 7], [1, 2, 3]]), 48)
    with pytest.raises(DataError, match="non-integer"):
        validate_triplets(np.array([[0.5, 1, 2]]), 48)
    with pytest.raises(DataError, match=r"shape \(triplets, 3\)"):
        validate_triplets(np.zeros((4, 2), dtype=int), 48)

    root = copy_root(things_root, tmp_path)
    np.save(root / "triplets" / "test_10.npy", np.array([[0, 1, 2], [5, 5, 6]]))
    with pytest.raises(DataError, match=r"test_10\.npy: 1 triplets repeat a concept"):
        load_things(root)
    np.save(root / "triplets" / "test_10.npy", np.array([[0, 1, 48]]))
    with pytest.raises(DataError, match=r"test_10\.npy: 1 triplets have concept indices outside"):
        load_things(root)
    (root / "triplets" / "test_10.npy").unlink()
    (root / "triplets" / "test_10.txt").write_text("0 1 2\n3\t4\t5\n")
    assert load_things(root).triplets["test"].tolist() == [[0, 1, 2], [3, 4, 5]]
    shutil.rmtree(root / "images" / "green_star")
    with pytest.raises(DataError, match=r"concept 'green_star' \(row 21 .*\) has no image"):
        load_things(root)
    # One image file per concept (images/<uniqueID>.jpg) is the other accepted layout.
    shutil.copy(
        root / "images" / "red_star" / "red_star_01.png", root / "images" / "green_star.png"
    )
    assert load_things(root).n_concepts == 48


def test_read_triplets_plain_text_and_ceiling_from_repeats(things_root, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("1,2,3\n4,5,6\n")
    assert read_triplets(path, 10).dtype == np.int64
    with pytest.raises(DataError, match="outside"):
        read_triplets(path, 6)
    root = copy_root(things_root, tmp_path)
    (root / "triplets" / "noise_ceiling.json").unlink()
    choices = np.load(root / "triplets" / "repeated.npy")
    assert load_things(root).ceiling == pytest.approx(noise_ceiling(choices))


# ---------------------------------------------------------------------------- end to end

SITES = ["unet.down_blocks.1", "unet.mid_block"]


@pytest.fixture(scope="module")
def run_dir(things_root, tmp_path_factory, sd_model):
    from diffprobe.data.sources import open_source
    from diffprobe.extract import ExtractionPlan, extract

    plan = ExtractionPlan(
        sites=SITES, noise_levels=[0.1, 0.5], pooling="none", image_size=32, chunk_items=48, seed=0
    )
    return extract(
        sd_model,
        open_source(things_root),
        plan,
        tmp_path_factory.mktemp("run") / "run",
        batch_size=48,
        progress=False,
    )


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_cli_align_probe_regress(run_dir, things_root, tmp_path):
    from typer.testing import CliRunner

    import diffprobe
    from diffprobe.cli import app

    runner = CliRunner()
    out = tmp_path / "align"
    result = runner.invoke(
        app,
        [
            "align",
            str(run_dir),
            "--things",
            str(things_root),
            "--out",
            str(out),
            "--metric",
            "cosine,dot",
            "--reduce",
            "mean,max",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = read_rows(out / "alignment.csv")
    assert len(rows) == 2 * 2 * 2 * 2  # sites × noise levels × reductions × metrics
    assert {"site", "noise", "condition", "accuracy", "ceiling", "normalised", "rsa"} <= set(
        rows[0]
    )
    for name in ("accuracy_heatmap.png", "accuracy_vs_noise.png", "cka_heatmap.png", "cka.csv"):
        assert (out / name).stat().st_size > 0

    # Independent path: features read with Run.get, averaged per concept by item id here.
    run = diffprobe.open_run(run_dir)
    test = np.load(things_root / "triplets" / "test_10.npy")
    ids = [item["id"].split("/")[0] for item in run.manifest]
    order = [row["uniqueID"] for row in load_things(things_root).concepts]
    ceiling = json.loads((things_root / "triplets" / "noise_ceiling.json").read_text())["ceiling"]
    for row in rows:
        values = run.get(row["site"], row["noise"], row["condition"])
        pooled = values.mean((2, 3)) if row["reduction"] == "mean" else values.max((2, 3))
        concept_features = np.stack(
            [pooled[[i for i, c in enumerate(ids) if c == uid]].mean(0) for uid in order]
        )
        expected = loop_correct(concept_features.astype(np.float64), test, row["metric"]).mean()
        assert float(row["accuracy"]) == pytest.approx(expected, abs=1e-4)
        assert float(row["ceiling"]) == pytest.approx(ceiling, abs=1e-5)
        assert float(row["normalised"]) == pytest.approx(
            (expected - 1 / 3) / (ceiling - 1 / 3), abs=1e-3
        )

    probe_out = tmp_path / "probe"
    result = runner.invoke(
        app,
        [
            "probe",
            str(run_dir),
            "--things",
            str(things_root),
            "--out",
            str(probe_out),
            "--sites",
            "unet.mid_block",
            "--noise",
            "p0.1",
            "--folds",
            "2",
            "--max-epochs",
            "15",
            "--regulariser",
            "identity",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(read_rows(probe_out / "probe.csv")) == 2
    summary = read_rows(probe_out / "probe_summary.csv")
    assert len(summary) == 1 and 0 <= float(summary[0]["probed_mean"]) <= 1
    transform = load_transform(Path(summary[0]["transform"]))
    with np.load(summary[0]["transform"], allow_pickle=False) as stored:
        assert set(stored.files) == {"weights", "bias", "mean", "std"}
    new_items = run.get("unet.mid_block", "p0.1").mean((2, 3))[:5]
    assert transform.apply(new_items).shape == (5, transform.weights.shape[1])
    assert (probe_out / "transforms" / "unet.mid_block__p0.1__empty" / "fold1.npz").is_file()

    regress_out = tmp_path / "regress"
    result = runner.invoke(
        app,
        [
            "regress",
            str(run_dir),
            "--things",
            str(things_root),
            "--out",
            str(regress_out),
            "--target",
            "shapes-factors",
            "--folds",
            "3",
            "--noise",
            "p0.5",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = read_rows(regress_out / "regression.csv")
    assert len(rows) == 2 * 3 and all(np.isfinite(float(r["r2"])) for r in rows)
    assert {"r2_hue_cos", "r2_hue_sin", "r2_curved", "r2_convex", "r2_pointed", "r2_fill"} <= set(
        rows[0]
    )
    # The true factors answer their own triplets far above chance.
    assert np.mean([float(r["target_ooo"]) for r in rows]) > 0.6

    result = runner.invoke(
        app, ["align", str(run_dir), "--things", str(tmp_path / "missing"), "-q"]
    )
    assert isinstance(result.exception, DataError) and "missing" in str(result.exception)


@pytest.mark.slow
def test_demo(run_dir, things_root, tmp_path, capsys):
    numbers = alignment_demo(run_dir, things_root, tmp_path / "demo")
    rows = read_rows(tmp_path / "demo" / "alignment.csv")
    assert {"site", "noise", "condition", "accuracy", "ceiling", "normalised"} <= set(rows[0])
    assert len(rows) == len(SITES) * 2
    assert (tmp_path / "demo" / "accuracy_heatmap.png").is_file()
    assert (tmp_path / "demo" / "accuracy_vs_noise.png").is_file()
    assert numbers["best"]["accuracy"] == max(float(r["accuracy"]) for r in rows)
    assert len(numbers["probe"]["folds"]) == 3 and np.isfinite(numbers["regression"]["r2"])
    assert [r["reduction"] for r in numbers["reductions"]] == ["mean", "max", "flatten", "pca-8"]
    assert "normalised" in capsys.readouterr().out


@pytest.mark.slow
def test_doc_examples_run():
    doc = Path(__file__).parents[1] / "docs" / "alignment.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, str(doc), "exec"), {})
