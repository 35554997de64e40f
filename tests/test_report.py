"""``diffprobe report``: stages found by their markers, one section each, a self-contained page
(every image inlined byte for byte, no address to fetch), sections that show the numbers of the
stage's own files."""

from __future__ import annotations

import base64
import csv
import re

import numpy as np
import pytest

from diffprobe.io import claim_output, write_bytes, write_csv, write_json
from diffprobe.report.build import ReportError, build_report, check_report_path, write_report
from diffprobe.report.discover import RunError, find_stages


def _png(width: int, height: int, value: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def synthetic_run(tmp_path):
    """A run folder with an extraction run.json, a lens stage, a stage of a kind the report has
    never heard of (``features``) holding a figure, a CSV and a JSON, a cropped run inside an
    anomaly stage, and a symbolic link to a marked folder outside the run."""
    root = claim_output(tmp_path / "run", "demo")
    extract = claim_output(root / "grid", "extract")
    write_json(extract / "run.json", {"sites": ["unet.mid_block"], "model": {"name": "m"},
                                      "noise": [{"noise_level": 0.1, "timestep": 100}],
                                      "items": [{"id": "a"}], "pooling": "mean"})  # fmt: skip
    lens = claim_output(root / "lens", "lens")
    write_json(lens / "lens.json", {"prompt": "a red circle", "layers": [0, 5]})
    write_bytes(lens / "grid.png", _png(20, 10, 200))
    features = claim_output(root / "features", "features")
    write_bytes(features / "activity.png", _png(12, 8, 50))
    write_csv(features / "peaks.csv", [{"channel": 3, "peak": 0.25}, {"channel": 7, "peak": 0.5}])
    write_json(features / "summary.json", {"channels": 2, "site": "unet.mid_block"})
    anomalies = claim_output(root / "anomalies", "anomalies")
    claim_output(anomalies / "cropped-unet.mid_block", "extract")
    outside = claim_output(tmp_path / "elsewhere", "lens")
    write_bytes(outside / "grid.png", _png(4, 4, 0))
    (root / "link").symlink_to(outside, target_is_directory=True)
    return root


def test_stages_found_by_their_markers(synthetic_run):
    found = [(s.kind, s.name) for s in find_stages(synthetic_run)]
    # report order: demo, extract, ..., anomalies, lens, features; no cropped run, no link
    assert found == [("demo", "."), ("extract", "grid"), ("anomalies", "anomalies"),
                     ("lens", "lens"), ("features", "features")]  # fmt: skip


def test_no_output_is_one_clear_error(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(RunError, match="no diffprobe output"):
        find_stages(tmp_path / "photos")


def test_report_is_self_contained_and_inlines_every_figure(synthetic_run):
    document = build_report([synthetic_run])
    # no address outside the page: no src/href but data: URIs and anchors
    addresses = re.findall(r"""(?:src|href)=['"]([^'"]*)['"]""", document)
    assert addresses and all(a.startswith(("data:image/png;base64,", "#")) for a in addresses)
    assert "http://" not in document and "https://" not in document
    assert "default-src 'none'" in document  # the browser may fetch nothing either
    inlined = [base64.b64decode(a.split(",", 1)[1]) for a in addresses if a.startswith("data:")]
    # the stage figures are inlined byte for byte (and the link's figure is not)
    for path in (synthetic_run / "lens" / "grid.png", synthetic_run / "features" / "activity.png"):
        assert path.read_bytes() in inlined
    assert (synthetic_run / "link" / "grid.png").read_bytes() not in inlined
    # the unknown kind gets the generic section: its table and JSON values are shown
    section = document.split("id='s4-features'")[1]
    assert "peaks.csv" in section and ">7<" in section and "unet.mid_block" in section
    titles = re.findall(r"<h2>([^<]*)<", document)
    assert titles[0] == "Runs and stages" and len(titles) == 6


def test_report_path_rules(tmp_path, synthetic_run):
    with pytest.raises(ReportError, match=r"\.html"):
        check_report_path(tmp_path / "r.txt")
    theirs = tmp_path / "theirs.html"
    theirs.write_text("<html>mine</html>")
    with pytest.raises(ReportError, match="not a diffprobe report"):
        check_report_path(theirs, overwrite=True)
    out = write_report([synthetic_run], tmp_path / "r.html")
    with pytest.raises(ReportError, match="--overwrite"):
        write_report([synthetic_run], out)
    assert write_report([synthetic_run], out, overwrite=True) == out
    assert out.stat().st_mode & 0o777 == 0o644


@pytest.mark.slow
def test_demo_like_run_sections_show_the_stage_numbers(demo_like_run):
    document = build_report([demo_like_run])
    titles = re.findall(r"<h2>([^<]*)<", document)
    for expected in ("Demo outputs", "Provenance: extraction run", "Alignment", "Anomalies",
                     "Diffusion Lens"):  # fmt: skip
        assert any(t.startswith(expected) for t in titles), (expected, titles)
    # the OOO table starts with the best row of alignment.csv
    with open(demo_like_run / "grid_run" / "alignment" / "alignment.csv") as handle:
        rows = list(csv.DictReader(line for line in handle if not line.startswith("#")))
    best = max(rows, key=lambda r: float(r["accuracy"]))
    alignment = document.split("Odd-one-out accuracy, best first")[1]
    first_row = alignment.split("<tbody><tr>")[1].split("</tr>")[0]
    assert best["site"] in first_row and f"{float(best['accuracy']):.4g}" in first_row
    # every figure of the alignment and anomaly stages is in the page (the stage's heatmap is
    # replaced by the report's, on a scale from chance to the ceiling)
    for folder in (demo_like_run / "grid_run" / "alignment", demo_like_run / "anomalies"):
        for path in folder.glob("*.png"):
            if path.name == "accuracy_heatmap.png":
                continue
            assert base64.b64encode(path.read_bytes()).decode() in document, path


def test_sections_of_the_parallel_stages_show_their_files(tmp_path):
    """The layouts documented by ``diffprobe features analyse``, ``dream``, ``hspace eval`` and
    ``attribution``: each section inlines the stage's own figures and shows its numbers."""
    root = claim_output(tmp_path / "run", "demo")
    analysis = claim_output(root / "features", "features-analysis")
    write_json(analysis / "analysis.json", {"sites": ["unet.mid_block"], "timesteps": [1, 2]})
    write_csv(analysis / "channels.csv", [
        {"site": "unet.mid_block", "channel": 4, "max_activation": 0.5},
        {"site": "unet.mid_block", "channel": 9, "max_activation": 2.5},
    ])  # fmt: skip
    figures = {
        "heatmap": write_bytes(
            analysis / "plots" / "unet.mid_block" / "heatmap.png", _png(9, 5, 1)
        ),
        "profile": write_bytes(
            analysis / "plots" / "unet.mid_block" / "profile_c00009.png", _png(9, 5, 2)
        ),  # fmt: skip
    }
    dream = claim_output(root / "dream", "dream")
    write_json(dream / "dream.json", {"site": "unet.mid_block", "steps": 40})
    write_csv(dream / "summary.csv", [{"channel": 3, "initial": 0.1, "final": 0.9}])
    figures["dream"] = write_bytes(dream / "channel_0003" / "grid.png", _png(9, 5, 3))
    hspace = claim_output(root / "hspace", "hspace")
    write_json(hspace / "eval.json", {"s_dir": 0.25, "strengths": [0, 1]})
    figures["metrics"] = write_bytes(hspace / "metrics.png", _png(9, 5, 4))
    figures["grid"] = write_bytes(hspace / "grid.png", _png(9, 5, 5))
    attribution = claim_output(root / "attribution", "attribution")
    write_json(attribution / "attribution.json", {"miou": 0.625})
    (attribution / "000").mkdir()
    (attribution / "000" / "prompt.txt").write_text("a red circle")
    figures["comparison"] = write_bytes(attribution / "000" / "comparison.png", _png(9, 5, 6))
    document = build_report([root])
    for name, path in figures.items():
        assert base64.b64encode(path.read_bytes()).decode() in document, name
    features = re.search(r"id='s\d+-features-analysis'>(.*?)</section>", document).group(1)
    assert features.index(">9<") < features.index(">4<")  # top channels first
    for text in ("0.625", "a red circle", "s_dir", "0.9"):
        assert text in document, text
