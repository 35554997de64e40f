"""Layer emergence under the Diffusion Lens: attribute accuracy of lens images per layer.

For held-out shapes-world captions (``shapes.sample(N, seed, split="heldout")``: combinations of
shape, colour, size and quadrant never seen in training), generates one lens image per
(caption, text-encoder layer, seed) and reads colour, shape and quadrant back with
``diffprobe.data.attributes.read_attributes`` against the true factors
(``diffprobe.lens.emergence``). The last layer is the normal generation.

    .venv/bin/python benchmarks/lens_emergence.py tiny --captions 64
    .venv/bin/python benchmarks/lens_emergence.py runs/tiny-train/pipeline --captions 256 --seeds 0,1

Writes ``lens_emergence.csv`` (layer, attribute, accuracy, chance), ``lens_emergence.png``
(accuracy against layer, one line per attribute) and ``lens_emergence.json`` into ``--out``, and
prints the JSON on stdout. ``reader_ceiling`` is the accuracy of the reader on the true rendered
images of the same captions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace(" ", "").split(",") if v]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="tiny", help="alias or pipeline folder")
    parser.add_argument("--captions", type=int, default=64, help="held-out captions")
    parser.add_argument("--caption-seed", type=int, default=0)
    parser.add_argument("--seeds", default="0", help="generation seeds, e.g. 0,1")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--pad", default="keep", choices=["keep", "full"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/lens_emergence"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffprobe
    from diffprobe.data import shapes
    from diffprobe.data.attributes import attribute_accuracy
    from diffprobe.lens import emergence, plot_emergence

    sample = shapes.sample(args.captions, seed=args.caption_seed, split="heldout")
    model = diffprobe.load(args.model, dtype=args.dtype, device=args.device)
    result = emergence(
        model, sample.captions, sample.factors, layers=args.layers, seeds=_ints(args.seeds),
        steps=args.steps, guidance_scale=args.guidance, encoder=args.encoder, padding=args.pad,
        batch_size=args.batch_size, progress=not args.quiet,
    )  # fmt: skip
    ceiling = attribute_accuracy(sample.images, sample.factors)
    summary = result.as_dict()
    summary.update(
        captions=args.captions, caption_seed=args.caption_seed, split="heldout",
        reader_ceiling={name: round(ceiling[name], 4) for name in result.accuracy},
    )  # fmt: skip

    result.write_csv(args.out / "lens_emergence.csv")
    plot_emergence(result, args.out / "lens_emergence.png",
                   title=f"Diffusion Lens on {model.name or args.model}: {result.items} images")  # fmt: skip
    text = json.dumps(summary, indent=2)
    temporary = args.out / ".lens_emergence.json.tmp"
    temporary.write_text(text + "\n")
    temporary.replace(args.out / "lens_emergence.json")
    print(text)
    last = {name: float(values[-1]) for name, values in result.accuracy.items()}
    first = {name: float(values[0]) for name, values in result.accuracy.items()}
    print(
        "layer "
        + f"{result.layers[0]}: "
        + "  ".join(f"{k} {v:.3f}" for k, v in first.items())
        + f"   layer {result.layers[-1]}: "
        + "  ".join(f"{k} {v:.3f}" for k, v in last.items()),
        file=sys.stderr,
    )
    return summary


if __name__ == "__main__":
    main()
