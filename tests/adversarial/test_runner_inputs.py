"""``diffprobe run`` fed the spec mistakes users make: a misspelt key (did-you-mean, with the
YAML line), an unknown stage, a stage reading an earlier stage the spec lacks, a wrong type, a
missing file, a cluster flag where there is no SLURM. Each is refused with exit 2 and one line,
before anything is created."""

from __future__ import annotations

import pytest

GOOD = """\
model: {name: tiny}
data: {source: "shapes:4"}
stages:
  extract:
    sites: [unet.mid_block]
    noise_levels: [0.1]
  sae_train: {site: unet.mid_block}
"""

CASES = {
    "misspelt stage key": (
        GOOD.replace("noise_levels", "noise_lvels"),
        ["spec.yaml:6", "noise_lvels", "did you mean 'noise_levels'"],
    ),
    "misspelt top-level key": (
        GOOD.replace("stages:", "stages:\n").replace("data:", "dta:"),
        ["spec.yaml:2", "dta", "did you mean 'data'"],
    ),
    "misspelt model key": (
        GOOD.replace("{name: tiny}", "{nme: tiny}"),
        ["spec.yaml:1", "model.nme", "did you mean 'name'"],
    ),
    "unknown stage": (
        GOOD.replace("sae_train:", "sae_trian:"),
        ["spec.yaml:7", "sae_trian", "did you mean 'sae_train'"],
    ),
    "stage reading a missing stage": (
        GOOD.replace("  extract:\n", "  grid:\n    stage: extract\n"),
        ["spec.yaml:8", "sae_train", "'extract'", "input: to one of grid"],
    ),
    "stage reading a stage of the wrong kind": (
        GOOD + "  sae_eval: {input: extract}\n",
        ["spec.yaml:8", "sae_train stage", "extract"],
    ),
    "wrong type": (GOOD.replace("[0.1]", "[zero]"), ["spec.yaml:6", "noise_levels.0", "zero"]),
    "missing THINGS root": (
        GOOD.replace('source: "shapes:4"', "things: /no/such/things"),
        ["spec.yaml:2", "data.things", "/no/such/things", "does not exist"],
    ),
    "not yaml": ("model: [tiny\n", ["spec.yaml", "not valid YAML"]),
    "no stages": ("model: {name: tiny}\nstages: {}\n", ["spec.yaml:2", "no stages"]),
}


@pytest.mark.parametrize(("text", "names"), list(CASES.values()), ids=list(CASES))
def test_run_refuses_specs(sandbox, refused, text, names):
    (sandbox / "work" / "spec.yaml").write_text(text)
    outcome = refused(["run", "spec.yaml", "--out", "out"], names)
    assert len(outcome.err.strip().splitlines()) == 1, outcome.err


def test_run_refuses_a_missing_spec(refused):
    refused(["run", "nothing.yaml"], ["nothing.yaml", "does not exist"])


def test_run_refuses_from_an_unknown_stage(sandbox, refused):
    (sandbox / "work" / "spec.yaml").write_text(GOOD)
    refused(["run", "spec.yaml", "--out", "out", "--from", "sae_trian", "--dry-run"],
            ["--from sae_trian", "did you mean 'sae_train'"])  # fmt: skip


def test_slurm_executor_without_slurm(sandbox, refused, monkeypatch, tmp_path):
    (sandbox / "work" / "spec.yaml").write_text(GOOD)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    refused(["run", "spec.yaml", "--executor", "slurm"],
            ["--executor slurm", "SLURM is not installed", "sbatch"])  # fmt: skip


def test_cluster_flag_without_the_slurm_executor(sandbox, refused):
    (sandbox / "work" / "spec.yaml").write_text(GOOD)
    refused(["run", "spec.yaml", "--slurm-partition", "gpu"],
            ["--slurm-partition", "--executor slurm"])  # fmt: skip


def test_unknown_executor(sandbox, refused):
    (sandbox / "work" / "spec.yaml").write_text(GOOD)
    refused(["run", "spec.yaml", "--executor", "ray"], ["--executor 'ray'", "local, slurm"])


def test_an_optional_stage_this_diffprobe_lacks(sandbox, refused):
    import importlib.util

    if importlib.util.find_spec("diffprobe.report.build") is not None:
        pytest.skip("this diffprobe has the report stage")
    (sandbox / "work" / "spec.yaml").write_text(GOOD + "  report: {}\n")
    refused(["run", "spec.yaml"], ["spec.yaml:8", "report", "diffprobe.report.build"])
