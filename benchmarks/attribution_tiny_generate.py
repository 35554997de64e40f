"""Generate the maps that benchmarks/attribution_tiny.py scores, once, into a cache (npz).

For N shapes-world captions (train split, seed 0) `tiny` generates one image each (seed i, the
family's default guidance, STEPS DDIM steps) under diffprobe.stages.attribution.attribute_prompt
and keeps, per item, every prompt token's raw cross-attention maps (conditional branch, mean
over heads) at every site and denoiser call on the finest grid: float16
(items, tokens, layers, timesteps, rows, columns), NaN past the prompt's end token.

    PYTHONPATH=src python benchmarks/attribution_tiny_generate.py --items 256 --steps 10 \
        --out benchmarks/out/attribution_tiny_maps.npz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import diffprobe
from diffprobe.data import shapes
from diffprobe.stages.attribution import attribute_prompt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/out/attribution_tiny_maps.npz")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = diffprobe.load("tiny")
    sample = shapes.sample(args.items, seed=0, split="train")
    maps, images, pieces, specials = None, [], [], []
    started = time.perf_counter()
    for i in range(args.items):
        result = attribute_prompt(model, sample.captions[i], seed=i, steps=args.steps)
        if maps is None:
            tokens_max = model.pipe.tokenizer.model_max_length
            shape = (args.items, tokens_max, *result.maps.shape[1:])
            maps = np.full(shape, np.nan, dtype=np.float16)
            sites, noise_levels = result.sites, result.noise_levels
        maps[i, : len(result.tokens)] = result.maps.astype(np.float16)
        images.append(result.image)
        pieces.append([t.piece for t in result.tokens])
        specials.append([t.special for t in result.tokens])
        print(f"{i + 1}/{args.items} {sample.captions[i]!r}", file=sys.stderr, flush=True)
    meta = {
        "items": args.items,
        "steps": args.steps,
        "guidance_scale": model.default_guidance_scale,
        "seconds": time.perf_counter() - started,
        "sites": sites,
        "noise_levels": [float(p) for p in noise_levels],
        "captions": list(sample.captions),
        "pieces": pieces,
        "special": specials,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        maps=maps,
        images=np.stack(images),
        **{f"factor_{k}": np.asarray(v) for k, v in sample.factors.items()},
        meta=np.array(json.dumps(meta)),
    )


if __name__ == "__main__":
    main()
