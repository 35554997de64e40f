"""The model registry, loading errors and the CLI's offline commands."""

import json
import time

import pytest
from typer.testing import CliRunner

import diffprobe
from diffprobe.cli import app
from diffprobe.errors import ModelLoadError, UnknownModelError
from diffprobe.registry import list_models, resolve

REQUIRED = [
    "sd1.5",
    "sd2.1",
    "sd2.1-base",
    "sd-turbo",
    "sdxl",
    "sdxl-turbo",
    "sd3",
    "sd3.5",
    "flux-schnell",
    "if-i",
    "ddpm-celebahq",
    "tiny",
]


def test_every_required_alias_is_registered_with_its_facts():
    specs = {s.alias: s for s in list_models()}
    for alias in REQUIRED:
        assert alias in specs
        spec = specs[alias]
        assert spec.family in {"sd", "sdxl", "sd3", "flux", "if", "ddpm"}
        assert spec.resolution > 0 and spec.source
    assert specs["sd2.1"].prediction_type == "v_prediction" and specs["sd2.1"].resolution == 768
    assert specs["sd3"].prediction_type == "flow"
    assert specs["ddpm-celebahq"].family == "ddpm"


def test_unknown_alias_lists_the_known_ones():
    with pytest.raises(
        UnknownModelError, match=r"Did you mean 'sd1\.5'.*Known aliases: tiny, sd1\.5"
    ):
        resolve("sd15")


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(UnknownModelError, match="not a diffusers pipeline folder"):
        resolve(str(tmp_path))


def test_local_folder_round_trip(tmp_path):
    from diffprobe.testing import dummy_sd_pipeline

    dummy_sd_pipeline().save_pretrained(tmp_path / "pipe")
    model = diffprobe.load(tmp_path / "pipe")
    assert model.family == "sd" and model.name == str(tmp_path / "pipe")


def test_unreachable_hub_model_fails_fast_with_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        diffprobe.load("sd3")
    message = str(info.value)
    assert "stabilityai/stable-diffusion-3-medium-diffusers" in message
    assert "hf auth login" in message and "local diffusers folder" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert time.perf_counter() - start < 30  # no long retry loop (generous bound, not a benchmark)


def test_cli_models_json():
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    aliases = [row["alias"] for row in json.loads(result.stdout)]
    assert set(REQUIRED) <= set(aliases)


def test_sites_option_takes_several_values_after_one_flag(tmp_path):
    import subprocess
    import sys

    from diffprobe.cli import join_variadic
    from diffprobe.testing import dummy_sd_pipeline

    assert join_variadic(["extract", "--sites", "a", "b", "--noise", "0.1"]) == [
        "extract", "--sites", "a b", "--noise", "0.1"]  # fmt: skip
    assert join_variadic(["--sites", "a", "--sites", "b"]) == ["--sites", "a", "--sites", "b"]
    folder = tmp_path / "pipe"
    dummy_sd_pipeline().save_pretrained(folder)
    done = subprocess.run(
        [sys.executable, "-c", "from diffprobe.cli import main; main()", "extract", "--model",
         str(folder), "--data", "shapes:2", "--sites", "unet.mid_block", "unet.up_blocks.1",
         "--noise", "0.1", "--out", str(tmp_path / "run"), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    import diffprobe

    assert sorted(diffprobe.open_run(tmp_path / "run").sites) == [
        "unet.mid_block",
        "unet.up_blocks.1",
    ]
