"""The embedded ``tiny``: loads offline, generates 64 px images; its training is deterministic
and resumable (on the seconds-long ``TinyConfig.small()`` recipe)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffprobe
from diffprobe.train.tiny import TinyConfig, caption_labels, train_tiny


def test_tiny_loads_offline_and_generates_64px():
    model = diffprobe.load("tiny")
    assert model.family == "sd"
    assert model.resolution == 64
    images = model.generate("a small red circle in the top left", steps=4, seed=0)
    assert tuple(images.shape) == (1, 64, 64, 3)
    again = model.generate("a small red circle in the top left", steps=4, seed=0)
    assert torch.equal(torch.as_tensor(images), torch.as_tensor(again))


@pytest.mark.slow
def test_loading_holds_back_the_image_processor_fallback_warning():
    """diffusers' import makes transformers warn that its image processors fall back to PIL when
    torchvision is missing; diffprobe.load keeps that out of the user's output (fresh processes,
    since transformers warns once per process)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers has nothing to warn about")
    # transformers' default verbosity (a benchmark module imported by other tests sets "error")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"}

    def start(code: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip

    def stderr_of(process: subprocess.Popen) -> str:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
        return stderr

    # both processes at once (each spends seconds importing torch and diffusers)
    plain = start("from diffusers import StableDiffusionPipeline")
    ours = start("import diffprobe; diffprobe.load('tiny')")
    plain, ours = stderr_of(plain), stderr_of(ours)
    # the warning exists, so its absence below means something
    assert "requires torchvision" in plain
    assert "requires torchvision" not in ours


def test_tiny_weights_stay_small():
    from pathlib import Path

    folder = Path(diffprobe.registry.resolve("tiny").source)
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 20 * 2**20


def _weights(folder):
    return {name: load_file(next((folder / name).glob("*.safetensors"))) for name in
            ("unet", "vae", "text_encoder")}  # fmt: skip


def _same(a, b):
    return all(torch.equal(a[m][k], b[m][k]) for m in a for k in a[m])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    train_tiny(out / "a", config=TinyConfig.small(), progress=False, threads=1)
    return out


@pytest.mark.slow
def test_training_is_deterministic(trained):
    train_tiny(trained / "b", config=TinyConfig.small(), progress=False, threads=1)
    assert _same(_weights(trained / "a" / "pipeline"), _weights(trained / "b" / "pipeline"))


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_weights(trained):
    config = TinyConfig.small()
    out = trained / "c"
    # stop after the UNet phase's first checkpoint: keep the checkpoints, drop the rest
    train_tiny(out, config=config, progress=False, threads=1)
    checkpoints = sorted((out / "checkpoints").glob("unet-*.pt"))
    assert len(checkpoints) == 2  # the last two are kept
    checkpoints[-1].unlink()  # as if killed before the final checkpoint
    shutil.rmtree(out / "pipeline")
    train_tiny(out, config=config, progress=False, threads=1)
    assert _same(_weights(trained / "a" / "pipeline"), _weights(out / "pipeline"))


@pytest.mark.slow
def test_a_changed_recipe_refuses_to_resume(trained):
    with pytest.raises(ValueError, match="different config"):
        train_tiny(trained / "a", config=TinyConfig.small().__class__(**{
            **TinyConfig.small().__dict__, "steps": 8}), progress=False, threads=1)  # fmt: skip


@pytest.mark.slow
def test_v_prediction_with_zero_terminal_snr_trains_and_ships_its_schedule(tmp_path):
    """The recipe's other objective (the docs/tiny.md ablation): a v-prediction UNet on a
    zero-terminal-SNR schedule trains, and the saved pipeline samples with that schedule."""
    import dataclasses

    config = dataclasses.replace(TinyConfig.small(), prediction_type="v_prediction",
                                 zero_terminal_snr=True)  # fmt: skip
    train_tiny(tmp_path, config=config, progress=False, threads=1)
    model = diffprobe.load(str(tmp_path / "pipeline"))
    scheduler = model.pipe.scheduler.config
    assert scheduler.prediction_type == "v_prediction" and scheduler.rescale_betas_zero_snr
    assert scheduler.timestep_spacing == "trailing"
    # the last training timestep is pure noise
    assert float(model.pipe.scheduler.alphas_cumprod[-1]) < 1e-6
    images = model.generate("a small red circle in the top left", steps=3, seed=0)
    assert tuple(images.shape) == (1, 64, 64, 3) and np.isfinite(np.asarray(images, float)).all()
    with pytest.raises(ValueError, match="needs prediction_type='v_prediction'"):
        train_tiny(tmp_path / "bad", config=dataclasses.replace(config, prediction_type="epsilon"),
                   progress=False, threads=1)  # fmt: skip


def test_caption_labels_mark_unstated_background():
    from diffprobe.data import shapes

    sample = shapes.sample(64, seed=0, split="train")
    labels = caption_labels(sample.factors)
    for i in range(64):
        stated = any(
            f" on {name}" in sample.captions[i] or f"{name} background" in sample.captions[i]
            for name in shapes.BACKGROUNDS
        )
        value = int(labels["background"][i])
        assert (value == len(shapes.BACKGROUNDS)) != stated
        assert shapes.COLOUR_NAMES[int(labels["colour"][i])] in sample.captions[i]
    assert np.array_equal(labels["shape"].numpy(), sample.factors["shape"])
