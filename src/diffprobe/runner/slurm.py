"""SLURM: ``--executor slurm`` submits through ``submitit`` (job arrays, one task per shard,
logs in ``RUN/slurm``, requeue-safe) and ``--emit-sbatch`` writes plain sbatch scripts.

Both run the same three kinds of job, each a ``diffprobe run`` command line:
- a phase job, ``diffprobe run SPEC --out RUN --phase unsharded``: the stages up to the next
  sharded stage still to do;
- an array of n tasks, task i running ``diffprobe run SPEC --out RUN --shard i/n``: shard i of
  every sharded stage whose inputs are done (an extraction fills every n-th chunk);
- the coordinator (this process for ``--executor slurm``, ``finish.sbatch`` for the scripts)
  marks a sharded stage done when all n shard markers carry its hash.

A task that is preempted or requeued runs its command again, which skips the finished chunks
(the store's chunk markers): nothing is lost but the chunk in flight. Whether a job succeeded is
read from the run's markers, not from SLURM's accounting (which small clusters often lack).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from diffprobe.errors import DiffprobeError
from diffprobe.io import claim_output, write_text
from diffprobe.runner.execute import Options, plan_run, prepare
from diffprobe.runner.plan import EXPERIMENT_KIND, MARKERS, RUN_JSON, SPEC_COPY, RunFolder
from diffprobe.runner.spec import ExperimentSpec

SLURM_FOLDER = "slurm"


class ClusterError(DiffprobeError):
    pass


@dataclass
class Cluster:
    shards: int = 2
    partition: str | None = None
    gpus_per_task: int | None = None
    time: int = 60
    """Minutes per job."""
    array_parallelism: int = 64
    cpus_per_task: int | None = None


def check_slurm(option: str = "--executor slurm") -> None:
    missing = [c for c in ("sbatch", "squeue", "scancel") if shutil.which(c) is None]
    if missing:
        raise ClusterError(
            f"{option}: SLURM is not installed here ({', '.join(missing)} not on PATH); run "
            "on a cluster's login node, use --executor local, or --emit-sbatch to write the "
            "scripts for a cluster"
        )
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ClusterError(f"{option} needs the submitit package: pip install submitit") from None


def _claim(spec: ExperimentSpec, root: Path) -> Path:
    claim_output(root, EXPERIMENT_KIND, entries=(RUN_JSON, MARKERS, SPEC_COPY, SLURM_FOLDER))
    folder = root / SLURM_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _command(spec: ExperimentSpec, root: Path, *extra: str) -> list[str]:
    return ["run", str(spec.path.resolve()), "--out", str(root.resolve()), *extra, "--quiet"]


class RunCommand:
    """What each SLURM task runs (submitit pickles this object and its arguments: plain
    strings; it never loads a user's file): ``python -m diffprobe ARGS``. ``checkpoint`` lets
    submitit requeue a preempted task with the same command, which resumes."""

    def __call__(self, argv: list[str]) -> int:
        done = subprocess.run([sys.executable, "-m", "diffprobe", *argv])
        if done.returncode:
            raise RuntimeError(f"diffprobe {' '.join(argv)} exited with {done.returncode}")
        return 0

    def checkpoint(self, argv: list[str]):
        import submitit

        return submitit.helpers.DelayedSubmission(self, argv)


def _executor(folder: Path, cluster: Cluster, name: str):
    import submitit

    executor = submitit.SlurmExecutor(folder=folder / "%j")
    parameters = {"time": cluster.time, "array_parallelism": cluster.array_parallelism,
                  "job_name": f"diffprobe-{name}", "ntasks_per_node": 1}  # fmt: skip
    for key in ("partition", "gpus_per_task", "cpus_per_task"):
        if getattr(cluster, key) is not None:
            parameters[key] = getattr(cluster, key)
    executor.update_parameters(**parameters)
    return executor


def _wait(job_id: str, poll: float = 1.0) -> None:
    """Until SLURM no longer lists the job (or array): squeue, not sacct, which needs the
    accounting database small clusters lack."""
    while True:
        listed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True,
                                text=True)  # fmt: skip
        if listed.returncode == 0 and not listed.stdout.strip():
            return
        if listed.returncode != 0 and "Invalid job id" in listed.stderr:
            return
        time.sleep(poll)


def run_slurm(spec: ExperimentSpec, root: Path, options: Options, cluster: Cluster) -> list:
    """Drive the run through SLURM from this process (a login node): phase jobs and shard
    arrays until every stage is done. Returns the plan."""
    check_slurm()
    logs = _claim(spec, root)
    prepare(spec, root, plan_run(spec, root, options.force_from), "slurm")
    folder = RunFolder(root)
    while True:
        plan = plan_run(spec, root)
        pending = [s for s in plan if s.status != "done"]
        if not pending:
            break
        finished = {s.name for s in plan if s.status == "done"}
        first = pending[0]
        executor = _executor(logs, cluster, spec.name)
        if first.kind.sharded and all(d in finished for d in first.depends_on):
            ready = [s for s in pending if s.kind.sharded
                     and all(d in finished for d in s.depends_on)]  # fmt: skip
            n = cluster.shards
            argvs = [_command(spec, root, "--shard", f"{i}/{n}") for i in range(n)]
            jobs = executor.map_array(RunCommand(), argvs)
            print(f"submitted array {jobs[0].job_id.split('_')[0]} ({n} tasks: "
                  f"{', '.join(s.name for s in ready)}); logs in {logs}", flush=True)  # fmt: skip
            _wait(jobs[0].job_id.split("_")[0])
            for stage in ready:
                if folder.complete_shards(stage) is None:
                    missing = [i for i in range(n) if i not in
                               folder.shard_markers(stage.name, stage.hash).get(n, [])]  # fmt: skip
                    logs_of = ", ".join(str(jobs[i].paths.stderr) for i in missing)
                    raise ClusterError(
                        f"stage {stage.name}: array tasks {missing} did not finish (cancelled, "
                        f"failed or out of time; logs: {logs_of}); run the same command again: "
                        "it resumes from the finished chunks"
                    )
                folder.mark_done(stage, {"executor": "slurm"})
        else:
            job = executor.submit(RunCommand(), _command(spec, root, "--phase", "unsharded"))
            print(f"submitted job {job.job_id} (stages from {first.name}); logs in {logs}",
                  flush=True)  # fmt: skip
            _wait(job.job_id)
            if RunFolder(root).status(first) != "done":
                raise ClusterError(
                    f"stage {first.name}: the SLURM job {job.job_id} did not finish it (log: "
                    f"{job.paths.stderr}); fix the cause and run the same command again"
                )
        folder.write_provenance(spec, plan_run(spec, root))
    return plan_run(spec, root)


def emit_sbatch(spec: ExperimentSpec, root: Path, options: Options, cluster: Cluster) -> Path:
    """Write ``prepare.sbatch``, ``shards.sbatch`` (an array of ``cluster.shards`` tasks),
    ``finish.sbatch`` and ``submit.sh`` (submits the three with afterok dependencies) into
    ``RUN/slurm``; claims the run folder and clears stale stages now. Returns the folder."""
    logs = _claim(spec, root)
    prepare(spec, root, plan_run(spec, root, options.force_from), "sbatch")
    python = shlex.quote(sys.executable)
    n = cluster.shards

    def script(name: str, argv: list[str], array: bool) -> str:
        lines = ["#!/bin/bash", f"#SBATCH --job-name=diffprobe-{spec.name}-{name}",
                 f"#SBATCH --time={cluster.time}", "#SBATCH --ntasks=1",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append"]  # fmt: skip
        out = "%A_%a" if array else "%j"
        lines.append(f"#SBATCH --output={logs.resolve()}/{name}-{out}.out")
        if array:
            lines.append(f"#SBATCH --array=0-{n - 1}%{cluster.array_parallelism}")
        if cluster.partition:
            lines.append(f"#SBATCH --partition={cluster.partition}")
        if cluster.gpus_per_task:
            lines.append(f"#SBATCH --gpus-per-task={cluster.gpus_per_task}")
        if cluster.cpus_per_task:
            lines.append(f"#SBATCH --cpus-per-task={cluster.cpus_per_task}")
        lines += ["# a requeued task runs the same command again: it resumes its shard",
                  "set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}",
                  f"exec {python} -m diffprobe {shlex.join(argv)}"]  # fmt: skip
        return "\n".join(lines) + "\n"

    shard_argv = _command(spec, root, "--shard", f"SHARD/{n}")
    shards = script("shards", shard_argv, True).replace("SHARD/", "${SLURM_ARRAY_TASK_ID}/")
    write_text(logs / "prepare.sbatch", script("prepare", _command(spec, root, "--phase",
                                                                   "unsharded"), False))  # fmt: skip
    write_text(logs / "shards.sbatch", shards)
    write_text(logs / "finish.sbatch", script("finish", _command(spec, root), False))
    write_text(logs / "submit.sh", "\n".join([
        "#!/bin/bash", "# prepare (stages before the sharded ones) -> the shard array -> finish",
        "set -euo pipefail", 'cd "$(dirname "$0")"',
        "prepare=$(sbatch --parsable prepare.sbatch)",
        "shards=$(sbatch --parsable --dependency=afterok:$prepare shards.sbatch)",
        "finish=$(sbatch --parsable --dependency=afterok:$shards finish.sbatch)",
        'echo "submitted prepare $prepare, shards $shards, finish $finish"', ""]))  # fmt: skip
    (logs / "submit.sh").chmod(0o755)
    return logs
