"""diffprobe's defaults against the originals' protocols on the shapes world with `tiny`
(issue 17): zero-shot OOO accuracy per site and noise level under

- the default extraction (t = round(p·T), VAE mean, noise per item) scored on test triplets with
  the strict tie rule, and
- ``--protocol alignment-paper`` (img2img with 100 steps, VAE posterior sample, one noise tensor
  from seed 42) scored on train + test with gLocal's tie rule,

and the probed accuracy of diffprobe's default probe next to gLocal's (``--probe glocal``, λ
swept) on one site.

    PYTHONPATH=src python benchmarks/alignment_fidelity.py [--concepts-images 1] [--epochs 30]

CPU; a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import diffprobe
from diffprobe.analysis import probing
from diffprobe.analysis.alignment import concept_means, ooo_accuracy
from diffprobe.data.sources import open_source
from diffprobe.data.things import load_things
from diffprobe.data.things_export import export_things
from diffprobe.extract import ExtractionPlan
from diffprobe.extract.engine import extract_arrays

SITES = ["unet.down_blocks.1", "unet.mid_block", "unet.up_blocks.1"]
NOISE = [0.05, 0.2, 0.5]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images-per-concept", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    root = export_things(Path(tempfile.mkdtemp()) / "things",
                         images_per_concept=args.images_per_concept, n_train=4000, n_test=1000,
                         n_repeat_triplets=50, repeats=10, seed=0)  # fmt: skip
    things = load_things(root)
    source = open_source(root)
    concepts = things.item_concepts(source.manifest())
    model = diffprobe.load("tiny")
    test, every = things.get_triplets("test"), things.get_triplets("all")
    print(f"shapes world: {things.n_concepts} concepts, ceiling {things.ceiling:.3f}")
    print(f"{'site':<20} {'p':>5} {'default t':>9} {'default':>8} {'paper t':>7} {'paper':>8}")
    features = {}
    for protocol in ("default", "alignment-paper"):
        plan = ExtractionPlan(sites=SITES, noise_levels=NOISE, protocol=protocol,
                              seed=42 if protocol != "default" else 0)  # fmt: skip
        arrays = extract_arrays(model, source, plan, batch_size=16)
        for (site, key, _), values in arrays.items():
            features[(protocol, site, key)] = concept_means(values, concepts, things.n_concepts)[0]
    from diffprobe.extract.plan import img2img_timestep

    for site in SITES:
        for p in NOISE:
            key = f"p{p:g}"
            default = ooo_accuracy(features[("default", site, key)], test)
            paper = ooo_accuracy(features[("alignment-paper", site, key)], every, ties="glocal")
            print(
                f"{site:<20} {p:>5} {model.timestep_for(p):>9.0f} {default:>8.3f} "
                f"{img2img_timestep(model, p):>7.0f} {paper:>8.3f}"
            )
    values = features[("default", "unet.mid_block", "p0.2")]
    train = things.get_triplets("train")
    for method, options in (("default", {"max_epochs": 150}),
                            ("glocal", {"max_epochs": args.epochs})):  # fmt: skip
        result = probing.probe(values, train, folds=3, method=method, **options)
        print(
            f"probe {method:<8} unet.mid_block p0.2: zero-shot {result.zero_shot_mean:.3f} "
            f"-> probed {result.probed_mean:.3f} ± {result.probed_std:.3f}"
            + (f" (λ {[r['lambda'] for r in result.rows]})" if method == "glocal" else "")
        )
    assert np.isfinite(values).all()


if __name__ == "__main__":
    main()
