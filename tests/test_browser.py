"""The report and the inspector in a real browser (headless Chromium driven by Playwright), used
the way a person uses them: every section and page shows its images, nothing is logged as an
error, three tokens are labelled with real clicks (the saved files and the precision and
recall on the page are checked against a count by hand), features are paged through, and
every request the pages make goes to the loopback server or nowhere.

Skipped where no browser is installed: ``apt-get install chromium`` and ``pip install
playwright`` (``.ci/run`` does both; Playwright's own browser download is not used)."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
if not Path(CHROMIUM).exists():
    pytest.skip("no chromium browser (apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.slow
PAGES = ["runs", "features", "anomalies", "alignment", "lens", "compare"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


class Recorder:
    """A page with every request and every console error recorded."""

    def __init__(self, browser):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.context.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def images_loaded(self, timeout: float = 20.0) -> list[dict]:
        """Wait for every image of the page, then their natural sizes."""
        script = "Array.from(document.images).map(i => ({src: i.src.slice(0, 80), "
        script += "done: i.complete, width: i.naturalWidth, height: i.naturalHeight}))"
        end = time.monotonic() + timeout
        while True:
            found = self.page.evaluate(script)
            if all(i["done"] for i in found) or time.monotonic() > end:
                return found
            time.sleep(0.1)

    def close(self):
        self.context.close()


@pytest.fixture
def recorder(browser):
    made = Recorder(browser)
    yield made
    made.close()


@pytest.fixture(scope="module")
def inspector(demo_like_run):
    from diffprobe.app.server import make_server, serve_in_thread, url_of
    from diffprobe.app.views import RunRef, StageRef
    from diffprobe.report.discover import find_stages

    refs = []
    for run in (demo_like_run, demo_like_run / "anomalies"):  # two runs for the comparison
        stages = find_stages(run)
        refs.append(RunRef(stages[0].root, [StageRef(s.kind, s.path, s.name) for s in stages]))
    server = make_server(refs, "127.0.0.1", 0)
    serve_in_thread(server)
    yield url_of(server)
    server.shutdown()
    server.server_close()


def _open(recorder: Recorder, url: str, name: str) -> None:
    recorder.page.goto(url + "#" + name)
    recorder.page.wait_for_selector(f"body[data-ready='{name}']", timeout=30_000)


def _loopback_only(requests: list[str], url: str) -> None:
    assert requests
    outside = [r for r in requests if not (r.startswith(url) or r.startswith("data:"))]
    assert outside == [], outside


def test_report_renders_every_section_from_disk(recorder, demo_like_run, tmp_path):
    from diffprobe.report.build import write_report

    path = write_report([demo_like_run], tmp_path / "report.html")
    recorder.page.goto(path.as_uri())
    images = recorder.images_loaded()
    sections = recorder.page.eval_on_selector_all("section.stage", "s => s.map(x => x.id)")
    assert len(sections) == 7  # runs + demo + 2 extraction runs + alignment + anomalies + lens
    figures = [
        *(demo_like_run / "grid_run" / "alignment").glob("*.png"),
        *(demo_like_run / "anomalies").glob("*.png"),
        demo_like_run / "lens" / "grid.png",
    ]
    assert len(images) == len(figures), images
    assert all(i["width"] > 0 and i["height"] > 0 for i in images), images
    assert recorder.errors == []
    assert recorder.requests == [path.as_uri()]  # the file itself; images are inlined


@pytest.mark.parametrize("name", PAGES)
def test_inspector_page_renders(recorder, inspector, name):
    _open(recorder, inspector, name)
    assert recorder.page.query_selector("#error") is None
    images = recorder.images_loaded()
    if name != "compare":  # compare shows figures only of kinds both runs hold
        assert images, name
    assert all(i["width"] > 0 for i in images), images
    assert recorder.errors == []
    _loopback_only(recorder.requests, inspector)


def _detections(stage: Path, key: str) -> list[dict]:
    site, noise, condition = key.split("|")
    with open(stage / "high_norm_detections.csv") as handle:
        rows = list(csv.DictReader(line for line in handle if not line.startswith("#")))
    return [{"item": int(r["item"]), "y": int(r["y"]), "x": int(r["x"]), "score": float(r["score"])}
            for r in rows if (r["site"], r["noise"], r["condition"]) == (site, noise, condition)]  # fmt: skip


def _by_hand(detections, labels, tolerance=1):
    """Precision and recall counted directly: on images that were looked at, each detection
    (highest score first) takes the nearest free label within ``tolerance`` tokens."""
    matched, used, n_detections, n_labels = 0, set(), 0, 0
    for item, groups in labels.items():
        n_labels += len(groups)
        mine = sorted((d for d in detections if d["item"] == item), key=lambda d: -d["score"])
        n_detections += len(mine)
        for d in mine:
            near = [(max(abs(g["y"] - d["y"]), abs(g["x"] - d["x"])), k)
                    for k, g in enumerate(groups) if (item, k) not in used]  # fmt: skip
            near = [n for n in near if n[0] <= tolerance]
            if near:
                used.add((item, min(near)[1]))
                matched += 1
    return matched / n_detections, len(used) / n_labels


def test_label_three_tokens_with_clicks(recorder, inspector, demo_like_run, tmp_path):
    stage = demo_like_run / "anomalies"
    shutil.rmtree(stage / "labels", ignore_errors=True)
    (stage / "label_scores.json").unlink(missing_ok=True)
    page = recorder.page
    _open(recorder, inspector, "anomalies")
    key = page.eval_on_selector("#key", "e => e.value")
    site = key.split("|")[0]
    grid = json.loads(page.evaluate("fetch('/api/anomalies?run=0&stage=4').then(r => r.text())"))
    height, width = grid["grids"][key]
    detections = _detections(stage, key)
    first = [d for d in detections if d["item"] == 0]
    # image 0: one group on a detection, one far from every detection; image 1: one group
    far = next((y, x) for y in range(height - 1) for x in range(width - 1)
               if all(max(abs(y - d["y"]), abs(x - d["x"])) > 2 for d in first))  # fmt: skip
    clicks = {0: [(first[0]["y"], first[0]["x"]) if first else (0, 0), far], 1: [(1, 1)]}

    def click(y, x):
        box = page.query_selector("#normmap").bounding_box()
        cell = box["width"] / width
        with page.expect_response(lambda r: r.url.endswith("/api/labels")):
            page.mouse.click(box["x"] + (x + 0.5) * cell, box["y"] + (y + 0.5) * cell)

    for y, x in clicks[0]:
        click(y, x)
    with page.expect_response(lambda r: "normmap.png" in r.url):
        page.click("#next-image")
    click(*clicks[1][0])
    click(5, 5)  # a fourth click, taken back
    with page.expect_response(lambda r: r.url.endswith("/api/labels")):
        page.click("#undo")
    # the page redraws after the response's body is read: wait for it rather than race it
    page.wait_for_function("document.querySelectorAll('#label-canvas rect.label').length === 1")
    page.wait_for_function("document.querySelector('#scores').textContent.includes('3 groups')")
    assert len(page.query_selector_all("#label-canvas rect.label")) == 1
    # the saved files: one per image, with the clicked upper-left tokens
    saved = {}
    for path in sorted((stage / "labels").glob("0*.json")):
        payload = json.loads(path.read_text())
        assert payload["format"] == "diffprobe-anomaly-labels/1" and payload["site"] == site
        saved[payload["index"]] = [(g["y"], g["x"]) for g in payload["groups"]]
    assert saved == {0: clicks[0], 1: clicks[1]}
    assert (stage / "labels" / "table.npz").is_file()
    # what the page shows equals the count by hand
    labels = {i: [{"y": y, "x": x} for y, x in groups] for i, groups in saved.items()}
    precision, recall = _by_hand(detections, labels)
    assert float(page.inner_text("#precision")) == pytest.approx(precision, abs=1e-3)
    assert float(page.inner_text("#recall")) == pytest.approx(recall, abs=1e-3)
    # `diffprobe anomalies --labels` reads the folder and finds the same precision and recall
    from diffprobe.stages.anomalies import analyse_run

    again = analyse_run(stage / "run", tmp_path / "again", corner=False, threshold=1.3,
                        labels=stage / "labels", plots=False, progress=False)  # fmt: skip
    (row,) = [r for r in again["label_comparison"] if (r["site"], r["noise"], r["condition"])
              == tuple(key.split("|"))]  # fmt: skip
    assert row["precision"] == pytest.approx(precision) and row["recall"] == pytest.approx(recall)
    assert recorder.errors == []
    _loopback_only(recorder.requests, inspector)


def test_page_through_features(recorder, inspector):
    page = recorder.page
    _open(recorder, inspector, "features")
    # the richest extraction run (three noise levels) is chosen first
    assert page.eval_on_selector("#stage-select", "e => e.selectedOptions[0].text").endswith(
        "grid_run"
    )
    profiles = [page.get_attribute("#profile polyline", "points")]
    for expected in ("1", "2"):
        page.click("#next")
        for _ in range(100):
            if page.eval_on_selector("#channel", "e => e.value") == expected:
                break
            time.sleep(0.05)
        assert page.eval_on_selector("#channel", "e => e.value") == expected
        profiles.append(page.get_attribute("#profile polyline", "points"))
    page.click("#prev")
    for _ in range(100):
        if page.eval_on_selector("#channel", "e => e.value") == "1":
            break
        time.sleep(0.05)
    assert page.eval_on_selector("#channel", "e => e.value") == "1"
    assert len(set(profiles)) == 3  # each channel has its own activity profile
    images = recorder.images_loaded()
    assert len(page.query_selector_all("#top-examples img")) == 8
    assert all(i["width"] > 0 for i in images)
    assert recorder.errors == []
    _loopback_only(recorder.requests, inspector)


@pytest.fixture(scope="module")
def feature_inspector(features_like_run):
    """The inspector over the feature stages chained on the dummy pipeline: an activity run
    (channels and SAE-like latents), its analysis, steered priors and a dream."""
    from diffprobe.app.server import make_server, serve_in_thread, url_of
    from diffprobe.app.views import RunRef, StageRef
    from diffprobe.report.discover import find_stages

    stages = find_stages(features_like_run["root"])
    refs = [RunRef(stages[0].root, [StageRef(s.kind, s.path, s.name) for s in stages])]
    server = make_server(refs, "127.0.0.1", 0)
    serve_in_thread(server)
    yield url_of(server)
    server.shutdown()
    server.server_close()


def _wait_text(page, selector: str, text: str) -> None:
    for _ in range(200):
        found = page.query_selector(selector)
        if found is not None and text in found.inner_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{selector} never showed {text!r}")


def test_page_through_features_of_an_activity_run(recorder, feature_inspector, features_like_run):
    f = features_like_run
    page = recorder.page
    _open(recorder, feature_inspector, "features")
    assert page.eval_on_selector("#stage-select", "e => e.selectedOptions[0].text").endswith(
        "activity"
    )
    peaks = json.loads((f["analysis"] / "activity_peaks.json").read_text())[f["site"]]
    profiles = []
    for channel in range(3):
        if channel:
            page.click("#next")
        _wait_text(page, "#feature-title", f"channel {channel}")
        profiles.append(page.get_attribute("#profile polyline", "points"))
        # the analysis' peaks of this channel are drawn, one line each
        assert len(page.query_selector_all("#profile line.peak-line")) == len(peaks[str(channel)])
        # the top examples are the run's generated images, served from inside the run
        thumbs = page.eval_on_selector_all("#top-examples img", "e => e.map(i => i.src)")
        assert len(thumbs) == 6 and all("/files/0/activity/images/" in t for t in thumbs)
    assert len(set(profiles)) == 3
    page.click("#prev")
    _wait_text(page, "#feature-title", "channel 1")
    # the analysis' overall top examples
    listed = json.loads((f["analysis"] / "top_examples.json").read_text())
    page.select_option("#window", "overall")
    _wait_text(page, "#top-title", "overall: top 3")
    thumbs = page.eval_on_selector_all("#top-examples img", "e => e.map(i => i.src)")
    expected = [r["item"] for r in listed[f["site"]]["1"]["overall"]]
    assert [int(t.rsplit("/", 1)[1].split(".")[0]) for t in thumbs] == expected
    # SAE latents captured as channels are labelled SAE features
    page.select_option("#site", f["sae_site"])
    _wait_text(page, "#feature-title", f"{f['sae_site']} SAE feature 0")
    assert "of 12" in page.inner_text("#unit-count")
    # a dreamt channel: the dream tab with its optimisation-progress slider, and its priors
    page.select_option("#site", f["site"])
    # the site's own first unit must be shown before the channel box is typed in: a change
    # typed while the site is still loading is overwritten by its first unit (a flaky race)
    for _ in range(200):
        if "SAE feature" not in page.inner_text("#feature-title"):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the channel site never replaced the SAE site's view")
    target = f["targets"][0]
    page.fill("#channel", str(target))
    page.dispatch_event("#channel", "change")
    _wait_text(page, "#feature-title", f"channel {target}")
    page.click("#tab-dream")
    page.wait_for_selector("#dream-tab input.progress")
    assert len(page.query_selector_all("#dream-tab input.progress")) == len(f["table"][target])
    page.click("#tab-priors")
    page.wait_for_selector("#priors-tab img")
    images = recorder.images_loaded()
    assert images and all(i["width"] > 0 for i in images), images
    assert recorder.errors == []
    _loopback_only(recorder.requests, feature_inspector)
