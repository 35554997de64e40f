"""Anomaly measurements: planted structure is found, brute-force equalities, label files, the
CLI end to end on a random dummy pipeline, the demo."""

import json
import re
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from diffprobe.analysis import anomalies as A
from diffprobe.data import anomaly_labels as L
from diffprobe.stages import anomalies as S
from diffprobe.stages import crops as C
from diffprobe.stages import demo as D

SITES = ["unet.down_blocks.1", "unet.up_blocks.1"]


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------- layout


def test_to_grid_unet_and_token_layouts_agree():
    rng = np.random.default_rng(0)
    unet = rng.normal(size=(2, 5, 3, 4))  # (items, C, H, W)
    maps = A.to_grid(unet)
    assert maps.shape == (2, 3, 4, 5) and maps[1, 2, 3, 4] == np.float32(unet[1, 4, 2, 3])
    tokens = unet.transpose(0, 2, 3, 1).reshape(2, 12, 5)  # row-major tokens
    assert np.array_equal(A.to_grid(tokens, grid=(3, 4)), maps)
    assert np.array_equal(A.to_grid(tokens, grid="3x4"), maps)
    with pytest.raises(A.AnomalyError, match="square"):
        A.to_grid(tokens)
    with pytest.raises(A.AnomalyError, match="pooling"):
        A.to_grid(rng.normal(size=(2, 5)))


# --------------------------------------------------------------------------- position


def test_binnings_and_bins():
    assert A.binnings_for(4) == [("2", 2), ("exact", 4)]
    assert A.binnings_for(32) == [("2", 2), ("4", 4), ("8", 8), ("16", 16), ("exact", 32)]
    assert A.position_bins(np.arange(8), 8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    train, test = A.split_images(10, 0.5, seed=3)
    assert len(train) == len(test) == 5 and not set(train) & set(test)


@pytest.mark.slow
def test_position_probe_finds_planted_code_and_not_noise():
    rng = np.random.default_rng(0)
    items, size, channels = 20, 16, 32
    noise = rng.normal(size=(items, size, size, channels))
    # row: a smooth code (linear in the row, so every binning is linear); col: nothing planted
    ramp = rng.normal(size=channels)
    row_code = np.arange(size)[:, None] * ramp[None] / 2 + rng.normal(size=(size, channels))
    planted = noise + row_code[None, :, None, :]
    found = {(r["axis"], r["binning"]): r for r in A.position_probe(planted)}
    for binning in ("2", "4", "8", "exact"):
        assert found[("row", binning)]["accuracy"] > 0.95, found[("row", binning)]
    assert found[("row", "exact")]["chance"] == pytest.approx(1 / 16)
    for binning in ("2", "4", "8", "exact"):
        r = found[("col", binning)]
        assert abs(r["accuracy"] - r["chance"]) < 0.05, r
        assert r["train_images"] == 10 and r["test_images"] == 10
    pure = A.position_probe(noise, binnings=(4,))
    assert [(r["axis"], r["binning"]) for r in pure] == [
        ("row", "4"),
        ("row", "exact"),
        ("col", "4"),
        ("col", "exact"),
    ]
    for r in pure:
        assert abs(r["accuracy"] - r["chance"]) < 0.05, r


# ----------------------------------------------------------------------------- corners


def test_corner_similarity_equals_brute_force():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(3, 6, 7, 5))
    for k in (1, 2):
        corners = [
            (slice(0, k), slice(0, k)),
            (slice(0, k), slice(7 - k, 7)),
            (slice(6 - k, 6), slice(0, k)),
            (slice(6 - k, 6), slice(7 - k, 7)),
        ]
        expected = []
        for item in range(3):
            tokens = [maps[item, ys, xs].reshape(-1, 5) for ys, xs in corners]
            sims = [
                float(unit(a) @ unit(b))
                for i, j in combinations(range(4), 2)
                for a in tokens[i]
                for b in tokens[j]
            ]
            expected.append(np.mean(sims))
        assert np.allclose(A.corner_similarity(maps, k), expected)


def test_corner_ratio_planted_and_absent():
    rng = np.random.default_rng(2)
    items, size, channels = 30, 12, 48
    content = rng.normal(size=(items, 1, 1, channels))
    original = content + rng.normal(size=(items, size, size, channels))
    cropped = content + rng.normal(size=(items, size, size, channels))
    absent = A.corner_ratio(cropped, original)
    assert abs(absent["ratio"] - 1) < 0.1 and absent["items"] == items
    artifact = 1.5 * rng.normal(size=channels)
    for y, x in [(0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)]:
        cropped[:, y, x] += artifact
    planted = A.corner_ratio(cropped, original)
    assert planted["ratio"] > 1.3
    assert planted["reference_corner_similarity"] == absent["reference_corner_similarity"]
    # the reference is the original map without its outer ring: an artifact there is ignored
    ringed = original.copy()
    ringed[:, 0, 0] += 100 * artifact
    assert A.corner_ratio(cropped, ringed)["ratio"] == planted["ratio"]
    with pytest.raises(A.AnomalyError, match="same shape"):
        A.corner_ratio(cropped[:, :-1], original)


def test_crop_border_removes_the_border():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[:, :, :, 0] = 255  # red border ...
    images[:, 4:28, 4:28] = (0, 0, 255)  # ... blue inside
    cropped = A.crop_border(images, 4)
    assert cropped.shape == images.shape and cropped.dtype == np.uint8
    assert (cropped[..., 2] == 255).all() and (cropped[..., 0] == 0).all()
    assert A.token_border(64, (16, 16)) == (4, 4) and A.token_border(64, (8, 16)) == (8, 4)


# --------------------------------------------------------------------------- high norm

PLANTED = [(0, 3, 4), (0, 10, 12), (2, 0, 0), (5, 14, 14), (5, 2, 8)]


def planted_maps(seed=3, items=8, size=16, channels=64, scale=5.0):
    rng = np.random.default_rng(seed)
    maps = rng.normal(size=(items, size, size, channels))
    for item, y, x in PLANTED:
        maps[item, y : y + 2, x : x + 2] *= scale
    return maps


def test_group_scores_equal_brute_force():
    norms = np.random.default_rng(4).uniform(1, 2, size=(2, 5, 6))
    for reference in ("mean", "median"):
        scores = A.group_scores(norms, 2, reference)
        assert scores.shape == (2, 4, 5)
        for item in range(2):
            ref = norms[item].mean() if reference == "mean" else np.median(norms[item])
            for y in range(4):
                for x in range(5):
                    assert np.isclose(
                        scores[item, y, x], norms[item, y : y + 2, x : x + 2].mean() / ref
                    )
    maps = np.random.default_rng(5).normal(size=(2, 3, 3, 4))
    assert np.allclose(A.norm_maps(maps), np.sqrt((maps**2).sum(-1)))


@pytest.mark.parametrize("reference", ["mean", "median"])
def test_planted_high_norm_groups_detected_exactly(reference, tmp_path):
    maps = planted_maps()
    found = A.detect_high_norm(A.norm_maps(maps), threshold=2.0, reference=reference)
    assert sorted(
        zip(found["item"].tolist(), found["y"].tolist(), found["x"].tolist(), strict=True)
    ) == sorted(PLANTED)
    assert (found["score"] > 3).all()
    assert A.detections_per_image(found, 8).tolist() == [2, 0, 1, 0, 0, 2, 0, 0]
    # against label files: every image looked at, the planted groups marked
    ids = [f"img-{i}" for i in range(8)]
    for i, item_id in enumerate(ids):
        L.write_label_file(
            tmp_path / f"{item_id}.json",
            item_id,
            [{"x": x, "y": y} for item, y, x in PLANTED if item == i],
            index=i,
        )
    table = L.labels_to_table(tmp_path, ids)
    result = A.compare_with_labels(found, table, tolerance=0)
    assert (result["precision"], result["recall"], result["matched"]) == (1.0, 1.0, len(PLANTED))
    # a higher threshold than the planted scores finds nothing
    assert len(A.detect_high_norm(A.norm_maps(maps), threshold=50.0)["item"]) == 0


def test_matching_rule():
    labels = {
        "item": np.array([0, 0, 1]),
        "item_id": np.array(["a", "a", "b"]),
        "site": np.array(["", "", "s"]),
        "y": np.array([2, 8, 5]),
        "x": np.array([2, 8, 5]),
        "image_item": np.array([0, 1, 3]),
        "image_item_id": np.array(["a", "b", "d"]),
        "image_site": np.array(["", "s", "other"]),
    }
    detections = {
        "item": np.array([0, 0, 0, 2, 3]),
        "y": np.array([3, 2, 12, 0, 0]),
        "x": np.array([3, 2, 12, 0, 0]),
        "score": np.array([5.0, 4.0, 3.0, 9.0, 9.0]),
    }
    # site s: images 0 (all sites) and 1 (s); image 2 unlabelled, image 3 labelled for 'other'
    strict = A.compare_with_labels(detections, labels, site="s", tolerance=0)
    assert strict == {
        "labelled_images": 2,
        "labels": 3,
        "detections": 3,
        "matched": 1,
        "precision": 1 / 3,
        "recall": 1 / 3,
        "tolerance": 0,
    }
    loose = A.compare_with_labels(detections, labels, site="s", tolerance=1)
    # (3,3) takes (2,2) first (higher score); (2,2) then has no unmatched label left
    assert (loose["matched"], loose["recall"]) == (1, 1 / 3)
    other = A.compare_with_labels(detections, labels, site="other", tolerance=0)
    assert (other["labelled_images"], other["detections"], other["labels"]) == (2, 4, 2)


def test_label_files_round_trip(tmp_path):
    ids = ["x-0", "x-1", "x-2"]
    L.write_label_file(
        tmp_path / "l" / "a.json",
        "x-2",
        [(3, 4), {"x": 1, "y": 0}],
        index=2,
        site="unet.up_blocks.1",
        grid=(16, 16),
    )
    L.write_label_file(tmp_path / "l" / "b.json", "x-0", [])
    back = L.read_label_file(tmp_path / "l" / "a.json")
    assert back == {
        "item": "x-2",
        "index": 2,
        "site": "unet.up_blocks.1",
        "grid": [16, 16],
        "groups": [{"x": 4, "y": 3}, {"x": 1, "y": 0}],
    }
    table = L.labels_to_table(tmp_path / "l", ids)
    L.save_label_table(table, tmp_path / "labels.npz")
    loaded = L.load_label_table(tmp_path / "labels.npz")
    assert set(loaded) == set(table)
    for key in table:
        assert np.array_equal(loaded[key], table[key]), key
    assert loaded["item"].tolist() == [2, 2] and loaded["y"].tolist() == [3, 0]
    assert loaded["image_item"].tolist() == [2, 0] and loaded["image_site"].tolist() == [
        "unet.up_blocks.1",
        "",
    ]
    (tmp_path / "bad.json").write_text(json.dumps({"item": "x-1", "groups": [{"x": 1}]}))
    with pytest.raises(L.LabelError, match="'x' and 'y'"):
        L.labels_to_table([tmp_path / "bad.json"], ids)
    L.write_label_file(tmp_path / "wrong.json", "x-1", [], index=0)
    with pytest.raises(L.LabelError, match="index 0"):
        L.labels_to_table([tmp_path / "wrong.json"], ids)
    with pytest.raises(L.LabelError, match="not a diffprobe anomaly label table"):
        np.savez(tmp_path / "other.npz", a=np.arange(3))
        L.load_label_table(tmp_path / "other.npz")


# -------------------------------------------------------------------------- similarity


def test_similarity_maps_equal_brute_force():
    rng = np.random.default_rng(6)
    maps = rng.normal(size=(4, 3, 5, 6))
    sims = A.similarity_maps(maps, 2, 1, 3)
    query = unit(maps[2, 1, 3])
    for n in range(4):
        for y in range(3):
            for x in range(5):
                assert np.isclose(sims[n, y, x], unit(maps[n, y, x]) @ query)
    stats = A.position_similarity(maps)
    same = [
        [
            np.mean(
                [unit(maps[a, y, x]) @ unit(maps[b, y, x]) for a, b in combinations(range(4), 2)]
            )
            for x in range(5)
        ]
        for y in range(3)
    ]
    assert np.allclose(stats["same_position_map"], same)
    tokens = unit(maps.reshape(4, 15, 6))
    cross = np.mean([tokens[a] @ tokens[b].T for a in range(4) for b in range(4) if a != b])
    assert np.isclose(stats["cross_image_similarity"], cross)


# --------------------------------------------------------------- run level, CLI, demo


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    from diffprobe.testing import dummy_sd_pipeline

    folder = tmp_path_factory.mktemp("pipe") / "dummy-sd"
    dummy_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(pipeline_folder):
    import diffprobe

    return diffprobe.load(pipeline_folder)


@pytest.fixture(scope="module")
def spatial_run(model, tmp_path_factory):
    from diffprobe.data.sources import open_source
    from diffprobe.extract import ExtractionPlan, extract
    from diffprobe.extract.store import open_run

    root = tmp_path_factory.mktemp("runs") / "spatial"
    plan = ExtractionPlan(sites=SITES, noise_levels=[0.2], pooling="none", chunk_items=4, seed=1)
    extract(model, open_source("shapes:6"), plan, root, batch_size=4, progress=False)
    return open_run(root)


def test_run_images_are_regenerated(spatial_run):
    from diffprobe.data.sources import open_source

    images = C.load_run_images(spatial_run)
    assert np.array_equal(images, open_source("shapes:6").load(range(6)))


@pytest.fixture(scope="module")
def helper_maps(model, spatial_run):
    """The corner maps from the in-memory helper (capture, not the extraction engine)."""
    images = C.load_run_images(spatial_run)
    return C.corner_features(model, images, SITES, noise_level=0.2, seed=1, batch_size=4)


def test_corner_helper_matches_the_extraction(helper_maps, spatial_run):
    for site in SITES:
        original, cropped = helper_maps[site]
        stored = A.to_grid(spatial_run.get(site, "p0.2"))
        np.testing.assert_allclose(original, stored, rtol=1e-5, atol=1e-5)
        assert cropped.shape == original.shape and not np.allclose(cropped, original)


@pytest.mark.slow
def test_cli_end_to_end(spatial_run, helper_maps, tmp_path):
    from typer.testing import CliRunner

    from diffprobe.cli import app

    run = spatial_run
    ids = [m["id"] for m in run.manifest]
    # labels: exactly the groups the pure functions detect at a low threshold on up_blocks.1,
    # and one image with no marks, so the CLI's comparison must give precision = recall = 1
    norms = A.norm_maps(A.to_grid(run.get("unet.up_blocks.1", "p0.2")))
    found = A.detect_high_norm(norms, threshold=1.3)
    assert len(found["item"]) > 0
    labels = tmp_path / "labels"
    for item in range(len(ids)):
        mine = found["item"] == item
        L.write_label_file(
            labels / f"{item}.json",
            ids[item],
            [(int(y), int(x)) for y, x in zip(found["y"][mine], found["x"][mine], strict=True)],
            index=item,
            site="unet.up_blocks.1",
        )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "anomalies",
            str(run.root),
            "--out",
            str(out),
            "--threshold",
            "1.3",
            "--labels",
            str(labels),
            "--tolerance",
            "0",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "unet.up_blocks.1" in result.output and "precision 1.00, recall 1.00" in result.output

    # the tables carry their definitions and equal the pure functions on the stored features
    text = (out / "high_norm_counts.csv").read_text()
    assert (
        text.startswith("# norm: L2 norm")
        and "# anomaly_score:" in text
        and "threshold = 1.3" in text
    )
    probes = S.read_table(out / "position_probes.csv")
    for site in SITES:
        maps = A.to_grid(run.get(site, "p0.2"))
        expected = A.position_probe(maps)
        mine = [r for r in probes if r["site"] == site]
        assert [(r["axis"], r["binning"]) for r in mine] == [
            (e["axis"], e["binning"]) for e in expected
        ]
        for r, e in zip(mine, expected, strict=True):
            assert float(r["accuracy"]) == pytest.approx(e["accuracy"], abs=1e-5)
            assert float(r["chance"]) == pytest.approx(e["chance"], abs=1e-5)
    detections = S.read_table(out / "high_norm_detections.csv")
    assert sorted(
        (int(r["item"]), int(r["y"]), int(r["x"]))
        for r in detections
        if r["site"] == "unet.up_blocks.1"
    ) == sorted(zip(found["item"].tolist(), found["y"].tolist(), found["x"].tolist(), strict=True))
    comparison = S.read_table(out / "label_comparison.csv")
    up = [r for r in comparison if r["site"] == "unet.up_blocks.1"][0]
    assert float(up["precision"]) == 1.0 and float(up["recall"]) == 1.0

    # the corner ratio from the cropped run folders equals the in-memory helper's
    corners = {r["site"]: r for r in S.read_table(out / "corner_ratio.csv")}
    for site in SITES:
        original, cropped = helper_maps[site]
        assert float(corners[site]["ratio"]) == pytest.approx(
            corner_ratio_of(cropped, original), rel=1e-4
        )
    assert corners["unet.down_blocks.1"]["border_px"] == "4x4"  # 64 px / 16 tokens
    assert corners["unet.up_blocks.1"]["border_px"] == "2x2"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["definitions"]["corner_ratio"] == A.DEFINITIONS["corner_ratio"]
    with np.load(out / "norm_maps.npz", allow_pickle=False) as saved:
        assert np.allclose(saved["unet.up_blocks.1|p0.2|empty"], norms, rtol=1e-5)
    for name in ("probe_accuracy", "corner_ratio", "norm_maps", "similarity_maps"):
        assert (out / f"{name}_p0.2_empty.png").stat().st_size > 1000
    assert L.load_label_table(out / "labels.npz")["item"].tolist() == found["item"].tolist()


def corner_ratio_of(cropped, original):
    return A.corner_ratio(cropped, original)["ratio"]


def test_cli_refuses_pooled_runs(model, tmp_path):
    from typer.testing import CliRunner

    from diffprobe.cli import app
    from diffprobe.data.sources import open_source
    from diffprobe.extract import ExtractionPlan, extract

    root = tmp_path / "pooled"
    extract(
        model,
        open_source("shapes:2"),
        ExtractionPlan(sites=SITES[:1], noise_levels=[0.2]),
        root,
        progress=False,
    )
    result = CliRunner().invoke(app, ["anomalies", str(root), "--quiet"])
    assert result.exit_code != 0
    assert isinstance(result.exception, A.AnomalyError) and "--pooling none" in str(
        result.exception
    )


@pytest.mark.slow
def test_demo_on_dummy_folder(pipeline_folder, tmp_path, capsys):
    numbers = D.anomalies_demo(str(pipeline_folder), tmp_path / "demo", items=8, progress=False)
    printed = capsys.readouterr().out
    # the dummy UNet has two levels: no up_blocks.2
    assert list(numbers["sites"]) == [
        "unet.down_blocks.0",
        "unet.down_blocks.1",
        "unet.mid_block",
        "unet.up_blocks.1",
    ]
    for site, entry in numbers["sites"].items():
        assert site in printed
        assert 0 <= entry["row_exact"] <= 1 and entry["row_chance"] == pytest.approx(
            1 / int(entry["grid"].split("x")[0])
        )
        assert np.isfinite(entry["corner_ratio"]) and entry["high_norm_groups"] >= 0
    for name in (
        "position_probes.csv",
        "corner_ratio.csv",
        "high_norm_counts.csv",
        "summary.json",
        "probe_accuracy_p0.2_empty.png",
        "norm_maps_p0.2_empty.png",
    ):
        assert (tmp_path / "demo" / name).is_file(), name
    with pytest.raises(A.AnomalyError, match="not in"):
        D.anomalies_demo(
            str(pipeline_folder), tmp_path / "demo2", items=2, sites=["unet.up_blocks.2"]
        )


def test_doc_examples_run():
    doc = Path(__file__).parents[1] / "docs" / "anomalies.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 7
    for block in blocks:
        exec(compile(block, str(doc), "exec"), {})
