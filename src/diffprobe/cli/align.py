"""``diffprobe align | probe | regress``: human alignment of a run on THINGS odd-one-out triplets
(docs/alignment.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import Quiet, names, setup

ThingsRoot = Annotated[
    Path,
    typer.Option(
        "--things",
        help="THINGS root (concepts/things_concepts.tsv or things_concepts.tsv, images/, "
        "triplets/)",
    ),
]
ALIGN_PROTOCOLS = {
    # zero-shot scoring of the alignment paper / gLocal: every triplet (train_90 + test_10),
    # gLocal's tie rule
    "alignment-paper": {"triplets": "all", "ties": "glocal"},
    "default": {"triplets": "test", "ties": "strict"},
}
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
            str | None,
            typer.Option(
                help="test | train | all | a triplet file (N×3, column 2 the odd one out); "
                "default test (all under --protocol alignment-paper)"
            ),
        ] = None,
        ties: Annotated[
            str | None,
            typer.Option(
                help="strict (any tie of the people's pair is wrong) | glocal (only all three "
                "equal is wrong); default strict (glocal under --protocol alignment-paper)"
            ),
        ] = None,
        protocol: Annotated[
            str,
            typer.Option(
                help="default | alignment-paper (the original's zero-shot scoring: all "
                "triplets, gLocal's tie rule)"
            ),
        ] = "default",
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
        from diffprobe.analysis.alignment import TIE_RULES, AlignmentError
        from diffprobe.data.things import load_things
        from diffprobe.extract.store import open_run
        from diffprobe.io import check_output
        from diffprobe.stages.align import ALIGN_KIND, align_run, summary_table, write_outputs

        setup(quiet)
        if protocol not in ALIGN_PROTOCOLS:
            raise AlignmentError(
                f"unknown --protocol {protocol!r}; expected one of {', '.join(ALIGN_PROTOCOLS)}"
            )
        chosen = ALIGN_PROTOCOLS[protocol]
        triplets = triplets or chosen["triplets"]
        ties = ties or chosen["ties"]
        if ties not in TIE_RULES:
            raise AlignmentError(f"--ties {ties!r}: expected one of {', '.join(TIE_RULES)}")
        opened = [open_run(r) for r in runs]
        target = out or opened[0].root / "alignment"
        check_output(target, ALIGN_KIND)
        data = load_things(things)
        result = align_run(
            opened,
            data,
            triplets=triplets,
            metrics=names(metric) or ["cosine"],
            pca=pca,
            reductions=names([reduce]) if reduce else None,
            sites=names(sites),
            noises=names(noise),
            conditions=names(condition),
            ceiling=ceiling,
            ties=ties,
            progress=not quiet,
        )
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
        method: Annotated[
            str,
            typer.Option(
                "--probe",
                help="default | glocal (gLocal's probe: global standardisation, W = 1e-3·I, "
                "unsquared Frobenius penalty, local contrastive term, λ sweep)",
            ),
        ] = "default",
        lam: Annotated[
            float | None,
            typer.Option(
                "--lambda",
                help="regularisation strength (default 1e-3; --probe glocal: sweep --lambdas)",
            ),
        ] = None,
        lambdas: Annotated[
            str,
            typer.Option(help="--probe glocal: λ values swept on the inner validation split"),
        ] = "1e-4,1e-3,1e-2,1e-1,1",
        alpha: Annotated[
            float, typer.Option(help="--probe glocal: weight of the local contrastive term")
        ] = 0.1,
        tau: Annotated[float, typer.Option(help="--probe glocal: contrastive temperature")] = 1.0,
        regulariser: Annotated[
            str, typer.Option(help="frobenius | identity (pull towards a scaled identity)")
        ] = "frobenius",
        pca: Annotated[
            int | None,
            typer.Option(help="probe on K principal components of the standardised features"),
        ] = None,
        lr: Annotated[
            float | None, typer.Option(help="Adam learning rate (default 1e-2; glocal 1e-3)")
        ] = None,
        max_epochs: Annotated[int | None, typer.Option(help="default 500; glocal 100")] = None,
        patience: Annotated[
            int | None,
            typer.Option(
                help="epochs without a better validation loss before stopping (default 50; "
                "glocal 15)"
            ),
        ] = None,
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
        from diffprobe.data.things import load_things
        from diffprobe.extract.store import open_run
        from diffprobe.stages.probing import probe_options, probe_run

        setup(quiet)
        options = probe_options(
            method, lam=lam, lambdas=lambdas, alpha=alpha, tau=tau, regulariser=regulariser,
            pca=pca, lr=lr, max_epochs=max_epochs, patience=patience, batch_size=batch_size,
        )  # fmt: skip
        opened = open_run(run)
        data = load_things(things)
        target = out or opened.root / "probe"
        result = probe_run(
            opened, data, target, triplets=triplets, sites=names(sites), noises=names(noise),
            conditions=names(condition), reduction=reduce, folds=folds,
            val_fraction=val_fraction, seed=seed, progress=not quiet, echo=typer.echo, **options,
        )  # fmt: skip
        typer.echo(
            f"wrote {target / 'probe.csv'}, {target / 'probe_summary.csv'} and "
            f"{target / 'transforms'} ({result['concepts']} concepts, {result['triplets']} "
            "triplets)",
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
        from diffprobe.data.things import load_things
        from diffprobe.extract.store import open_run
        from diffprobe.stages.probing import regress_run

        setup(quiet)
        opened = open_run(run)
        data = load_things(things)
        target = out or opened.root / "regress"
        regress_run(
            opened, data, target, target_embedding, triplets=triplets, sites=names(sites),
            noises=names(noise), conditions=names(condition), reduction=reduce, folds=folds,
            metric=metric, seed=seed, progress=not quiet, echo=typer.echo,
        )  # fmt: skip
        typer.echo(
            f"wrote {target / 'regression.csv'} and {target / 'regression_summary.csv'}", err=True
        )
