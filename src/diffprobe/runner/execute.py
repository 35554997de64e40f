"""Running a plan in this process: the local executor, one rank of ``torchrun``, one shard of a
SLURM array task, or one phase of a SLURM run (docs/runner.md).

One process (the coordinator: the local run, torchrun's rank 0, the SLURM driver's jobs) clears
stages whose spec part changed, writes the started and done markers and ``run.json``. Sharded
stages are split by ``shard = (i, n)``: each process fills its part and leaves a shard marker;
the stage is done when all n shard markers carry its hash.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from diffprobe.runner.plan import PlannedStage, RunFolder, context, order
from diffprobe.runner.spec import ExperimentSpec, SpecError

log = logging.getLogger(__name__)


@dataclass
class Options:
    executor: str = "local"
    force_from: str | None = None
    progress: bool = True


def plan_run(spec: ExperimentSpec, root: Path, force_from: str | None = None) -> list:
    """The ordered stages with their status in ``root``; ``force_from`` marks that stage and
    every stage after it stale."""
    plan = order(spec)
    folder = RunFolder(root)
    names = [s.name for s in plan]
    if force_from is not None and force_from not in names:
        from diffprobe.errors import did_you_mean

        close = did_you_mean(force_from, names)
        hint = f"did you mean '{close[0]}'?" if close else f"stages: {', '.join(names)}"
        raise SpecError(f"--from {force_from}: the spec has no such stage; {hint}")
    forced = names[names.index(force_from) :] if force_from else []
    for stage in plan:
        stage.status = "stale" if stage.name in forced else folder.status(stage)
        if stage.status not in ("done", "stale") and stage.kind.sharded:
            stage.shards_done = folder.shard_markers(stage.name, stage.hash)
    return plan


def _complete(stage: PlannedStage) -> bool:
    return any(sorted(i) == list(range(n)) for n, i in stage.shards_done.items())


def _ready(stage: PlannedStage, finished: set[str]) -> bool:
    return all(d in finished for d in stage.depends_on)


def prepare(spec: ExperimentSpec, root: Path, plan: list, executor: str) -> None:
    """Coordinator: claim the run folder; clear the stale stages."""
    folder = RunFolder(root)
    folder.claim(spec)
    for stage in plan:
        if stage.status == "stale":
            log.info("stage %s: its part of the spec changed (or --from): redone", stage.name)
            folder.clear(stage)
            stage.status = "todo"


class Barrier:
    """torchrun's process group (gloo) where there is one, else nothing to wait for."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.group = False
        if self.world > 1:
            import datetime

            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
            self.group = True

    def wait(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _call(spec, root, stage, options: Options, shard, models) -> tuple[dict, float]:
    ctx = context(spec, root, stage, shard=shard, progress=options.progress, models=models)
    began = time.perf_counter()
    result = stage.kind.function()(ctx, stage.params) or {}
    return result, round(time.perf_counter() - began, 3)


def run_local(spec: ExperimentSpec, root: Path, options: Options, *, stop_at_sharded=False):
    """Run every pending stage in order, in this process or as one rank of ``torchrun``
    (sharded stages split over the ranks; the others on rank 0 between barriers).
    ``stop_at_sharded``: stop before the first sharded stage still to do (a SLURM phase).
    Returns the plan."""
    barrier = Barrier()
    coordinator = barrier.rank == 0
    try:
        plan = plan_run(spec, root, options.force_from)
        if coordinator:
            prepare(spec, root, plan, options.executor)
        barrier.wait()
        folder, models, finished = RunFolder(root), {}, set()
        for stage in plan:
            if stage.status == "done":
                finished.add(stage.name)
                continue
            if stage.kind.sharded:
                # decided from the plan, read before the first barrier: every rank decides alike
                complete = _complete(stage)
                if stop_at_sharded and not complete:
                    break
                if not complete:
                    if coordinator:
                        folder.mark_started(stage, options.executor)
                    shard = (barrier.rank, barrier.world)
                    print(f"== stage {stage.name} ({stage.kind.name}, shard {shard[0]}/"
                          f"{shard[1]}) ==", flush=True)  # fmt: skip
                    result, seconds = _call(spec, root, stage, options, shard, models)
                    folder.mark_shard(stage, shard, {"seconds": seconds, "result": result,
                                                     "finished": _now()})  # fmt: skip
                    barrier.wait()
                if coordinator:
                    folder.mark_done(stage, {})
            else:
                if coordinator:
                    folder.mark_started(stage, options.executor)
                    print(f"== stage {stage.name} ({stage.kind.name}) ==", flush=True)
                    result, seconds = _call(spec, root, stage, options, (0, 1), models)
                    folder.mark_done(stage, {"seconds": seconds, "result": result})
                barrier.wait()
            finished.add(stage.name)
            if coordinator:
                folder.write_provenance(spec, plan)
        if coordinator:
            folder.write_provenance(spec, plan)
        return plan
    finally:
        barrier.close()


def run_shard(spec: ExperimentSpec, root: Path, shard: tuple[int, int], options: Options):
    """Shard ``shard`` of every sharded stage whose inputs are done (a SLURM array task or a
    hand-run ``--shard i/n``). The coordinator's run marks them done afterwards."""
    plan = plan_run(spec, root)
    folder, models = RunFolder(root), {}
    finished = {s.name for s in plan if s.status == "done"}
    ran = []
    for stage in plan:
        if not stage.kind.sharded or stage.status == "done" or not _ready(stage, finished):
            continue
        if stage.status == "stale":
            raise SpecError(
                f"stage {stage.name}: its part of the spec changed since it started in {root}; "
                "run `diffprobe run SPEC --out RUN` (or --emit-sbatch again) first, which "
                "clears it, then the shards"
            )
        if not root.is_dir():
            folder.claim(spec)
        if folder.started(stage.name) is None:
            folder.mark_started(stage, options.executor)
        marker = folder.markers / f"{stage.name}.shard-{shard[0]}-of-{shard[1]}.json"
        if marker.is_file() and (folder._read(marker.name) or {}).get("hash") == stage.hash:
            ran.append(stage.name)
            continue
        print(f"== stage {stage.name} ({stage.kind.name}, shard {shard[0]}/{shard[1]}) ==",
              flush=True)  # fmt: skip
        result, seconds = _call(spec, root, stage, options, shard, models)
        folder.mark_shard(stage, shard, {"seconds": seconds, "result": result,
                                         "finished": _now()})  # fmt: skip
        ran.append(stage.name)
    return ran


def _now() -> str:
    from diffprobe.runner.plan import now

    return now()
