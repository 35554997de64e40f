"""Quality of ``tiny``: attribute accuracy of generated images and VAE reconstruction PSNR.

Generates images from held-out captions (``shapes.sample(split="heldout")``: combinations of
shape, colour, size and quadrant never seen in training) with the plain
``StableDiffusionPipeline`` and reads them back with ``diffprobe.data.attributes``.

    .venv/bin/python benchmarks/tiny_quality.py                      # the committed tiny
    .venv/bin/python benchmarks/tiny_quality.py runs/tiny-train/pipeline --items 256

Prints one JSON object on stdout; ``--out FILE`` also writes it. Generation of item ``i`` uses
a generator seeded by ``seed + i``, so results do not depend on ``--batch-size``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = Path(str(resources.files("diffprobe"))) / "assets" / "tiny"


def reconstruction_psnr(pipeline, images: np.ndarray, batch_size: int = 128) -> float:
    """PSNR (dB) of uint8 images (items, 64, 64, 3) through ``pipeline.vae`` (posterior mean)."""
    from diffprobe.train.tiny import psnr

    vae = pipeline.vae
    outputs = []
    with torch.no_grad():
        for first in range(0, len(images), batch_size):
            batch = torch.as_tensor(images[first : first + batch_size]).to(vae.device)
            batch = batch.permute(0, 3, 1, 2).to(vae.dtype) / 127.5 - 1
            decoded = vae.decode(vae.encode(batch).latent_dist.mean).sample
            decoded = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            outputs.append(decoded.permute(0, 2, 3, 1).cpu().numpy())
    return psnr(images, np.concatenate(outputs))


def generate(
    pipeline,
    captions: list[str],
    *,
    steps: int,
    guidance: float,
    seed: int,
    batch_size: int,
    progress: bool = True,
) -> np.ndarray:
    """uint8 images (items, 64, 64, 3), item ``i`` generated with seed ``seed + i``."""
    from tqdm.auto import tqdm

    pipeline.set_progress_bar_config(disable=True)
    images = []
    for first in tqdm(range(0, len(captions), batch_size), desc="generate", disable=not progress):
        prompts = captions[first : first + batch_size]
        generators = [torch.Generator().manual_seed(seed + first + i) for i in range(len(prompts))]
        output = pipeline(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="np",
        ).images
        images.append(np.rint(output * 255).astype(np.uint8))
    return np.concatenate(images)


def measure(
    pipeline_dir: str | Path = TINY,
    *,
    items: int = 256,
    steps: int = 25,
    guidance: float = 5.0,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    save_images: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Attribute accuracies on ``items`` held-out captions and the VAE's held-out PSNR."""
    from diffusers import StableDiffusionPipeline

    from diffprobe.data import shapes
    from diffprobe.data.attributes import attribute_accuracy

    began = time.perf_counter()
    pipeline = StableDiffusionPipeline.from_pretrained(pipeline_dir).to(device)
    load_seconds = time.perf_counter() - began
    heldout = shapes.sample(items, seed=seed, split="heldout")

    began = time.perf_counter()
    images = generate(pipeline, heldout.captions, steps=steps, guidance=guidance, seed=seed,
                      batch_size=batch_size, progress=progress)  # fmt: skip
    generate_seconds = time.perf_counter() - began
    scores = attribute_accuracy(images, heldout.factors)
    if save_images is not None:
        np.savez_compressed(save_images, images=images, captions=np.array(heldout.captions))
    return {
        "pipeline": str(pipeline_dir),
        "items": items,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "device": device,
        "accuracy": scores,
        "vae_psnr_heldout": reconstruction_psnr(pipeline, heldout.images),
        "load_seconds": load_seconds,
        "generate_seconds": generate_seconds,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", nargs="?", default=str(TINY))
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--save-images", type=Path, help="write the images to this .npz")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.pipeline, items=args.items, steps=args.steps, guidance=args.guidance,
                     seed=args.seed, batch_size=args.batch_size, device=args.device,
                     save_images=args.save_images, progress=not args.quiet)  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(
        f"colour {result['accuracy']['colour']:.3f}  shape {result['accuracy']['shape']:.3f}  "
        f"quadrant {result['accuracy']['quadrant']:.3f}  PSNR {result['vae_psnr_heldout']:.2f} dB",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
