"""``diffprobe anomalies RUN``: positional information, corner artifacts, high-norm tokens and
similarity maps of a run extracted with ``--pooling none`` (docs/anomalies.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import Quiet, setup


def _numbers(text: str, what: str, kind=float) -> list:
    from diffprobe.analysis.anomalies import AnomalyError

    try:
        return [kind(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise AnomalyError(f"{what} {text!r}: expected comma-separated numbers") from None


def register(app: typer.Typer) -> None:
    @app.command()
    def anomalies(
        run: Annotated[
            Path, typer.Argument(help="run folder written by `diffprobe extract --pooling none`")
        ],
        out: Annotated[
            Path | None, typer.Option(help="output folder (default: RUN/anomalies)")
        ] = None,
        sites: Annotated[
            list[str] | None, typer.Option("--sites", help="sites of the run (default: all)")
        ] = None,
        noise: Annotated[
            list[str] | None, typer.Option(help="noise keys, e.g. p0.2 (default: all)")
        ] = None,
        condition: Annotated[
            list[str] | None, typer.Option(help="stored conditions (default: all)")
        ] = None,
        grid: Annotated[
            str | None, typer.Option(help="HxW of transformer token sequences (default: square)")
        ] = None,
        binnings: Annotated[
            str, typer.Option(help="probe binnings below the grid size; exact is always added")
        ] = "2,4,8,16,32",
        test_fraction: Annotated[
            float, typer.Option(help="fraction of images the probes are scored on")
        ] = 0.5,
        threshold: Annotated[
            float, typer.Option(help="anomaly score above which a group is detected")
        ] = 2.0,
        group: Annotated[int, typer.Option(help="token group side (2: 2x2 groups)")] = 2,
        reference: Annotated[
            str, typer.Option(help="norm reference of a map: mean | median")
        ] = "mean",
        corner: Annotated[
            bool, typer.Option(help="corner ratio (extracts the cropped images with the model)")
        ] = True,
        corner_size: Annotated[int, typer.Option(help="corner side in tokens")] = 1,
        model: Annotated[
            str | None, typer.Option(help="model for the cropped images (default: the run's)")
        ] = None,
        device: str = "cpu",
        dtype: Annotated[str | None, typer.Option(help="default: the run's")] = None,
        batch_size: int = 16,
        labels: Annotated[
            Path | None, typer.Option(help="folder of label JSON files, or a label table .npz")
        ] = None,
        tolerance: Annotated[
            int, typer.Option(help="label matching: max(|dy|,|dx|) <= tolerance tokens")
        ] = 1,
        query: Annotated[
            str, typer.Option(help="similarity query token as row,col fractions of the grid")
        ] = "0.5,0.5",
        query_item: Annotated[int, typer.Option(help="image of the query token")] = 0,
        plots: Annotated[bool, typer.Option(help="write PNG plots")] = True,
        show: Annotated[int, typer.Option(help="images per overlay plot")] = 4,
        seed: Annotated[int, typer.Option(help="probe train/test split seed")] = 0,
        paper: Annotated[
            bool,
            typer.Option(
                help="also the anomaly paper's own definitions: corner and border ratios with "
                "the crop not resized (token_group_ratios.csv), rel_norm at the labels across "
                "every site (rel_norm_at_labels.csv, with --labels)"
            ),
        ] = False,
        scale_window: Annotated[
            bool,
            typer.Option(
                help="high-norm window side max(1, int(group·H/label_grid)) per site, as the "
                "paper (default: group at every site)"
            ),
        ] = False,
        label_grid: Annotated[
            int | None,
            typer.Option(help="grid the labels are made on (default: image size / 16, 32 at 512)"),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
        quiet: Quiet = False,
    ) -> None:
        """Position probes, corner ratios, high-norm token groups and similarity maps of RUN:
        tables (CSV with the definitions as # comments), summary.json and plots in --out."""
        from diffprobe.extract.store import open_run
        from diffprobe.io import check_output
        from diffprobe.stages.anomalies import ANOMALIES_KIND, AnomalyConfig, analyse_run

        setup(quiet)
        config = AnomalyConfig(
            binnings=_numbers(binnings, "--binnings", int), test_fraction=test_fraction,
            threshold=threshold, group=group, reference=reference, corner=corner,
            corner_size=corner_size, tolerance=tolerance, query=_numbers(query, "--query"),
            query_item=query_item, show=show, seed=seed, paper=paper, scale_window=scale_window,
            label_grid=label_grid,
        )  # fmt: skip
        site_list = [s for entry in sites for s in entry.split()] if sites else None
        opened = open_run(run)
        target = out or opened.root / "anomalies"
        check_output(target, ANOMALIES_KIND)
        summary = analyse_run(
            opened, target, config, sites=site_list, noises=noise or None,
            conditions=condition or None, grid=grid, model=model, device=device, dtype=dtype,
            batch_size=batch_size, labels=labels, plots=plots, progress=not quiet,
        )  # fmt: skip
        if as_json:
            typer.echo(json.dumps(summary, indent=1, default=float))
            return
        from diffprobe.stages.anomalies import summary_lines

        for line in summary_lines(summary):
            typer.echo(line)
        for row in summary["label_comparison"]:
            typer.echo(
                f"labels {row['site']} {row['noise']} {row['condition']}: precision "
                f"{row['precision']:.2f}, recall {row['recall']:.2f} "
                f"({row['matched']} matched, {row['detections']} detections, {row['labels']} labels)"
            )
        typer.echo(str(target), err=True)
