"""Measure the report of a run (size, time to open in headless Chromium) and, with
``--screens FOLDER``, take the screenshots of the report and of every inspector page shown in
the README (docs/figures/).

    python benchmarks/report_open.py runs/demo [RUN2] [--screens docs/figures] [--repeats 5]

Prints one JSON object: the report's size in bytes and MB, the seconds ``diffprobe report``
took, and per opening the browser's own load time (navigation start to the load event) and the
wall time of ``page.goto`` (median and all of them). Needs chromium (apt) and playwright (pip).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
PAGES = ["runs", "features", "anomalies", "alignment", "lens", "compare"]


def _wait_images(page, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    script = "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
    while time.monotonic() < end and not page.evaluate(script):
        time.sleep(0.1)


def _small_png(data: bytes, path: Path, width: int = 1100) -> None:
    """Screenshots stay small in git: scaled to ``width`` and reduced to 256 colours."""
    from PIL import Image

    picture = Image.open(io.BytesIO(data)).convert("RGB")
    if picture.width > width:
        picture = picture.resize((width, round(picture.height * width / picture.width)),
                                 Image.LANCZOS)  # fmt: skip
    picture = picture.quantize(256, method=Image.Quantize.MEDIANCUT)
    picture.save(path, format="PNG", optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--screens", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from diffprobe.app.server import make_server, serve_in_thread, url_of
    from diffprobe.app.views import RunRef, StageRef
    from diffprobe.report.build import write_report
    from diffprobe.report.discover import find_stages

    out = Path(tempfile.mkdtemp()) / "report.html"
    began = time.perf_counter()
    write_report(args.runs, out)
    build_seconds = time.perf_counter() - began
    size = out.stat().st_size
    result = {"runs": [str(r) for r in args.runs], "report_bytes": size,
              "report_mb": round(size / 2**20, 2), "build_seconds": round(build_seconds, 2)}  # fmt: skip
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        loads, walls = [], []
        for _ in range(args.repeats):
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            began = time.perf_counter()
            page.goto(out.as_uri(), wait_until="load")
            walls.append(time.perf_counter() - began)
            timing = page.evaluate(
                "(() => { const n = performance.getEntriesByType('navigation')[0]; "
                "return n.loadEventEnd - n.startTime; })()"
            )
            loads.append(timing / 1000)
            if args.screens and len(loads) == 1:
                args.screens.mkdir(parents=True, exist_ok=True)
                _small_png(page.screenshot(), args.screens / "report_top.png")
                for anchor in ("align", "anomalies"):
                    found = page.query_selector(f"section[id$='-{anchor}']")
                    if found:
                        found.scroll_into_view_if_needed()
                        _small_png(found.screenshot(), args.screens / f"report_{anchor}.png")
            context.close()
        result["open_load_event_seconds"] = {"median": round(statistics.median(loads), 3),
                                             "all": [round(v, 3) for v in loads]}  # fmt: skip
        result["open_goto_seconds"] = {"median": round(statistics.median(walls), 3),
                                       "all": [round(v, 3) for v in walls]}  # fmt: skip
        if args.screens:
            refs = []
            for run in args.runs:
                stages = find_stages(run)
                refs.append(RunRef(stages[0].root,
                                   [StageRef(s.kind, s.path, s.name) for s in stages]))  # fmt: skip
            server = make_server(refs, "127.0.0.1", 0)
            serve_in_thread(server)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            for name in PAGES:
                page.goto(url_of(server) + "#" + name)
                page.wait_for_selector(f"body[data-ready='{name}']")
                if name == "anomalies":  # show a label and the live scores
                    box = page.query_selector("#normmap").bounding_box()
                    with page.expect_response(lambda r: r.url.endswith("/api/labels")):
                        page.mouse.click(box["x"] + box["width"] * 0.3,
                                         box["y"] + box["height"] * 0.3)  # fmt: skip
                _wait_images(page)
                time.sleep(0.3)
                _small_png(page.screenshot(), args.screens / f"inspect_{name}.png")
            server.shutdown()
        browser.close()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
