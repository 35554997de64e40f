"""Speed of the vectorised odd-one-out accuracy at THINGS scale.

4.7 M triplets over 1854 concepts (the size of the THINGS triplet data), random features. Times
``ooo_accuracy`` for each similarity, split into the similarity matrix and the triplet scoring,
and compares with a per-triplet Python loop on a subset in the same process (extrapolated), so
the ratio does not depend on the machine.

    .venv/bin/python benchmarks/ooo_speed.py                   # 1854 concepts, 4.7 M triplets
    .venv/bin/python benchmarks/ooo_speed.py --dims 64 --triplets 1000000

Prints one line per measurement and a JSON object at the end on stdout.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from diffprobe.analysis.alignment import SIMILARITIES, ooo_accuracy, ooo_correct, similarity_matrix


def random_triplets(n_concepts: int, n_triplets: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    triplets = np.empty((n_triplets, 3), dtype=np.int64)
    for column in range(3):
        triplets[:, column] = rng.integers(n_concepts, size=n_triplets)
    # Re-draw rows that repeat a concept (about 0.2 % of them).
    while True:
        bad = (
            (triplets[:, 0] == triplets[:, 1])
            | (triplets[:, 0] == triplets[:, 2])
            | (triplets[:, 1] == triplets[:, 2])
        )
        if not bad.any():
            return triplets
        triplets[bad] = rng.integers(n_concepts, size=(int(bad.sum()), 3))


def loop_accuracy(features: np.ndarray, triplets: np.ndarray) -> float:
    """The brute-force reference: cosine similarities per triplet in Python."""
    correct = 0
    norms = np.linalg.norm(features, axis=1)
    for a, b, c in triplets.tolist():
        ab = features[a] @ features[b] / (norms[a] * norms[b])
        ac = features[a] @ features[c] / (norms[a] * norms[c])
        bc = features[b] @ features[c] / (norms[b] * norms[c])
        correct += ab > ac and ab > bc
    return correct / len(triplets)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concepts", type=int, default=1854)
    parser.add_argument("--triplets", type=int, default=4_700_000)
    parser.add_argument("--dims", type=int, default=1280, help="feature dimensions per concept")
    parser.add_argument("--loop-triplets", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    features = rng.normal(size=(args.concepts, args.dims)).astype(np.float32)
    triplets = random_triplets(args.concepts, args.triplets, args.seed)
    ooo_accuracy(features[:50], triplets[:10] % 50)  # warm-up (imports, BLAS threads)

    results: dict[str, float] = {}
    for metric in SIMILARITIES:
        start = time.perf_counter()
        accuracy = ooo_accuracy(features, triplets, metric)
        total = time.perf_counter() - start
        results[f"{metric}_seconds"] = total
        print(
            f"ooo_accuracy {metric:<9} {args.triplets:,} triplets, {args.concepts} concepts, "
            f"{args.dims} dims: {total:.2f} s (accuracy {accuracy:.4f})"
        )

    start = time.perf_counter()
    similarity = similarity_matrix(features, "cosine")
    matrix_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ooo_correct(similarity, triplets)
    scoring_seconds = time.perf_counter() - start
    print(f"  of which similarity matrix {matrix_seconds:.2f} s, scoring {scoring_seconds:.2f} s")

    subset = triplets[: args.loop_triplets]
    start = time.perf_counter()
    reference = loop_accuracy(features.astype(np.float64), subset)
    loop_seconds = (time.perf_counter() - start) * len(triplets) / len(subset)
    vectorised = ooo_accuracy(features, subset)
    assert abs(reference - vectorised) < 1e-9, (reference, vectorised)
    speedup = loop_seconds / results["cosine_seconds"]
    print(
        f"Python loop (extrapolated from {len(subset):,} triplets): {loop_seconds:.1f} s; "
        f"vectorised is {speedup:.0f}x faster"
    )
    results.update(
        matrix_seconds=matrix_seconds,
        scoring_seconds=scoring_seconds,
        loop_seconds_extrapolated=loop_seconds,
        speedup=speedup,
        concepts=args.concepts,
        triplets=args.triplets,
        dims=args.dims,
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
