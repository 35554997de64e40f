"""``diffprobe run`` killed (SIGKILL) at random points and rerun ends with results identical to
an uninterrupted run and never redoes a finished stage or chunk; ``torchrun --nproc_per_node 2``
(CPU, gloo) fills a store identical to one process's (docs/runner.md)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest
from runner_util import (
    TINY_SPEC,
    assert_identical,
    chunk_stamps,
    command,
    done_markers,
    env,
    results,
    write_spec,
)

KILL_SPEC = TINY_SPEC.replace("  sites: {model: sd1.5, size: 64, components: [unet]}\n", "")
TRIALS = 10


def _run(spec, out, **extra) -> float:
    began = time.perf_counter()
    subprocess.run(command("run", str(spec), "--out", str(out), "--quiet"), env=env(**extra),
                   check=True, timeout=900)  # fmt: skip
    return time.perf_counter() - began


@pytest.mark.slow
def test_kill_9_at_random_points_then_rerun(tmp_path):
    spec = write_spec(tmp_path / "spec", KILL_SPEC)
    reference = tmp_path / "reference"
    whole = _run(spec, reference)
    expected = results(reference)
    rng = random.Random(0)
    out, runs, recomputed, killed_in = tmp_path / "killed-0", 0, 0, []
    for trial in range(TRIALS):
        stages_before, chunks_before = done_markers(out), chunk_stamps(out) if out.exists() else {}
        process = subprocess.Popen(command("run", str(spec), "--out", str(out), "--quiet"),
                                   env=env())  # fmt: skip
        try:
            process.wait(timeout=rng.uniform(0.25, 0.75) * whole)
        except subprocess.TimeoutExpired:
            process.kill()  # SIGKILL
            process.wait()
        finished = process.returncode == 0
        after = done_markers(out) if out.exists() else {}
        # a finished stage is never redone, a finished chunk never recomputed
        assert {k: after.get(k) for k in stages_before} == stages_before, trial
        stamps = chunk_stamps(out) if (out / "extract" / "progress").is_dir() else {}
        recomputed += sum(stamps.get(k) != v for k, v in chunks_before.items())
        killed_in.append(sorted(after))
        if finished:  # this run reached the end: check it, start a fresh folder for the next
            assert_identical(results(out), expected)
            runs += 1
            out = tmp_path / f"killed-{runs}"
    _run(spec, out)
    assert_identical(results(out), expected)
    assert recomputed == 0
    record = {
        "trials": TRIALS,
        "uninterrupted_s": round(whole, 1),
        "completed_runs": runs + 1,
        "stages_done_after_each_kill": killed_in,
        "recomputed_chunks": recomputed,
    }
    print(json.dumps(record))


@pytest.mark.slow
def test_torchrun_two_ranks_fill_the_same_store(tmp_path):
    # `torchrun` is `python -m torch.distributed.run`
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    spec = write_spec(tmp_path / "spec", KILL_SPEC)
    # torchrun gives each of its workers OMP_NUM_THREADS=1: the single process runs with one
    # thread too, so both compute every chunk with the same kernels
    _run(spec, tmp_path / "one", OMP_NUM_THREADS="1")
    two = tmp_path / "two"
    subprocess.run([*torchrun, "--nproc_per_node", "2", "-m", "diffprobe", "run", str(spec),
                    "--out", str(two), "--quiet"], env=env(OMP_NUM_THREADS="1"), check=True,
                   timeout=900)  # fmt: skip
    assert_identical(results(two), results(tmp_path / "one"))
    extract = json.loads((two / "markers" / "extract.done.json").read_text())
    assert sorted(extract["shards"]) == ["0", "1"]  # each rank filled its shard
    assert {s["result"]["chunks_computed"] for s in extract["shards"].values()} == {2}
