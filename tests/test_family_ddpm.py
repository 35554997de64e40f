"""Pixel DDPM / DDIM adapter on tiny random UNet2DModel pipelines: parity with the plain
pipeline, early stop, hand-written hooks, noise, the unconditional conventions."""

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe import DiffprobeError, Edit
from diffprobe.models.ddpm import DDPMModel
from diffprobe.testing.ddpm import dummy_ddpm_pipeline

SITES = [
    "unet:input",
    "unet.down_blocks.1",
    "unet.down_blocks.1.attentions.0",
    "unet.down_blocks.0.resnets.1",
    "unet.mid_block",
    "unet.up_blocks.0.attentions.1",
    "unet.up_blocks.1:input",
]


@pytest.fixture(scope="module", params=["ddpm", "ddim"])
def model(request):
    model = diffprobe.from_pipeline(dummy_ddpm_pipeline(seed=0, ddim=request.param == "ddim"))
    assert isinstance(model, DDPMModel) and model.family == "ddpm"
    return model


def plain(pipe, count, steps=3, seed=0):
    """The pipeline called directly, no diffprobe."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        batch_size=count, generator=generator, num_inference_steps=steps, output_type="np"
    ).images


def noisy_pixels(model, t=400):
    pixels = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    return model.add_noise(model.encode_images(pixels), timestep=t, seed=1)


def test_geometry(model):
    assert model.resolution == 32 and model.size_multiple() == 2
    assert not model.generation_uses_cfg(7.5)


def test_generate_with_hooks_equals_plain_pipeline(model):
    reference = plain(model.pipe, count=2)
    with diffprobe.capture(model, SITES) as cache:
        images = model.generate(["", "ignored"], steps=3, seed=0)
    assert images.shape == (2, 32, 32, 3)
    assert np.array_equal(images, reference)
    assert np.array_equal(model.generate(2, steps=3, seed=0), reference)  # only the count counts
    # no CFG: one whole-batch record per denoiser call
    records = cache.records("unet.mid_block")
    assert [(r.call, r.branch, r.value.shape[0]) for r in records] == [
        (0, "none", 2),
        (1, "none", 2),
        (2, "none", 2),
    ]
    timesteps = [r.timestep for r in records]
    assert timesteps == [float(t) for t in model.pipe.scheduler.timesteps]


def test_edit_with_zero_is_bit_identical(model):
    reference = plain(model.pipe, count=2)
    with diffprobe.edit(model, [Edit(site, "add", value=0.0) for site in SITES]):
        images = model.generate(2, steps=3, seed=0)
    assert np.array_equal(images, reference)


def test_unconditional_conventions(model):
    conditioning = model.encode_prompt(["a", "b", "c"])
    assert conditioning.cond == {} and conditioning.uncond is None and len(conditioning) == 3
    assert model.encode_text(["a"]).hidden_states == {}
    with pytest.raises(DiffprobeError, match="unconditional"):
        model.encode_prompt(["a"], negative="")
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


def test_stop_early_equals_full_forward(model):
    x_t, t = noisy_pixels(model)
    cond = model.encode_prompt(["", ""])
    sites = ["unet.down_blocks.0.resnets.1", "unet.mid_block"]
    with diffprobe.capture(model, sites) as full:
        assert model.denoise(x_t, t, cond).shape == x_t.shape
    ran_after = []
    handle = model.pipe.unet.conv_out.register_forward_hook(lambda *a: ran_after.append(1))
    try:
        with diffprobe.capture(model, sites, stop_early=True) as early:
            assert model.denoise(x_t, t, cond) is None
    finally:
        handle.remove()
    assert not ran_after
    for site in sites:
        assert torch.equal(early.last(site), full.last(site))


def test_capture_equals_hand_written_forward_hook(model):
    x_t, t = noisy_pixels(model)
    unet = model.pipe.unet
    modules = {
        "unet.down_blocks.1": unet.down_blocks[1],
        "unet.down_blocks.1.attentions.0": unet.down_blocks[1].attentions[0],
        "unet.mid_block": unet.mid_block,
        "unet.up_blocks.0.resnets.2": unet.up_blocks[0].resnets[2],
    }
    seen = {}
    handles = [
        module.register_forward_hook(
            lambda mod, args, out, site=site: seen.__setitem__(
                site, (out if isinstance(out, torch.Tensor) else out[0]).clone()
            )
        )
        for site, module in modules.items()
    ]
    try:
        with diffprobe.capture(model, list(modules)) as cache:
            model.denoise(x_t, t, model.encode_prompt(["", ""]))
    finally:
        for handle in handles:
            handle.remove()
    for site in modules:
        assert torch.equal(cache.last(site), seen[site]), site
    assert cache.last("unet.mid_block").shape == (2, 64, 16, 16)


def test_add_noise_matches_ddpm_formula(model):
    from diffusers import DDPMScheduler

    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
    x0 = model.encode_images(images)
    assert torch.equal(x0, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    noisy, timesteps = model.add_noise(x0, noise_level=0.5, seed=11, items=[2, 3, 4])
    assert timesteps.tolist() == [500.0] * 3
    schedule = DDPMScheduler.from_config(model.pipe.scheduler.config)
    noise = torch.stack(
        [
            torch.randn(
                x0.shape[1:],
                generator=torch.Generator().manual_seed(
                    int(np.random.SeedSequence([11, i]).generate_state(1)[0])
                ),
            )
            for i in (2, 3, 4)
        ]
    )
    assert torch.equal(noisy, schedule.add_noise(x0, noise, torch.tensor([500, 500, 500])))
    # items are independent of the batch they come in
    alone, _ = model.add_noise(x0[1:2], noise_level=0.5, seed=11, items=[3])
    assert torch.equal(alone[0], noisy[1])
