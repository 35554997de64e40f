"""The one entry point the command line calls: check the options, then plan, dry-run or run."""

from __future__ import annotations

import os
import time
from pathlib import Path

from diffprobe.errors import DiffprobeError
from diffprobe.runner.execute import Options, plan_run, run_local, run_shard
from diffprobe.runner.plan import units
from diffprobe.runner.slurm import Cluster, check_slurm, emit_sbatch, run_slurm
from diffprobe.runner.spec import ExperimentSpec, load_spec

EXECUTORS = ("local", "slurm")


class RunError(DiffprobeError):
    pass


def default_out(spec: ExperimentSpec) -> Path:
    return Path(spec.out) if spec.out else Path("runs") / spec.name


def describe(spec: ExperimentSpec, root: Path, force_from: str | None = None) -> str:
    """The plan as a table: stage, kind, status, units of work, what it reads."""
    plan = plan_run(spec, root, force_from)
    rows = [("stage", "kind", "status", "units", "reads")]
    for s in plan:
        status = s.status
        if s.kind.sharded and s.shards_done and status != "done":
            status += (
                " (" + ", ".join(f"{len(i)}/{n} shards" for n, i in s.shards_done.items()) + ")"
            )
        rows.append((s.name, s.kind.name, status, units(spec, root, s),
                     ", ".join(s.depends_on) or "-"))  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = [f"plan of {spec.path} in {root}:"]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]  # fmt: skip
    todo = sum(s.status != "done" for s in plan)
    lines.append(f"{todo} of {len(plan)} stages to run")
    return "\n".join(lines)


def run(
    spec_path: str | Path,
    out: str | Path | None = None,
    *,
    dry_run: bool = False,
    force_from: str | None = None,
    executor: str = "local",
    shard: tuple[int, int] | None = None,
    phase: str | None = None,
    emit: bool = False,
    cluster: Cluster | None = None,
    cluster_options: tuple[str, ...] = (),
    progress: bool = True,
    echo=print,
) -> Path:
    """Run (or with ``dry_run`` describe) the spec at ``spec_path`` in the run folder ``out``
    (default: the spec's ``out:`` or ``runs/NAME``). Returns the run folder."""
    if executor not in EXECUTORS:
        raise RunError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)} "
                       "(for several GPUs of one node: torchrun --nproc_per_node N -m diffprobe "
                       "run SPEC)")  # fmt: skip
    if cluster_options and executor != "slurm" and not emit:
        raise RunError(f"{cluster_options[0]} applies to --executor slurm or --emit-sbatch; "
                       "add one of them or leave the option out")  # fmt: skip
    if executor == "slurm" and not dry_run and not emit:
        check_slurm()
    spec = load_spec(spec_path)
    root = Path(out) if out is not None else default_out(spec)
    if dry_run:
        echo(describe(spec, root, force_from))
        return root
    options = Options(executor=executor, force_from=force_from, progress=progress)
    if "SLURM_JOB_ID" in os.environ and executor == "local":
        options.executor = f"slurm job {os.environ['SLURM_JOB_ID']}"
    began = time.perf_counter()
    # measured before the run (and not written): what the closing line reports
    already = sum(s.status == "done" for s in plan_run(spec, root, force_from))
    if emit:
        folder = emit_sbatch(spec, root, options, cluster or Cluster())
        echo(f"wrote {folder}/prepare.sbatch, shards.sbatch, finish.sbatch; submit all three "
             f"with: bash {folder}/submit.sh")  # fmt: skip
        return root
    if shard is not None:
        ran = run_shard(spec, root, shard, options)
        echo(f"shard {shard[0]}/{shard[1]} of {', '.join(ran) or 'no ready sharded stage'} "
             f"in {root}")  # fmt: skip
        return root
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        options.executor = f"torchrun x{os.environ['WORLD_SIZE']}"
    if executor == "slurm":
        plan = run_slurm(spec, root, options, cluster or Cluster())
    else:
        plan = run_local(spec, root, options, stop_at_sharded=phase == "unsharded")
    if int(os.environ.get("RANK", "0")) == 0:
        echo(f"run {root}: {len(plan)} stages, {len(plan) - already} run now, {already} "
             f"already done; wall time {time.perf_counter() - began:.0f} s")  # fmt: skip
    return root
