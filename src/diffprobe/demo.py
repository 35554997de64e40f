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
        summary[site] = {"records": len(records), "shape_per_record": list(value.shape),
                         "branches": sorted({r.branch for r in records})}
        _print(f"  {site:<32} {len(records):>3} records of {tuple(value.shape)}")
    (out / "capture.json").write_text(json.dumps(summary, indent=1))
    _save_image(images[0], out / "tiny_sample.png")
    _print(f"  image for {caption!r} -> {out / 'tiny_sample.png'}")
    return summary


def _save_image(image, path: Path) -> None:
    from PIL import Image

    array = (torch.as_tensor(image).clamp(0, 1).numpy() * 255).round().astype("uint8")
    Image.fromarray(array).save(path)


def run_demo(out: Path, progress: bool = True) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage_models()
    stage_sites(out)
    stage_capture(out)
    _print(f"demo outputs in {out}/")
