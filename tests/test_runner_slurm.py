"""``diffprobe run --executor slurm`` on a real one-node SLURM cluster (started by
``.ci/slurm-up.sh``, which ``.ci/run`` calls): a reduced demo spec over 3 array tasks gives the
arrays of the local run; an array task cancelled (scancel) mid-extraction leaves the run
resumable, and the rerun completes with identical arrays without recomputing the cancelled
task's finished chunks. Skipped, with the reason, where no SLURM cluster answers."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest
from runner_util import TINY_SPEC, assert_identical, chunk_stamps, command, env, results, write_spec

pytestmark = pytest.mark.slow

# one item per chunk: 8 chunks, shard 0 of 3 takes chunks 0, 3 and 6
SPEC = TINY_SPEC.replace("  sites: {model: sd1.5, size: 64, components: [unet]}\n", "").replace(
    "chunk_items: 2", "chunk_items: 1")  # fmt: skip
# torch's thread count changes its CPU kernels' rounding: every process here uses one thread
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _cluster_reason() -> str | None:
    missing = [c for c in ("sbatch", "squeue", "scancel", "sinfo") if shutil.which(c) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing; .ci/slurm-up.sh installs it)"
    states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if states.returncode != 0 or not re.search(r"idle|mix|alloc", states.stdout):
        return f"no SLURM node is up (sinfo: {(states.stdout + states.stderr).strip()!r}); run " \
               ".ci/slurm-up.sh"  # fmt: skip
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed (pip install submitit)"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = _cluster_reason()
    if reason:
        pytest.skip(reason)


def _slurm(spec, out, *extra):
    return command("run", str(spec), "--out", str(out), "--executor", "slurm", "--shards", "3",
                   "--time", "20", *extra)  # fmt: skip


def _state(job: str) -> str:
    found = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                           text=True)  # fmt: skip
    return found.stdout.strip()


def test_slurm_array_equals_local_and_survives_scancel(cluster, tmp_path):
    spec = write_spec(tmp_path / "spec", SPEC)
    subprocess.run(command("run", str(spec), "--out", str(tmp_path / "local"), "--quiet"),
                   env=env(**ONE_THREAD), check=True, timeout=900)  # fmt: skip
    expected = results(tmp_path / "local")

    # 1. three array tasks give the local run's arrays, SAE and evaluation
    done = subprocess.run(_slurm(spec, tmp_path / "slurm"), env=env(**ONE_THREAD),
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 tasks" in done.stdout
    assert_identical(results(tmp_path / "slurm"), expected)
    logs = list((tmp_path / "slurm" / "slurm").rglob("*_log.out"))
    assert len(logs) >= 5  # a phase job, 3 array tasks, a phase job: logs in the run folder

    # 2. cancel array task 0 while it works on its first chunk (as soon as SLURM runs it: it
    # loads the model first, then computes chunks 0, 3 and 6; waiting for a chunk to be done
    # raced the task's last chunks on a loaded machine)
    out = tmp_path / "cancelled"
    driver = subprocess.Popen(_slurm(spec, out), env=env(**ONE_THREAD), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    array = None
    for line in driver.stdout:
        found = re.search(r"submitted array (\d+)", line)
        if found:
            array = found.group(1)
            break
    assert array is not None
    deadline = time.monotonic() + 900
    while _state(f"{array}_0") != "RUNNING":
        assert time.monotonic() < deadline and driver.poll() is None
        time.sleep(0.1)
    subprocess.run(["scancel", f"{array}_0"], check=True)
    cancelled_with = set(chunk_stamps(out))
    tail = driver.stdout.read()
    assert driver.wait(timeout=900) == 2, tail
    assert "did not finish" in tail and "[0]" in tail, tail
    assert not (out / "markers" / "extract.done.json").exists()
    stamps = chunk_stamps(out)
    assert len(stamps) < 8  # the cancelled task's chunks are missing

    # 3. the rerun completes; no finished chunk is recomputed; arrays identical
    again = subprocess.run(_slurm(spec, out), env=env(**ONE_THREAD), capture_output=True,
                           text=True, timeout=1800)  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    after = chunk_stamps(out)
    assert len(after) == 8
    assert {k: after[k] for k in stamps} == stamps
    assert_identical(results(out), expected)
    print(
        f"cancelled task 0 of array {array} with chunks {sorted(cancelled_with)} done; "
        f"rerun filled {sorted(set(after) - set(stamps))}"
    )
