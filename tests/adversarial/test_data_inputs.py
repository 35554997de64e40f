"""Bad data inputs (issue 15): damaged images, odd image modes, data specs, caption files,
THINGS roots and run folders. Each is refused with one line naming the input (exit 2, nothing
left behind) or, where the data can be read, extracted or scored correctly."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffprobe.data.sources import open_source

TINY = ["--model", "tiny", "--sites", "unet.mid_block", "--noise", "0.1", "-q"]
SITES = ["unet.down_blocks.1", "unet.mid_block"]  # as the fixtures of conftest.py extract


def rgb(seed: int = 0, size: tuple[int, int] = (24, 24)) -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(values)


def encoded(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return buffer.getvalue()


# ------------------------------------------------------------------ damaged image files

DAMAGED = {
    "truncated.jpg": lambda: encoded(rgb(1), "JPEG")[: len(encoded(rgb(1), "JPEG")) // 2],
    "truncated.png": lambda: encoded(rgb(2), "PNG")[: len(encoded(rgb(2), "PNG")) // 2],
    "zero-bytes.jpg": lambda: b"",
    "text.jpg": lambda: b"this is a text file, not a picture\n",
}


def float_tiff(values: np.ndarray) -> bytes:
    return encoded(Image.fromarray(values.astype(np.float32)), "TIFF")


REFUSED_IMAGES = {
    **DAMAGED,
    "float-0-255.tif": lambda: float_tiff(np.linspace(0, 255, 24 * 24).reshape(24, 24)),
    "float-nan.tif": lambda: float_tiff(np.full((24, 24), np.nan)),
}


@pytest.fixture(scope="module")
def damaged_folders(tmp_path_factory) -> dict[str, Path]:
    """One folder per bad file: ``good/ok.png`` beside ``bad/<name>``."""
    folders = {}
    for name, make in REFUSED_IMAGES.items():
        root = tmp_path_factory.mktemp("damaged")
        (root / "good").mkdir()
        (root / "bad").mkdir()
        rgb(0).save(root / "good" / "ok.png")
        (root / "bad" / name).write_bytes(make())
        folders[name] = root
    return folders


@pytest.mark.parametrize("name", list(REFUSED_IMAGES))
def test_bad_image_is_named_before_the_run(refused, damaged_folders, name):
    root = damaged_folders[name]
    outcome = refused(["extract", *TINY, "--data", root, "--out", "run"], [f"bad/{name}"])
    assert "--on-error skip" in outcome.err


def test_truncated_image_in_a_things_root_is_named(refused, things_root, tmp_path):
    root = copy_root(things_root, tmp_path)
    image = root / "images" / "red_circle" / "red_circle_01.png"
    image.write_bytes(image.read_bytes()[:200])
    refused(["extract", *TINY, "--data", root, "--out", "run"], ["red_circle_01.png"])


def test_on_error_skip_leaves_every_bad_file_out(cli, sandbox, tmp_path, caplog):
    root = tmp_path / "mixed"
    (root / "cat").mkdir(parents=True)
    rgb(0).save(root / "cat" / "ok.png")
    rgb(3).save(root / "cat" / "ok2.jpg")
    for name, make in DAMAGED.items():
        (root / "cat" / name).write_bytes(make())
    outcome = cli("extract", *TINY, "--data", root, "--out", "run", "--on-error", "skip")
    assert outcome.code == 0, outcome.err
    info = json.loads((sandbox / "work" / "run" / "run.json").read_text())
    assert sorted(Path(s["path"]).name for s in info["data"]["skipped"]) == sorted(DAMAGED)
    assert [item["id"] for item in info["items"]] == ["cat/ok.png", "cat/ok2.jpg"]
    assert all(s["error"] and str(root) not in s["error"] for s in info["data"]["skipped"])
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(warned) == len(DAMAGED)


# ------------------------------------------------------------------ image modes that are read

GRADIENT = np.arange(24 * 24, dtype=np.float64).reshape(24, 24) / (24 * 24 - 1)
SIXTEEN = np.round(GRADIENT * 65535).astype(np.uint16)


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1)


READ_MODES = {
    # name: (file bytes, expected uint8 RGB or None for "any, of the right shape")
    "sixteen-bit.png": (
        lambda: encoded(Image.fromarray(SIXTEEN), "PNG"),
        _grey(np.round(SIXTEEN / 257).astype(np.uint8)),
    ),
    "float.tif": (
        lambda: float_tiff(GRADIENT),
        _grey(np.round(GRADIENT.astype(np.float32).astype(np.float64) * 255).astype(np.uint8)),
    ),
    "grey.png": (lambda: encoded(rgb(4).convert("L"), "PNG"), None),
    "cmyk.jpg": (lambda: encoded(rgb(5).convert("CMYK"), "JPEG"), None),
    "rgba.png": (lambda: encoded(rgb(6).convert("RGBA"), "PNG"), np.asarray(rgb(6))),
    "palette.png": (lambda: encoded(rgb(7).convert("P"), "PNG"), None),
    "grey-alpha.png": (lambda: encoded(rgb(8).convert("LA"), "PNG"), None),
    "one-bit.png": (lambda: encoded(rgb(9).convert("1"), "PNG"), None),
    "one-pixel.png": (lambda: encoded(rgb(10, (1, 1)), "PNG"), np.asarray(rgb(10, (1, 1)))),
    "wide-4000x3.png": (lambda: encoded(rgb(11, (3, 4000)), "PNG"), None),
}


@pytest.fixture(scope="module")
def modes_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("modes")
    for name, (make, _) in READ_MODES.items():
        (root / name).write_bytes(make())
    return root


@pytest.mark.parametrize("name", list(READ_MODES))
def test_image_modes_decode_to_their_real_range(modes_folder, name):
    source = open_source(modes_folder)
    item = next(it for it in source.items if it.id == name)
    image = item.load()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] == image.shape[1] == min(Image.open(modes_folder / name).size)
    expected = READ_MODES[name][1]
    if expected is not None:
        assert np.array_equal(image, expected)


def test_sixteen_bit_is_not_clipped(modes_folder):
    image = next(it for it in open_source(modes_folder).items if it.id == "sixteen-bit.png").load()
    assert (image == 255).mean() < 0.01 and image.min() == 0 and image.max() == 255
    assert len(np.unique(image)) == 256


def test_every_mode_extracts(cli, sandbox, modes_folder):
    outcome = cli("extract", *TINY, "--data", modes_folder, "--out", "run")
    assert outcome.code == 0, outcome.err
    info = json.loads((sandbox / "work" / "run" / "run.json").read_text())
    assert sorted(item["id"] for item in info["items"]) == sorted(READ_MODES)


# ------------------------------------------------------------------ data specs


@pytest.mark.parametrize(
    "spec",
    [
        "shapes:-3",
        "shapes:0",
        "shapes:abc",
        "shapes:10:x",
        "shapes:10:-1",
        "shapes:10:0:nosuchsplit",
        "shapes:10:0:train:more",
        "shapes:",
        "shapes:99999999",
        "shapes:2.5",
    ],
)
def test_bad_shapes_spec(refused, spec):
    outcome = refused(["extract", *TINY, "--data", spec, "--out", "run"], [f"'{spec}'"])
    assert len(outcome.err.strip().splitlines()) == 1


def _empty(root: Path) -> None:
    root.mkdir()


def _no_images(root: Path) -> None:
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "notes.txt").write_text("nothing to see\n")
    (root / "table.csv").write_text("a,b\n")


def _header_only_labels(root: Path) -> None:
    root.mkdir()
    (root / "labels.csv").write_text("path,label\n")
    rgb(0).save(root / "a.png")


def _latin1_labels(root: Path) -> None:
    root.mkdir()
    (root / "labels.csv").write_bytes("path,label\na.png,caf\xe9\n".encode("latin-1"))
    rgb(0).save(root / "a.png")


def _labels_name_a_missing_file(root: Path) -> None:
    root.mkdir()
    (root / "labels.csv").write_text("path,label\na.png,cat\nmissing.png,dog\n")
    rgb(0).save(root / "a.png")


def _labels_without_columns(root: Path) -> None:
    root.mkdir()
    (root / "labels.csv").write_text("file,name\na.png,cat\n")
    rgb(0).save(root / "a.png")


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (_empty, "../data is empty"),
        (_no_images, "no image files in data folder ../data"),
        (_header_only_labels, "../data/labels.csv lists no images"),
        (_latin1_labels, "../data/labels.csv is not UTF-8"),
        (_labels_name_a_missing_file, "../data/missing.png"),
        (_labels_without_columns, "../data/labels.csv needs the columns"),
    ],
)
def test_bad_data_folder(refused, sandbox, make, named):
    make(sandbox / "data")
    outcome = refused(["extract", *TINY, "--data", "../data", "--out", "run"], [named])
    assert len(outcome.err.strip().splitlines()) == 1


@pytest.mark.parametrize("spec", ["no/such/folder", "~/nowhere", "../Documents/thesis.tex"])
def test_data_path_that_is_no_folder(refused, spec):
    refused(["extract", *TINY, "--data", spec, "--out", "run"], [spec])


# ------------------------------------------------------------------ captions


def _captions(sandbox: Path, name: str, data: bytes | None) -> str:
    path = sandbox / name
    if data is None:
        return str(path)
    if data == b"<dir>":
        path.mkdir()
    else:
        path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("name", "data", "said"),
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", b"", "empty"),
        ("blank.txt", b"\n  \n", "empty"),
        ("latin1.txt", "a caf\xe9 shape\n".encode("latin-1") * 8, "UTF-8"),
        ("short.txt", b"one\ntwo\nthree\n", "3 captions for 8 items"),
        ("long.txt", b"a red circle\n" * 9, "9 captions for 8 items"),
        ("no-columns.csv", b"name,text\nx,y\n", "id,caption"),
        ("some-ids.csv", b"id,caption\nshapes-0-train-0,a red circle\n", "no caption for 7"),
        ("folder.txt", b"<dir>", "not a file"),
    ],
)
def test_bad_captions_file(refused, sandbox, name, data, said):
    path = _captions(sandbox, name, data)
    refused(
        ["extract", *TINY, "--data", "shapes:8", "--captions", path, "--out", "run"],
        [path, said],
    )


# ------------------------------------------------------------------ THINGS roots


def copy_root(root: Path, where: Path) -> Path:
    copy = where / "things-copy"
    shutil.copytree(root, copy)
    return copy


def _save(relative: str, array) -> callable:
    def damage(root: Path) -> Path:
        path = root / relative
        np.save(path, array, allow_pickle=True)
        return path

    return damage


def _write(relative: str, data: bytes) -> callable:
    def damage(root: Path) -> Path:
        path = root / relative
        path.write_bytes(data)
        return path

    return damage


def _remove(relative: str, also: str | None = None) -> callable:
    def damage(root: Path) -> Path:
        if also:
            (root / also).unlink()
        path = root / relative
        path.unlink()
        return path

    return damage


def _truncated_npy(root: Path) -> Path:
    path = root / "triplets" / "test_10.npy"
    path.write_bytes(path.read_bytes()[:300])
    return path


def _repeated_wrong_shape(root: Path) -> Path:
    (root / "triplets" / "noise_ceiling.json").unlink()
    path = root / "triplets" / "repeated.npy"
    np.save(path, np.arange(10))
    return path


TEST = "triplets/test_10.npy"
CEILING = "triplets/noise_ceiling.json"
THINGS_DAMAGE = {
    "objects": (_save(TEST, np.array([{"a": 1}, None, 3], dtype=object)), "Python objects"),
    "text": (_save(TEST, np.array([["a", "b", "c"]])), "text"),
    "two-columns": (_save(TEST, np.zeros((5, 2), dtype=np.int64)), "(triplets, 3)"),
    "one-dimensional": (_save(TEST, np.arange(9)), "(triplets, 3)"),
    "out-of-range": (_save(TEST, np.array([[0, 1, 2], [3, 48, 5]])), "outside 0..47"),
    "negative": (_save(TEST, np.array([[0, 1, -1]])), "outside 0..47"),
    "float-inf": (_save(TEST, np.array([[0.0, 1.0, np.inf]])), "non-integer"),
    "empty": (_save(TEST, np.zeros((0, 3), dtype=np.int64)), "holds no triplets"),
    "garbage": (_write(TEST, b"not numpy at all"), "not a .npy file"),
    "zero-bytes": (_write(TEST, b""), "not a .npy file"),
    "truncated": (_truncated_npy, "not a readable .npy"),
    "ceiling-not-json": (_write(CEILING, b"{ceiling: 0.8"), "not valid JSON"),
    "ceiling-no-key": (_write(CEILING, b'{"expected": 0.8}'), "no 'ceiling' entry"),
    "ceiling-a-list": (_write(CEILING, b"[0.8]"), "no 'ceiling' entry"),
    "ceiling-text": (_write(CEILING, b'{"ceiling": "high"}'), "not a number"),
    "ceiling-null": (_write(CEILING, b'{"ceiling": null}'), "not a number"),
    "ceiling-out-of-range": (_write(CEILING, b'{"ceiling": 0.2}'), "outside"),
    "repeated-wrong-shape": (_repeated_wrong_shape, "(triplets, repeats"),
    "no-concepts-table": (_remove("things_concepts.tsv"), "is missing"),
    "concepts-not-utf8": (_write("things_concepts.tsv", b"uniqueID\n\xff\xfe\n"), "UTF-8"),
    "concepts-no-uniqueid": (_write("things_concepts.tsv", b"id\tWord\nx\ty\n"), "uniqueID"),
}


@pytest.mark.parametrize("case", list(THINGS_DAMAGE))
def test_damaged_things_root_for_align(refused, things_root, run_dir, tmp_path, case):
    damage, said = THINGS_DAMAGE[case]
    root = copy_root(things_root, tmp_path)
    path = damage(root)
    refused(["align", run_dir, "--things", root, "--out", "aligned", "-q"], [str(path), said])
    assert not (run_dir / "alignment").exists()


@pytest.mark.parametrize("command", ["probe", "regress"])
@pytest.mark.parametrize("case", ["objects", "empty", "ceiling-no-key", "no-concepts-table"])
def test_damaged_things_root_for_probe_and_regress(
    refused, things_root, run_dir, tmp_path, command, case
):
    damage, said = THINGS_DAMAGE[case]
    root = copy_root(things_root, tmp_path)
    path = damage(root)
    extra = ["--target", "shapes-factors"] if command == "regress" else []
    refused(
        [command, run_dir, "--things", root, *extra, "--triplets", "test", "--out", "o", "-q"],
        [str(path), said],
    )


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "does not exist"),
        (b"0 1 2\n3 four 5\n", "rows of numbers"),
        (b"", "holds no triplets"),
        (b"0 1\n2 3\n", "(triplets, 3)"),
        (b"0 1 2\n\xff\xfe\n", "UTF-8"),
    ],
)
def test_bad_triplets_option(refused, things_root, run_dir, sandbox, content, said):
    path = sandbox / "triplets.txt"
    if content is not None:
        path.write_bytes(content)
    refused(
        ["align", run_dir, "--things", things_root, "--triplets", path, "--out", "a", "-q"],
        [str(path), said],
    )


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("objects.npy", "objects", "Python objects"),
        ("rows.npy", np.zeros((5, 3)), "one row per concept"),
        ("words.txt", b"a b c\n", "rows of numbers"),
        ("nan.npy", np.full((48, 3), np.nan), "NaN"),
        ("missing.npy", None, "does not exist"),
    ],
)
def test_bad_regression_target(refused, things_root, run_dir, sandbox, name, content, said):
    path = sandbox / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        np.save(path, np.array([{}, None], dtype=object), allow_pickle=True)
    elif content is not None:
        np.save(path, content)
    refused(
        ["regress", run_dir, "--things", things_root, "--target", path, "--out", "r", "-q"],
        [str(path), said],
    )


def test_missing_things_root(refused, run_dir):
    refused(["align", run_dir, "--things", "no/things/here", "-q"], ["no/things/here"])


# ------------------------------------------------------------------ run folders


def _no_zarr(run: Path) -> None:
    shutil.rmtree(run / "features.zarr")


def _run_json(text: str):
    def damage(run: Path) -> None:
        (run / "run.json").write_text(text)

    return damage


def _drop_key(key: str):
    def damage(run: Path) -> None:
        info = json.loads((run / "run.json").read_text())
        del info[key]
        (run / "run.json").write_text(json.dumps(info))

    return damage


def _no_array(run: Path) -> None:
    shutil.rmtree(run / "features.zarr" / "unet.mid_block")


RUN_DAMAGE = {
    "no-zarr": (_no_zarr, "features.zarr"),
    "not-json": (_run_json('{"sites": ["unet.mid_block"'), "not valid JSON"),
    "a-list": (_run_json("[1, 2]"), "not an object"),
    "no-sites": (_drop_key("sites"), "sites"),
    "no-items": (_drop_key("items"), "items"),
    "no-run-json": (lambda run: (run / "run.json").unlink(), "no run.json"),
}


@pytest.mark.parametrize("command", ["align", "anomalies", "probe"])
@pytest.mark.parametrize("case", list(RUN_DAMAGE))
def test_damaged_run_folder(refused, sandbox, run_dir, things_root, command, case):
    damage, said = RUN_DAMAGE[case]
    run = sandbox / "damaged-run"
    shutil.copytree(run_dir, run)
    damage(run)
    extra = [] if command == "anomalies" else ["--things", things_root]
    refused([command, run, *extra, "-q"], [str(run), said])


def test_run_missing_one_array(refused, sandbox, run_dir, things_root):
    run = sandbox / "damaged-run"
    shutil.copytree(run_dir, run)
    _no_array(run)
    refused(["align", run, "--things", things_root, "-q"], [str(run), "unet.mid_block"])


@pytest.mark.parametrize("path", ["no/such/run", "../Documents/thesis.tex"])
def test_run_that_is_no_folder(refused, things_root, path):
    refused(["align", path, "--things", things_root, "-q"], [path])


# ------------------------------------------------------------------ NaN and infinity in features


def _plant(run: Path, rows: dict[tuple[str, str], list[int]], value: float = np.nan) -> None:
    import zarr

    group = zarr.open_group(str(run / "features.zarr"), mode="r+", zarr_format=3)
    for (site, noise), items in rows.items():
        array = group[f"{site}/empty/{noise}"]
        for item in items:
            array[item] = value


def _expected_accuracy(run, things, site, noise, removed: list[int]):
    """OOO accuracy with the ``removed`` items left out of the manifest by hand."""
    from diffprobe.analysis.alignment import concept_means, ooo_accuracy, restrict_triplets

    features = run.get(site, noise)
    concepts = things.item_concepts(run.manifest)
    concepts[removed] = -1
    means, counts = concept_means(features, concepts, things.n_concepts)
    covered = counts > 0
    used = restrict_triplets(things.get_triplets("test"), covered)
    return ooo_accuracy(means[covered], used), len(used)


@pytest.fixture
def nan_run(run_dir, tmp_path) -> Path:
    run = tmp_path / "nan-run"
    shutil.copytree(run_dir, run)
    return run


def test_nan_items_are_left_out_of_the_averages(nan_run, things_root, caplog):
    import diffprobe
    from diffprobe.data.things import load_things
    from diffprobe.stages.align import align_run

    # items 2k and 2k + 1 are the two images of concept k: NaN in one image of concepts 0-4,
    # infinity in one image of concept 7, only at (mid_block, p0.1)
    planted = [0, 3, 4, 7, 8, 14]
    _plant(nan_run, {("unet.mid_block", "p0.1"): planted[:-1]})
    _plant(nan_run, {("unet.mid_block", "p0.1"): planted[-1:]}, np.inf)
    run, things = diffprobe.open_run(nan_run), load_things(things_root)
    with caplog.at_level(logging.WARNING):
        result = align_run(run, things, progress=False)
    rows = {(r["site"], r["noise"]): r for r in result.rows}
    expected, triplets = _expected_accuracy(run, things, "unet.mid_block", "p0.1", planted)
    assert rows["unet.mid_block", "p0.1"]["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert rows["unet.mid_block", "p0.1"]["triplets"] == triplets == len(things.triplets["test"])
    # the other arrays are untouched
    clean, _ = _expected_accuracy(run, things, "unet.mid_block", "p0.5", [])
    assert rows["unet.mid_block", "p0.5"]["accuracy"] == pytest.approx(clean, abs=1e-12)
    warnings = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert len(warnings) == 1
    assert "unet.mid_block" in warnings[0] and "p0.1" in warnings[0] and "empty" in warnings[0]
    assert "6 of 96 items" in warnings[0]


def test_a_concept_without_finite_items_is_left_out_everywhere(nan_run, things_root, caplog):
    import diffprobe
    from diffprobe.data.things import load_things
    from diffprobe.stages.align import align_run, load_concept_features

    _plant(nan_run, {("unet.down_blocks.1", "p0.5"): [10, 11, 20]})  # all of concept 5
    run, things = diffprobe.open_run(nan_run), load_things(things_root)
    with caplog.at_level(logging.WARNING):
        result = align_run(run, things, progress=False)
    assert not result.covered[5] and result.covered.sum() == 47
    for row in result.rows:
        removed = [10, 11, 20] if row["noise"] == "p0.5" and "down" in row["site"] else [10, 11]
        expected, triplets = _expected_accuracy(run, things, row["site"], row["noise"], removed)
        assert row["accuracy"] == pytest.approx(expected, abs=1e-12)
        assert row["triplets"] == triplets < len(things.triplets["test"])
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "3 of 96 items" in messages
    assert things.unique_ids[5] in messages  # the concept left out is named
    features, covered = load_concept_features(run, things)
    assert covered.sum() == 47 and all(np.isfinite(v).all() for v in features.values())


@pytest.mark.slow
def test_nan_store_through_the_cli(cli, sandbox, nan_run, things_root, caplog):
    _plant(nan_run, {("unet.mid_block", "p0.1"): [1, 2]})
    outcome = cli("align", nan_run, "--things", things_root, "--out", "aligned", "--json")
    assert outcome.code == 0, outcome.err
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "2 of 96 items hold NaN or infinite features" in messages
    rows = json.loads(outcome.out)
    assert all(np.isfinite(r["accuracy"]) for r in rows)


def test_all_nan_is_refused(refused, sandbox, run_dir, things_root):
    run = sandbox / "nan-run"
    shutil.copytree(run_dir, run)
    _plant(run, {("unet.mid_block", "p0.5"): list(range(96))})
    refused(
        ["align", run, "--things", things_root, "-q"],
        ["unet.mid_block", "p0.5", str(run), "NaN or infinite"],
    )
