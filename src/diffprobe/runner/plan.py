"""The plan of a run: the spec's stages in dependency order, each with the hash of the part of
the spec its results depend on, and what its markers in the run folder say about it.

Run folder layout::

    RUN/
      diffprobe-output.json   the folder marker (kind "experiment")
      spec.yaml               the spec of the latest run
      run.json                provenance per stage (versions, timings, host, shards, result)
      markers/NAME.started.json   the stage began with this hash
      markers/NAME.shard-I-of-N.json   shard I of N of a sharded stage finished
      markers/NAME.done.json  the stage finished with this hash
      NAME/                   the stage's own output folder
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from diffprobe.io import claim_output, versions, write_json, write_text
from diffprobe.runner.registry import STAGES, StageKind, _resolve
from diffprobe.runner.spec import ExperimentSpec, SpecError
from diffprobe.stages.params import NoParams, dumped
from diffprobe.stages.steps import StageContext

EXPERIMENT_KIND = "experiment"
MARKERS = "markers"
RUN_JSON = "run.json"
SPEC_COPY = "spec.yaml"


@dataclass
class PlannedStage:
    name: str
    kind: StageKind
    params: BaseModel
    depends_on: list[str]
    inputs: dict[str, str]
    hash: str = ""
    status: str = "todo"
    """done | todo | partial (started with this hash) | stale (markers of other parameters)"""
    shards_done: dict[int, list[int]] = field(default_factory=dict)


def now() -> str:
    # microseconds: a stage redone within the same second still leaves a marker of its own
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def host() -> dict:
    """Where this process runs (with its SLURM job or torchrun rank where it has one)."""
    found = {"host": socket.gethostname(), "pid": os.getpid(), "platform": platform.platform()}
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "RANK"):
        if key in os.environ:
            found[key.lower()] = os.environ[key]
    return found


def _digest(payload: dict) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def order(spec: ExperimentSpec) -> list[PlannedStage]:
    """The spec's stages (and the implicit ``data`` stage) in dependency order, file order
    where free; each with its hash: its kind, parameters, the spec parts it uses (the model
    without its device) and the hashes of the stages it reads."""
    entries = dict(spec.stages)
    planned: dict[str, PlannedStage] = {}
    if "data" not in entries:
        planned["data"] = PlannedStage("data", STAGES["data"], NoParams(), [], {})
    for stage in entries.values():
        inputs = {f: getattr(stage.params, f) for f in stage.kind.depends_on
                  if getattr(stage.params, f) is not None}  # fmt: skip
        needs = list(dict.fromkeys(inputs.values()))
        if "data" in stage.kind.uses and stage.name != "data":
            needs.insert(0, "data")
        if stage.kind.last:
            needs = ["data", *(n for n in entries if n != stage.name and not
                               entries[n].kind.last)]  # fmt: skip
        planned[stage.name] = PlannedStage(stage.name, stage.kind, stage.params, needs, inputs)
    ordered: list[PlannedStage] = []
    placed: set[str] = set()
    while len(ordered) < len(planned):
        ready = [s for s in planned.values() if s.name not in placed
                 and all(d in placed for d in s.depends_on)]  # fmt: skip
        if not ready:
            cycle = [s.name for s in planned.values() if s.name not in placed]
            raise SpecError(f"{spec.path}: stages {', '.join(cycle)} read each other in a "
                            "cycle; no order runs them")  # fmt: skip
        ordered.append(ready[0])
        placed.add(ready[0].name)
    hashes: dict[str, str] = {}
    model = spec.model.model_dump(mode="json", exclude={"device"})
    for stage in ordered:
        payload = {"kind": stage.kind.name, "params": dumped(stage.params),
                   "depends_on": {d: hashes[d] for d in stage.depends_on}}  # fmt: skip
        if "model" in stage.kind.uses:
            payload["model"] = model
        if "data" in stage.kind.uses:
            payload["data"] = spec.data.model_dump(mode="json")
        stage.hash = hashes[stage.name] = _digest(payload)
    return ordered


class RunFolder:
    """The markers and provenance of one run folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.markers = self.root / MARKERS

    def claim(self, spec: ExperimentSpec) -> None:
        claim_output(self.root, EXPERIMENT_KIND, entries=(RUN_JSON, MARKERS, SPEC_COPY))
        write_text(self.root / SPEC_COPY, spec.text)

    def _read(self, name: str) -> dict | None:
        try:
            return json.loads((self.markers / name).read_text())
        except (OSError, ValueError):
            return None

    def done(self, stage: str) -> dict | None:
        return self._read(f"{stage}.done.json")

    def started(self, stage: str) -> dict | None:
        return self._read(f"{stage}.started.json")

    def shard_markers(self, stage: str, digest: str) -> dict[int, list[int]]:
        """Shard count n -> indices i finished with ``digest``."""
        found: dict[int, list[int]] = {}
        for path in sorted(self.markers.glob(f"{stage}.shard-*-of-*.json")):
            i, n = path.name[len(stage) + 7 : -5].split("-of-")
            marker = self._read(path.name)
            if marker is not None and marker.get("hash") == digest:
                found.setdefault(int(n), []).append(int(i))
        return found

    def complete_shards(self, stage: PlannedStage) -> int | None:
        """The shard count n whose n shards all finished with the stage's hash, or None."""
        for n, indices in self.shard_markers(stage.name, stage.hash).items():
            if sorted(indices) == list(range(n)):
                return n
        return None

    def status(self, stage: PlannedStage) -> str:
        done, started = self.done(stage.name), self.started(stage.name)
        if done is not None and done.get("hash") == stage.hash:
            return "done"
        if (done is not None) or (started is not None and started.get("hash") != stage.hash):
            return "stale"
        if started is not None or (self.root / stage.name).exists():
            return "partial"
        return "todo"

    def clear(self, stage: PlannedStage) -> None:
        """Remove a stage's folder and markers (it is redone from nothing)."""
        shutil.rmtree(self.root / stage.name, ignore_errors=True)
        for path in self.markers.glob(f"{stage.name}.*.json"):
            path.unlink(missing_ok=True)

    def mark_started(self, stage: PlannedStage, executor: str) -> None:
        write_json(self.markers / f"{stage.name}.started.json",
                   {"hash": stage.hash, "started": now(), "executor": executor})  # fmt: skip

    def mark_shard(self, stage: PlannedStage, shard: tuple[int, int], record: dict) -> None:
        i, n = shard
        write_json(self.markers / f"{stage.name}.shard-{i}-of-{n}.json",
                   {"hash": stage.hash, **record, "versions": versions(), **host()})  # fmt: skip

    def mark_done(self, stage: PlannedStage, record: dict) -> None:
        started = self.started(stage.name) or {}
        shards = {}
        for n, indices in self.shard_markers(stage.name, stage.hash).items():
            if sorted(indices) == list(range(n)):
                shards = {str(i): self._read(f"{stage.name}.shard-{i}-of-{n}.json")
                          for i in range(n)}  # fmt: skip
        write_json(self.markers / f"{stage.name}.done.json", {
            "hash": stage.hash, "kind": stage.kind.name, "params": dumped(stage.params),
            "started": started.get("started"), "finished": now(),
            "executor": started.get("executor"), **record,
            **({"shards": shards} if shards else {}), "versions": versions(), **host(),
        })  # fmt: skip

    def write_provenance(self, spec: ExperimentSpec, plan: list[PlannedStage]) -> None:
        stages = {s.name: self.done(s.name) for s in plan}
        write_json(self.root / RUN_JSON, {
            "experiment": spec.name, "spec": str(spec.path.resolve()), "updated": now(),
            "model": spec.model.model_dump(mode="json"), "data": spec.data.model_dump(mode="json"),
            "order": [s.name for s in plan],
            "stages": {k: v for k, v in stages.items() if v is not None},
        })  # fmt: skip


def context(spec: ExperimentSpec, root: Path, stage: PlannedStage, **kwargs) -> StageContext:
    return StageContext(root=root, folder=root / stage.name, model_spec=spec.model,
                        data=spec.data, inputs={f: root / t for f, t in stage.inputs.items()},
                        **kwargs)  # fmt: skip


def units(spec: ExperimentSpec, root: Path, stage: PlannedStage) -> str:
    """What ``--dry-run`` shows as the stage's units of work."""
    if stage.kind.units is None:
        return "1 unit"
    total, done = _resolve(stage.kind.units)(context(spec, root, stage), stage.params)
    total_text = "?" if total is None else str(total)
    return f"{total_text} chunks, {done} done"
