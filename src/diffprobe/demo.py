"""``make demo``: the main job on the embedded default (`tiny` and the shapes world).

Each stage writes into the output folder and prints a short summary; later stages are added as
the capabilities land.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEMO_SITES = [
    "unet.down_blocks.0",
    "unet.down_blocks.1",
    "unet.mid_block",
    "unet.up_blocks.0",
    "unet.up_blocks.1.attentions.0",
    "text_encoder.encoder.layers.1",
]


def _print(text: str = "") -> None:
    print(text, flush=True)


def stage_models() -> None:
    from diffprobe.registry import list_models

    _print("== models ==")
    for spec in list_models():
        _print(f"  {spec.alias:<14} {spec.family:<5} {spec.resolution:>5} px  {spec.description}")


def stage_sites(out: Path) -> None:
    from diffprobe.models.meta import site_shapes

    _print("== sites of sd1.5 at 512 px (meta device, no weights) ==")
    shapes = site_shapes("sd1.5", 512, ["unet"])
    blocks = [s for s in shapes.values() if s.site.count(".") == 2 or s.site == "unet.mid_block"]
    for s in blocks:
        _print(f"  {s.site:<22} {tuple(s.shape)}")
    (out / "sites_sd1.5_512.json").write_text(
        json.dumps({s.site: list(s.shape) for s in shapes.values()}, indent=1)
    )


def stage_capture(out: Path) -> dict:
    import diffprobe

    _print("== capture on tiny ==")
    model = diffprobe.load("tiny")
    caption = "a small red circle in the top left"
    with diffprobe.capture(model, DEMO_SITES) as cache:
        images = model.generate(caption, steps=20, guidance_scale=5.0, seed=0)
    summary = {}
    for site in DEMO_SITES:
        records = cache.records(site)
        value = records[-1].value
        summary[site] = {
            "records": len(records),
            "shape_per_record": list(value.shape),
            "branches": sorted({r.branch for r in records}),
        }
        _print(f"  {site:<32} {len(records):>3} records of {tuple(value.shape)}")
    (out / "capture.json").write_text(json.dumps(summary, indent=1))
    _save_image(images[0], out / "tiny_sample.png")
    _print(f"  image for {caption!r} -> {out / 'tiny_sample.png'}")
    return summary


def _save_image(image, path: Path) -> None:
    from PIL import Image

    array = (torch.as_tensor(image).clamp(0, 1).numpy() * 255).round().astype("uint8")
    Image.fromarray(array).save(path)


def stage_grid(out: Path, n: int = 16) -> Path:
    """Issue 3: a captioned grid of `tiny` images for held-out captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import diffprobe
    from diffprobe.data import shapes

    _print("== tiny: generated images for held-out captions ==")
    model = diffprobe.load("tiny")
    heldout = shapes.sample(n, seed=0, split="heldout")
    images = model.generate(list(heldout.captions), steps=25, guidance_scale=5.0, seed=0)
    images = torch.as_tensor(images).clamp(0, 1).numpy()
    columns = 4
    figure, axes = plt.subplots(n // columns, columns, figsize=(columns * 2.6, n // columns * 2.9))
    for axis, image, caption in zip(axes.flat, images, heldout.captions, strict=True):
        axis.imshow(image, interpolation="nearest")
        axis.set_title("\n".join(_wrap(caption, 26)), fontsize=7)
        axis.axis("off")
    figure.suptitle("tiny, held-out captions (25 DDIM steps, guidance 5, seed 0)", fontsize=9)
    figure.tight_layout()
    path = out / "tiny_grid.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    _print(f"  {n} images -> {path}")
    return path


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


DEMO_GRID_SITES = [
    "unet.down_blocks.0",
    "unet.down_blocks.1",
    "unet.down_blocks.2",
    "unet.mid_block",
    "unet.up_blocks.0",
    "unet.up_blocks.1",
    "unet.up_blocks.2",
    "unet.up_blocks.1.attentions.0",
    "unet.up_blocks.2.attentions.0",
]
DEMO_NOISE = [0.02, 0.1, 0.2, 0.3, 0.5, 0.7]
# The conditioning axis of the alignment study: the empty prompt (what the image alone evokes)
# and the concept's label as the prompt ("a red circle"). Keyword arguments of
# diffprobe.extract.engine.Condition.
DEMO_CONDITIONS = [
    {"name": "empty"},
    {"name": "label", "kind": "template", "template": "a {label}"},
]


def stage_extract(out: Path, progress: bool) -> tuple[Path, Path]:
    """Issue 4: an extraction grid on the shapes world (THINGS layout) with `tiny`."""
    import diffprobe
    from diffprobe.data.sources import open_source
    from diffprobe.data.things_export import export_things
    from diffprobe.extract.engine import Condition, ExtractionPlan, extract

    _print("== extraction grid: tiny x shapes world (THINGS layout) ==")
    things_root = out / "shapes_things-12"  # the configuration of benchmarks/alignment_tiny.py
    if not (things_root / "things_concepts.tsv").exists():
        export_things(things_root, images_per_concept=12, n_train=36_000, n_test=4_000)
    model = diffprobe.load("tiny")
    source = open_source(str(things_root))
    plan = ExtractionPlan(sites=DEMO_GRID_SITES, noise_levels=DEMO_NOISE, pooling="mean",
                          conditions=[Condition(**c) for c in DEMO_CONDITIONS])  # fmt: skip
    run_dir = extract(model, source, plan, out / "grid_run", batch_size=64, overwrite=True,
                      progress=progress)  # fmt: skip
    run = diffprobe.open_run(run_dir)
    first = run.get(DEMO_GRID_SITES[0], DEMO_NOISE[0])
    _print(
        f"  {len(source)} images x {len(DEMO_GRID_SITES)} sites x {len(DEMO_NOISE)} noise levels "
        f"x {len(DEMO_CONDITIONS)} conditions ({', '.join(run.conditions)}) -> {run_dir} "
        f"(e.g. {DEMO_GRID_SITES[0]} {first.shape})"
    )
    return run_dir, things_root


def stage_alignment(run_dir: Path, things_root: Path, out: Path) -> dict:
    """Issue 5: odd-one-out accuracy, probe and regression on the shapes world."""
    from diffprobe.analysis.alignment import demo

    _print("== alignment: odd-one-out on the shapes world ==")
    return demo(run_dir, things_root, out / "alignment", folds=5)


def stage_anomalies(out: Path) -> dict:
    """Issue 6: position probes, corner ratios, high-norm tokens on `tiny`."""
    from diffprobe.analysis.anomalies import demo

    return demo("tiny", out / "anomalies", items=64)


def stage_lens(out: Path) -> dict:
    """Issue 7: a Diffusion Lens grid for one caption."""
    from diffprobe.lens import demo

    _print("== Diffusion Lens on tiny ==")
    return demo("tiny", out / "lens")


def run_demo(out: Path, progress: bool = True) -> None:
    import time

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    stage_models()
    stage_sites(out)
    stage_capture(out)
    stage_grid(out)
    run_dir, things_root = stage_extract(out, progress)
    stage_alignment(run_dir, things_root, out)
    stage_anomalies(out)
    stage_lens(out)
    _print(f"demo outputs in {out}/ ({time.perf_counter() - began:.0f} s)")
