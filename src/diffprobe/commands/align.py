"""``diffprobe align | probe | regress``: human alignment of a run on THINGS odd-one-out triplets
(docs/alignment.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.")]
ThingsRoot = Annotated[
    Path, typer.Option("--things", help="THINGS root (things_concepts.tsv, images/, triplets/)")
]
Sites = Annotated[list[str] | None, typer.Option("--sites", help="sites of the run (default: all)")]
Noise = Annotated[
    list[str] | None, typer.Option("--noise", help="noise keys, e.g. p0.1 (default: all)")
]
Conditions = Annotated[
    list[str] | None, typer.Option("--condition", help="stored conditions (default: all)")
]
Reduce = Annotated[
    str, typer.Option("--reduce", help="for runs with pooling none: mean | max | flatten | pca-K")
]


def _concept_features(opened, data, sites, noise, condition, reduce, triplets, quiet):
    """Concept-averaged features of the selected arrays, the concepts they cover, and the
    chosen triplets restricted to those concepts (shared by ``probe`` and ``regress``)."""
    from diffprobe.analysis.alignment import load_concept_features, restrict_triplets

    features, covered = load_concept_features(
        opened,
        data,
        sites=_names(sites),
        noises=_names(noise),
        conditions=_names(condition),
        reduction=reduce,
        progress=not quiet,
    )
    return features, covered, restrict_triplets(data.get_triplets(triplets), covered)


def _names(entries: list[str] | None) -> list[str] | None:
    """Repeated and comma / space separated values as one list."""
    if not entries:
        return None
    return [v for entry in entries for v in entry.replace(",", " ").split() if v]


def _slug(*parts: str) -> str:
    return "__".join(p.replace("/", "_").replace(":", "~") for p in parts)


def register(app: typer.Typer) -> None:
    @app.command()
    def align(
        runs: Annotated[
            list[Path],
            typer.Argument(help="run folder(s) written by `diffprobe extract` over a THINGS root"),
        ],
        things: ThingsRoot,
        out: Annotated[
            Path | None, typer.Option(help="output folder (default: RUN/alignment)")
        ] = None,
        triplets: Annotated[
            str,
            typer.Option(
                help="test | train | all | a triplet file (N×3, column 2 the odd one out)"
            ),
        ] = "test",
        metric: Annotated[
            list[str] | None,
            typer.Option("--metric", help="cosine | euclidean | dot (repeat or comma-separate)"),
        ] = None,
        pca: Annotated[
            int | None,
            typer.Option(help="project concept features on K principal components first"),
        ] = None,
        reduce: Annotated[
            str | None,
            typer.Option(
                "--reduce", help="for runs with pooling none: mean,max,flatten,pca-K (default mean)"
            ),
        ] = None,
        sites: Sites = None,
        noise: Noise = None,
        condition: Conditions = None,
        ceiling: Annotated[
            float | None, typer.Option(help="noise ceiling (default: from the THINGS root)")
        ] = None,
        cka: Annotated[
            bool, typer.Option(help="linear CKA between all feature sets (cka.csv, heatmap)")
        ] = True,
        as_json: Annotated[bool, typer.Option("--json", help="print the rows as JSON")] = False,
        quiet: Quiet = False,
    ) -> None:
        """Odd-one-out accuracy, normalised score and RSA per site × noise level × condition of
        RUN on THINGS triplets: alignment.csv, accuracy heatmap, accuracy against noise, CKA."""
        from diffprobe.analysis.alignment import align_run, summary_table, write_outputs
        from diffprobe.cli import _setup
        from diffprobe.data.things import load_things
        from diffprobe.extract.store import open_run

        _setup(quiet)
        opened = [open_run(r) for r in runs]
        data = load_things(things)
        result = align_run(
            opened,
            data,
            triplets=triplets,
            metrics=_names(metric) or ["cosine"],
            pca=pca,
            reductions=_names([reduce]) if reduce else None,
            sites=_names(sites),
            noises=_names(noise),
            conditions=_names(condition),
            ceiling=ceiling,
            progress=not quiet,
        )
        target = out or opened[0].root / "alignment"
        paths = write_outputs(result, target, cka=cka)
        if as_json:
            typer.echo(json.dumps(result.rows, indent=1, default=float))
        else:
            typer.echo(summary_table(result.rows))
            typer.echo(
                f"{len(result.triplets)} triplets over {int(result.covered.sum())} concepts; "
                f"ceiling {data.ceiling if ceiling is None else ceiling}"
            )
        typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}", err=True)

    @app.command()
    def probe(
        run: Annotated[
            Path,
            typer.Argument(help="run folder written by `diffprobe extract` over a THINGS root"),
        ],
        things: ThingsRoot,
        out: Annotated[Path | None, typer.Option(help="output folder (default: RUN/probe)")] = None,
        triplets: Annotated[
            str, typer.Option(help="train | test | all | a triplet file")
        ] = "train",
        sites: Sites = None,
        noise: Noise = None,
        condition: Conditions = None,
        reduce: Reduce = "mean",
        folds: Annotated[int, typer.Option(help="folds over objects")] = 3,
        lam: Annotated[float, typer.Option("--lambda", help="regularisation strength")] = 1e-3,
        regulariser: Annotated[
            str, typer.Option(help="frobenius | identity (pull towards a scaled identity)")
        ] = "frobenius",
        pca: Annotated[
            int | None,
            typer.Option(help="probe on K principal components of the standardised features"),
        ] = None,
        lr: Annotated[float, typer.Option(help="Adam learning rate")] = 1e-2,
        max_epochs: int = 500,
        patience: Annotated[
            int, typer.Option(help="epochs without a better validation loss before stopping")
        ] = 50,
        batch_size: Annotated[
            int | None, typer.Option(help="triplets per step (default: full batch)")
        ] = None,
        val_fraction: Annotated[
            float, typer.Option(help="fraction of training concepts for early stopping")
        ] = 0.25,
        seed: int = 0,
        quiet: Quiet = False,
    ) -> None:
        """Linear probing (triplet cross-entropy, K-fold over objects) per site × noise level ×
        condition: probe.csv (per fold), probe_summary.csv (mean ± std) and transforms
        (.npz: weights, bias, mean, std) per fold and fitted on all concepts."""
        import sys

        import numpy as np
        from tqdm.auto import tqdm

        from diffprobe.analysis.alignment import write_csv
        from diffprobe.analysis.probing import fit_probe_all
        from diffprobe.analysis.probing import probe as run_probe
        from diffprobe.cli import _setup
        from diffprobe.data.things import load_things
        from diffprobe.extract.store import open_run

        _setup(quiet)
        opened = open_run(run)
        data = load_things(things)
        features, covered, used = _concept_features(
            opened, data, sites, noise, condition, reduce, triplets, quiet
        )
        target = out or opened.root / "probe"
        options = dict(
            lam=lam,
            regulariser=regulariser,
            pca=pca,
            lr=lr,
            max_epochs=max_epochs,
            patience=patience,
            batch_size=batch_size,
        )
        rows, summary = [], []
        for (site, noise_key, cond), values in tqdm(
            features.items(), desc="probe", unit="array", disable=quiet, file=sys.stderr
        ):
            result = run_probe(
                values, used, folds=folds, val_fraction=val_fraction, seed=seed, **options
            )
            folder = target / "transforms" / _slug(site, noise_key, cond)
            for fold, transform in enumerate(result.transforms):
                transform.save(folder / f"fold{fold}.npz")
            final, _ = fit_probe_all(values, used, val_fraction=val_fraction, seed=seed, **options)
            final.save(folder / "transform.npz")
            base = {"site": site, "noise": noise_key, "condition": cond, "reduction": reduce}
            rows += [{**base, **row} for row in result.rows]
            summary.append(
                {
                    **base,
                    "zero_shot_mean": result.zero_shot_mean,
                    "zero_shot_std": result.zero_shot_std,
                    "probed_mean": result.probed_mean,
                    "probed_std": result.probed_std,
                    "folds": folds,
                    "lambda": lam,
                    "regulariser": regulariser,
                    "transform": str(folder / "transform.npz"),
                }
            )
            typer.echo(
                f"{site} {noise_key} {cond}: zero-shot {result.zero_shot_mean:.3f} ± "
                f"{result.zero_shot_std:.3f} -> probed {result.probed_mean:.3f} ± "
                f"{result.probed_std:.3f}"
            )
        write_csv(rows, target / "probe.csv")
        write_csv(summary, target / "probe_summary.csv")
        typer.echo(
            f"wrote {target / 'probe.csv'}, {target / 'probe_summary.csv'} and "
            f"{target / 'transforms'} ({int(np.sum(covered))} concepts, {len(used)} triplets)",
            err=True,
        )

    @app.command()
    def regress(
        run: Annotated[
            Path,
            typer.Argument(help="run folder written by `diffprobe extract` over a THINGS root"),
        ],
        things: ThingsRoot,
        target_embedding: Annotated[
            str,
            typer.Option(
                "--target",
                help="embedding file (.npy or text, concepts × dims) or 'shapes-factors'",
            ),
        ],
        out: Annotated[
            Path | None, typer.Option(help="output folder (default: RUN/regress)")
        ] = None,
        triplets: Annotated[
            str,
            typer.Option(
                help="triplets scoring the predicted embedding: test | train | all | a file"
            ),
        ] = "test",
        sites: Sites = None,
        noise: Noise = None,
        condition: Conditions = None,
        reduce: Reduce = "mean",
        folds: Annotated[int, typer.Option(help="folds over objects")] = 5,
        metric: Annotated[
            str,
            typer.Option(help="similarity of the predicted embedding: cosine | euclidean | dot"),
        ] = "cosine",
        seed: int = 0,
        quiet: Quiet = False,
    ) -> None:
        """Ridge regression from features to a target embedding (K-fold over objects) per site ×
        noise level × condition: R² and the odd-one-out accuracy of the prediction
        (regression.csv per fold, regression_summary.csv)."""
        import numpy as np

        from diffprobe.analysis.alignment import write_csv
        from diffprobe.analysis.probing import regress as run_regress
        from diffprobe.cli import _setup
        from diffprobe.data.things import (
            SHAPES_FACTOR_NAMES,
            load_things,
            read_embedding,
            shapes_factor_embedding,
        )
        from diffprobe.extract.store import open_run

        _setup(quiet)
        opened = open_run(run)
        data = load_things(things)
        names = None
        if target_embedding == "shapes-factors":
            embedding, names = shapes_factor_embedding(data.concepts), SHAPES_FACTOR_NAMES
        else:
            embedding = read_embedding(target_embedding, data.n_concepts)
        features, covered, used = _concept_features(
            opened, data, sites, noise, condition, reduce, triplets, quiet
        )
        target = out or opened.root / "regress"
        rows, summary = [], []
        for (site, noise_key, cond), values in features.items():
            result = run_regress(
                values,
                embedding[covered],
                folds=folds,
                triplets=used,
                metric=metric,
                target_names=names,
                seed=seed,
            )
            base = {"site": site, "noise": noise_key, "condition": cond, "reduction": reduce}
            rows += [{**base, **row} for row in result.rows]
            target_ooo = float(np.nanmean([r["target_ooo"] for r in result.rows]))
            summary.append(
                {
                    **base,
                    "r2_mean": result.r2_mean,
                    "r2_std": result.r2_std,
                    "ooo_mean": result.ooo_mean,
                    "target_ooo_mean": target_ooo,
                    "folds": folds,
                    "metric": metric,
                    **{f"r2_{k}_mean": v for k, v in result.r2_by_target.items()},
                }
            )
            typer.echo(
                f"{site} {noise_key} {cond}: R² {result.r2_mean:.3f} ± {result.r2_std:.3f}, "
                f"OOO of the prediction {result.ooo_mean:.3f} (target itself {target_ooo:.3f})"
            )
        write_csv(rows, target / "regression.csv")
        write_csv(summary, target / "regression_summary.csv")
        typer.echo(
            f"wrote {target / 'regression.csv'} and {target / 'regression_summary.csv'}", err=True
        )
