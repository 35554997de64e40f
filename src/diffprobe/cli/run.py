"""``diffprobe run SPEC.yaml``: every stage of an experiment spec, resumable, locally, under
torchrun or on SLURM (docs/runner.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import Quiet, setup


def run_command(
    spec: Annotated[Path, typer.Argument(help="experiment spec (YAML), e.g. examples/demo.yaml")],
    out: Annotated[
        Path | None, typer.Option(help="run folder (default: the spec's out: or runs/NAME)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the plan: stages, units, what is done")
    ] = False,
    from_stage: Annotated[
        str | None, typer.Option("--from", help="redo this stage and every stage after it")
    ] = None,
    executor: Annotated[str, typer.Option(help="local | slurm (torchrun: see docs)")] = "local",
    shards: Annotated[
        int, typer.Option(help="SLURM array tasks per sharded stage (--executor slurm)")
    ] = 2,
    shard: Annotated[
        str | None, typer.Option(help="i/n: only shard i of n of the ready sharded stages")
    ] = None,
    emit_sbatch: Annotated[
        bool, typer.Option("--emit-sbatch", help="write sbatch scripts into RUN/slurm")
    ] = False,
    slurm_partition: Annotated[str | None, typer.Option(help="SLURM partition")] = None,
    gpus_per_task: Annotated[int | None, typer.Option(help="GPUs per SLURM task")] = None,
    time: Annotated[int | None, typer.Option("--time", help="minutes per SLURM job")] = None,
    array_parallelism: Annotated[
        int | None, typer.Option(help="SLURM array tasks running at once")
    ] = None,
    phase: Annotated[str | None, typer.Option(hidden=True)] = None,
    quiet: Quiet = False,
) -> None:
    """Run every stage of SPEC into the run folder; a rerun skips what is done and redoes
    what its spec changed."""
    setup(quiet)
    from diffprobe.extract.plan import parse_shard
    from diffprobe.runner.api import RunError, run
    from diffprobe.runner.slurm import Cluster

    given = {"--slurm-partition": slurm_partition, "--gpus-per-task": gpus_per_task,
             "--time": time, "--array-parallelism": array_parallelism}  # fmt: skip
    cluster_options = tuple(k for k, v in given.items() if v is not None)
    if shards != 2 and executor != "slurm" and not emit_sbatch:
        cluster_options = ("--shards", *cluster_options)
    if shards < 1:
        raise RunError(f"--shards {shards}: at least 1 array task")
    if phase not in (None, "unsharded"):
        raise RunError(f"--phase {phase!r}: only 'unsharded'")
    cluster = Cluster(shards=shards, partition=slurm_partition, gpus_per_task=gpus_per_task,
                      time=time or 60, array_parallelism=array_parallelism or 64)  # fmt: skip
    run(spec, out, dry_run=dry_run, force_from=from_stage, executor=executor,
        shard=parse_shard(shard) if shard else None, phase=phase, emit=emit_sbatch,
        cluster=cluster, cluster_options=cluster_options, progress=not quiet,
        echo=typer.echo)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
