"""What is the pixel DDPM / DDIM adapter's own (the shared contract is in
tests/test_conformance.py): the recorded timesteps are the scheduler's, prompts count images,
and the unconditional model's refusals."""

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe import DiffprobeError
from diffprobe.models.ddpm import DDPMModel
from diffprobe.testing.ddpm import dummy_ddpm_pipeline


@pytest.fixture(scope="module", params=["ddpm", "ddim"])
def model(request):
    model = diffprobe.from_pipeline(dummy_ddpm_pipeline(seed=0, ddim=request.param == "ddim"))
    assert isinstance(model, DDPMModel) and model.family == "ddpm"
    return model


def noisy_pixels(model, t=400):
    pixels = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    return model.add_noise(model.encode_images(pixels), timestep=t, seed=1)


def test_records_carry_the_schedulers_timesteps(model):
    with diffprobe.capture(model, "unet.mid_block") as cache:
        images = model.generate(["", "ignored"], steps=3, seed=0)
    assert images.shape == (2, 32, 32, 3)
    assert np.array_equal(model.generate(2, steps=3, seed=0), images)  # only the count counts
    timesteps = [r.timestep for r in cache.records("unet.mid_block")]
    assert timesteps == [float(t) for t in model.pipe.scheduler.timesteps]
    assert cache.last("unet.mid_block").shape == (2, 64, 16, 16)


def test_unconditional_conventions(model):
    conditioning = model.encode_prompt(["a", "b", "c"])
    with pytest.raises(DiffprobeError, match="unconditional"):
        model.generate(1, guidance_scale=7.5)
    with pytest.raises(DiffprobeError, match="sample size 32 px, not 64 px"):
        model.generate(1, size=64)
    x_t, t = noisy_pixels(model)
    with torch.no_grad():
        expected = model.pipe.unet(x_t, t).sample
    assert torch.equal(model.denoise(x_t, t, conditioning.select([0, 1])), expected)
    with pytest.raises(DiffprobeError, match="CFG needs an unconditional"):
        model.denoise(x_t, t, conditioning, guidance_scale=3.0)
