"""``diffprobe run``: the spec, the plan and its hashes, dry runs of the examples, and that
editing one stage's parameters reruns that stage and its dependants only (docs/runner.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from runner_util import ROOT, TINY_SPEC, done_markers, results, write_spec

from diffprobe.runner import load_spec
from diffprobe.runner.api import describe, run
from diffprobe.runner.execute import plan_run
from diffprobe.runner.plan import order

EXAMPLES = ["demo", "things-alignment-sd15", "features-sd15", "hspace-ddpm"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_pass_a_dry_run(name, tmp_path, monkeypatch):
    for variable in ("THINGS_ROOT", "IMAGE_FOLDER", "CELEBA_FOLDER"):
        monkeypatch.setenv(variable, str(tmp_path))
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    monkeypatch.setenv("PROMPT_FILE", str(tmp_path / "prompts.txt"))
    lines = []
    root = run(ROOT / "examples" / f"{name}.yaml", tmp_path / "run", dry_run=True,
               echo=lines.append)  # fmt: skip
    text = "\n".join(lines)
    spec = load_spec(ROOT / "examples" / f"{name}.yaml")
    for stage in spec.stages:
        assert f"  {stage} " in text
    assert f"{len(spec.stages) + 1} of {len(spec.stages) + 1} stages to run" in text
    assert not root.exists()  # a dry run writes nothing


def test_demo_spec_is_the_demo_study():
    from diffprobe.stages.demo import ANOMALY_SITES, CAPTURE_SITES, DEMO_GRID_SITES, DEMO_NOISE

    spec = load_spec(ROOT / "examples" / "demo.yaml")
    stages = spec.stages
    assert stages["extract"].params.sites == DEMO_GRID_SITES
    assert stages["extract"].params.noise_levels == DEMO_NOISE
    assert stages["capture"].params.sites == CAPTURE_SITES
    assert stages["anomaly_run"].params.sites == list(ANOMALY_SITES)
    assert [c.name for c in stages["extract"].params.conditions] == ["empty", "label"]
    assert stages["align"].params.best.folds == 5


def test_hashes_follow_the_spec_parts_each_stage_depends_on(tmp_path):
    base = {s.name: s.hash for s in order(load_spec(write_spec(tmp_path / "a")))}
    edited = TINY_SPEC.replace("k: 4", "k: 3")
    changed = {s.name: s.hash for s in order(load_spec(write_spec(tmp_path / "b", edited)))}
    assert [n for n in base if base[n] != changed[n]] == ["sae_train", "sae_eval"]
    moved = TINY_SPEC.replace("model: {name: tiny}", "model: {name: tiny, device: cuda}")
    assert {s.name: s.hash for s in order(load_spec(write_spec(tmp_path / "c", moved)))} == base
    grid = TINY_SPEC.replace("[0.1, 0.5]", "[0.1, 0.6]")
    regrid = {s.name: s.hash for s in order(load_spec(write_spec(tmp_path / "d", grid)))}
    assert [n for n in base if base[n] != regrid[n]] == ["extract", "sae_train", "sae_eval"]


def test_order_puts_inputs_first(tmp_path):
    text = TINY_SPEC.replace("  sae_eval: {device: cpu}\n", "")
    text = text.replace("stages:\n", "stages:\n  sae_eval: {device: cpu}\n")
    names = [s.name for s in order(load_spec(write_spec(tmp_path, text)))]
    assert names.index("sae_eval") > names.index("sae_train") > names.index("extract")
    assert names[0] == "data"


def test_yaml_variables_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("ITEMS", "shapes:5")
    spec = load_spec(write_spec(tmp_path, TINY_SPEC.replace('"shapes:8:0"', "${ITEMS}")))
    assert spec.data.source == "shapes:5"


@pytest.mark.slow
def test_editing_one_stage_reruns_it_and_its_dependants_only(tmp_path):
    spec = write_spec(tmp_path / "spec")
    out = tmp_path / "run"
    run(spec, out, progress=False)
    first = done_markers(out)
    assert sorted(first) == ["data", "extract", "sae_eval", "sae_train", "sites"]
    before = results(out)
    # nothing changed: nothing is redone
    run(spec, out, progress=False)
    assert done_markers(out) == first
    # the SAE's k changed: the SAE and its evaluation are redone, the extraction is not
    spec.write_text(TINY_SPEC.replace("k: 4", "k: 2"))
    assert "done" in describe(load_spec(spec), out)
    plan = {s.name: s.status for s in plan_run(load_spec(spec), out)}
    assert plan == {"data": "done", "sites": "done", "extract": "done", "sae_train": "stale",
                    "sae_eval": "stale"}  # fmt: skip
    run(spec, out, progress=False)
    second = done_markers(out)
    assert [n for n in first if first[n] != second[n]] == ["sae_eval", "sae_train"]
    after = results(out)
    for key in before:
        if key.startswith("extract/"):
            assert (before[key] == after[key]).all()
    assert after["sae/sae_weights.safetensors/W_dec"].shape != before[
        "sae/sae_weights.safetensors/W_dec"].shape or not (
        after["eval"] == before["eval"]).all()  # fmt: skip
    # --from forces that stage and every later one
    run(spec, out, force_from="extract", progress=False)
    third = done_markers(out)
    assert [n for n in second if second[n] != third[n]] == ["extract", "sae_eval", "sae_train"]
    assert (Path(out) / "run.json").is_file()


def test_emit_sbatch_writes_an_array_script(tmp_path):
    import subprocess

    from diffprobe.runner.slurm import Cluster

    spec = write_spec(tmp_path / "spec")
    out = tmp_path / "run"
    run(spec, out, emit=True, cluster=Cluster(shards=3, partition="gpu", gpus_per_task=1,
                                              time=30, array_parallelism=2), echo=print)  # fmt: skip
    folder = out / "slurm"
    shards = (folder / "shards.sbatch").read_text()
    assert "#SBATCH --array=0-2%2" in shards and "#SBATCH --partition=gpu" in shards
    assert "#SBATCH --gpus-per-task=1" in shards and "#SBATCH --requeue" in shards
    assert f"--out {out.resolve()} --shard ${{SLURM_ARRAY_TASK_ID}}/3" in shards
    assert "--phase unsharded" in (folder / "prepare.sbatch").read_text()
    submit = (folder / "submit.sh").read_text()
    assert "afterok:$prepare shards.sbatch" in submit and "afterok:$shards finish.sbatch" in submit
    for name in ("prepare.sbatch", "shards.sbatch", "finish.sbatch", "submit.sh"):
        subprocess.run(["bash", "-n", str(folder / name)], check=True)  # valid shell


@pytest.mark.slow
def test_shards_run_apart_then_the_coordinator_marks_the_stage_done(tmp_path):
    """What the emitted sbatch scripts do: `--shard i/n` tasks, then a plain run that finds all
    n shard markers and marks the stage done without computing a chunk again."""
    from runner_util import chunk_stamps

    text = TINY_SPEC.split("  sae_train:")[0].replace(
        "  sites: {model: sd1.5, size: 64, components: [unet]}\n", "")  # fmt: skip
    spec = write_spec(tmp_path / "spec", text)
    out = tmp_path / "run"
    run(spec, out, shard=(1, 2), progress=False)  # extract waits for the data stage: nothing
    assert not (out / "extract").exists()
    run(spec, out, phase="unsharded", progress=False)  # the data stage, then stop
    assert sorted(done_markers(out)) == ["data"]
    for index in (1, 0):
        run(spec, out, shard=(index, 2), progress=False)
    stamps = chunk_stamps(out)
    assert len(stamps) == 4
    run(spec, out, progress=False)
    assert chunk_stamps(out) == stamps
    import json

    extract = json.loads((out / "markers" / "extract.done.json").read_text())
    assert {i: s["result"]["chunks_computed"] for i, s in extract["shards"].items()} == {
        "0": 2, "1": 2}  # fmt: skip


def test_the_report_stage_runs_last_and_follows_every_stage(tmp_path):
    from diffprobe.runner.registry import STAGES

    if not STAGES["report"].available():
        pytest.skip("this diffprobe has no report stage")
    text = TINY_SPEC.replace("stages:\n", "stages:\n  report: {}\n")
    planned = order(load_spec(write_spec(tmp_path / "a", text)))
    assert planned[-1].name == "report"
    assert set(planned[-1].depends_on) == {s.name for s in planned[:-1]}
    edited = order(load_spec(write_spec(tmp_path / "b", text.replace("k: 4", "k: 3"))))
    assert edited[-1].hash != planned[-1].hash
