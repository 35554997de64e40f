"""The trainers of `tiny-ddpm` and `tiny-clip` (smoke size) and the shipped models' layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.mark.slow
def test_ddpm_trainer_writes_a_loadable_pipeline_and_resumes(tmp_path):
    import diffprobe
    from diffprobe.train.ddpm import DDPMConfig, train_tiny_ddpm

    config = DDPMConfig.small()
    folder = train_tiny_ddpm(tmp_path / "run", config=config, progress=False)
    first = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert first["steps_done"] == config.steps
    model = diffprobe.load(folder)
    assert model.family == "ddpm" and model.resolution == config.image_size
    # a second call resumes from the last checkpoint: no step is run again
    train_tiny_ddpm(tmp_path / "run", config=config, progress=False)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps_this_session"] == 0


@pytest.mark.slow
def test_clip_trainer_writes_save_pretrained_layout(tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    from diffprobe.train.clip import CLIPConfig, train_tiny_clip

    folder = train_tiny_clip(tmp_path / "run", config=CLIPConfig.small(), progress=False)
    model = CLIPModel.from_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    assert model.config.vision_config.image_size == CLIPConfig.small().image_size
    assert tokenizer("a red star").input_ids[0] == tokenizer.bos_token_id


def test_caption_variants_name_only_true_factors():
    from diffprobe.data import shapes
    from diffprobe.train.clip import caption_variant

    data = shapes.sample(20, seed=2)
    rng = np.random.default_rng(0)
    for index in range(20):
        factors = data.item(index)
        text = caption_variant(factors, rng, 0.0)
        for other, name in enumerate(shapes.COLOUR_NAMES):
            if name in text.split():
                assert other == factors["colour"], (text, factors)


def test_shipped_tiny_ddpm_and_tiny_clip():
    import diffprobe
    from diffprobe.interventions.hspace import h_shape
    from diffprobe.interventions.hspace.clip import load_clip

    model = diffprobe.load("tiny-ddpm")
    assert model.family == "ddpm" and model.resolution == 32
    assert h_shape(model) == (64, 8, 8)
    clip = load_clip("tiny-clip")
    images = torch.zeros(2, 3, 32, 32)
    assert clip.images(images).shape == (2, 64)
    # the shipped tiny-clip reads colour: a red image is closer to "red" than to "blue"
    red = torch.tensor([225, 30, 30]).view(1, 3, 1, 1) / 127.5 - 1
    square = torch.full((1, 3, 32, 32), 235 / 127.5 - 1)
    square[..., 10:22, 10:22] = red
    image = clip.images(square)[0]
    assert image @ clip.concept("red") > image @ clip.concept("blue")
