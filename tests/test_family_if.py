"""DeepFloyd IF (stage I) adapter on a tiny random IFPipeline: parity with the plain pipeline,
CFG branches, early stop, hand-written hooks, noise, prompt encoding, the noise/variance split."""

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe import Edit
from diffprobe.models.base import _concat
from diffprobe.models.deepfloyd_if import IFModel
from diffprobe.testing.deepfloyd_if import dummy_if_pipeline

PROMPTS = ["A Red Circle ", "a blue square on white"]
SITES = [
    "unet:input",
    "unet.down_blocks.1",
    "unet.down_blocks.1.attentions.0",
    "unet.down_blocks.0.resnets.0",
    "unet.mid_block",
    "unet.up_blocks.0.attentions.1",
    "unet.up_blocks.1:input",
    "text_encoder.encoder.block.2",
]
UNET_SITES = SITES[1:7]


@pytest.fixture(scope="module")
def model():
    model = diffprobe.from_pipeline(dummy_if_pipeline(seed=0))
    assert isinstance(model, IFModel) and model.family == "if"
    return model


def plain(pipe, guidance_scale, steps=2, seed=0):
    """The pipeline called directly, no diffprobe (clean_caption=False: bs4/ftfy may be absent
    and diffprobe uses the uncleaned text everywhere)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        prompt=PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generator,
        height=32,
        width=32,
        output_type="np",
        clean_caption=False,
    ).images


def noisy_pixels(model, t=500):
    pixels = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    return model.add_noise(model.encode_images(pixels), timestep=t, seed=1)


def test_geometry(model):
    assert model.resolution == 32 and model.size_multiple() == 2
    assert model.generation_uses_cfg(7.0) and not model.generation_uses_cfg(1.0)


def test_generate_with_hooks_equals_plain_pipeline_cfg(model):
    reference = plain(model.pipe, guidance_scale=5.0)
    with diffprobe.capture(model, SITES) as cache:
        images = model.generate(PROMPTS, steps=2, guidance_scale=5.0, seed=0)
    assert images.shape == (2, 32, 32, 3)
    assert np.array_equal(images, reference)

    mid = cache.records("unet.mid_block")
    assert [(r.call, r.branch) for r in mid] == [
        (0, "uncond"),
        (0, "cond"),
        (1, "uncond"),
        (1, "cond"),
    ]
    # T5 runs twice outside the denoiser (prompt, then the "" negative prompt)
    text = cache.records("text_encoder.encoder.block.2")
    assert [(r.call, r.branch) for r in text] == [(None, "none"), (None, "none")]
    assert text[0].value.shape == (2, 77, 32)

    # each half equals a denoiser run on that branch's inputs alone (doubled to the CFG batch
    # size so that CPU kernels block the work the same way and the comparison is bitwise)
    x_t = cache.records("unet:input", branch="cond", call=1)[0]
    conditioning = model.encode_prompt(PROMPTS, negative="")
    for branch, kwargs in [("cond", conditioning.cond), ("uncond", conditioning.uncond)]:
        doubled = diffprobe.Conditioning(_concat(kwargs, kwargs), None, PROMPTS * 2)
        with diffprobe.capture(model, UNET_SITES) as same_batch:
            model.denoise(torch.cat([x_t.value, x_t.value]), x_t.timestep, doubled)
        with diffprobe.capture(model, UNET_SITES) as alone:
            model.denoise(x_t.value, x_t.timestep, diffprobe.Conditioning(kwargs, None, PROMPTS))
        for site in UNET_SITES:
            expected = cache.records(site, branch=branch, call=1)[0].value
            assert torch.equal(same_batch.last(site)[: len(PROMPTS)], expected), (site, branch)
            torch.testing.assert_close(alone.last(site), expected, rtol=1e-4, atol=1e-4)


def test_edit_with_zero_is_bit_identical(model):
    reference = plain(model.pipe, guidance_scale=5.0)
    with diffprobe.edit(model, [Edit(site, "add", value=0.0) for site in SITES]):
        images = model.generate(PROMPTS, steps=2, guidance_scale=5.0, seed=0)
    assert np.array_equal(images, reference)


def test_generate_without_cfg(model):
    reference = plain(model.pipe, guidance_scale=1.0, steps=1)
    with diffprobe.capture(model, ["unet.mid_block"]) as cache:
        images = model.generate(PROMPTS, steps=1, guidance_scale=1.0, seed=0)
    assert np.array_equal(images, reference)
    assert [r.branch for r in cache.records("unet.mid_block")] == ["none"]


def test_denoise_returns_the_noise_channels(model):
    x_t, t = noisy_pixels(model)
    conditioning = model.encode_prompt(PROMPTS, negative="")
    unet = model.pipe.unet
    with torch.no_grad():
        full = unet(x_t, t, encoder_hidden_states=conditioning.cond["encoder_hidden_states"]).sample
        doubled = unet(
            torch.cat([x_t, x_t]),
            torch.cat([t, t]),
            encoder_hidden_states=torch.cat(
                [
                    conditioning.uncond["encoder_hidden_states"],
                    conditioning.cond["encoder_hidden_states"],
                ]
            ),
        ).sample
    assert full.shape[1] == 6
    assert torch.equal(model.denoise(x_t, t, conditioning), full[:, :3])
    uncond, cond = doubled[:, :3].chunk(2)
    assert torch.equal(
        model.denoise(x_t, t, conditioning, guidance_scale=4.0), uncond + 4.0 * (cond - uncond)
    )


def test_stop_early_equals_full_forward(model):
    x_t, t = noisy_pixels(model)
    cond = model.encode_prompt(PROMPTS, negative="")
    sites = ["unet.down_blocks.1.attentions.0", "unet.mid_block"]
    with diffprobe.capture(model, sites) as full:
        assert model.denoise(x_t, t, cond, guidance_scale=5.0).shape == x_t.shape
    ran_after = []
    handle = model.pipe.unet.conv_out.register_forward_hook(lambda *a: ran_after.append(1))
    try:
        with diffprobe.capture(model, sites, stop_early=True) as early:
            assert model.denoise(x_t, t, cond, guidance_scale=5.0) is None
    finally:
        handle.remove()
    assert not ran_after
    for site in sites:
        for branch in ("uncond", "cond"):
            assert torch.equal(early.last(site, branch), full.last(site, branch))


def test_capture_equals_hand_written_forward_hook(model):
    x_t, t = noisy_pixels(model)
    unet = model.pipe.unet
    modules = {
        "unet.down_blocks.1": unet.down_blocks[1],
        "unet.down_blocks.1.attentions.0": unet.down_blocks[1].attentions[0],
        "unet.mid_block": unet.mid_block,
        "text_encoder.encoder.block.3": model.pipe.text_encoder.encoder.block[3],
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
            model.denoise(x_t, t, model.encode_prompt(PROMPTS))
    finally:
        for handle in handles:
            handle.remove()
    for site in modules:
        assert torch.equal(cache.last(site), seen[site]), site


def test_add_noise_matches_ddpm_formula(model):
    from diffusers import DDPMScheduler

    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
    x0 = model.encode_images(images)
    assert torch.equal(x0, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    noisy, timesteps = model.add_noise(x0, noise_level=0.25, seed=3, items=[1, 0, 5])
    assert timesteps.tolist() == [250.0] * 3
    schedule = DDPMScheduler.from_config(model.pipe.scheduler.config)
    noise = torch.stack(
        [
            torch.randn(
                x0.shape[1:],
                generator=torch.Generator().manual_seed(
                    int(np.random.SeedSequence([3, i]).generate_state(1)[0])
                ),
            )
            for i in (1, 0, 5)
        ]
    )
    assert torch.equal(noisy, schedule.add_noise(x0, noise, torch.tensor([250, 250, 250])))


def test_encode_prompt_equals_pipeline(model):
    pipe = model.pipe
    cond, uncond = pipe.encode_prompt(PROMPTS, negative_prompt=["", ""])
    conditioning = model.encode_prompt(PROMPTS, negative="")
    assert torch.equal(conditioning.cond["encoder_hidden_states"], cond)
    assert torch.equal(conditioning.uncond["encoder_hidden_states"], uncond)
    only, none = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert none is None and model.encode_prompt(PROMPTS).uncond is None
    assert torch.equal(model.encode_prompt(PROMPTS).cond["encoder_hidden_states"], only)

    # encode_text: T5's last hidden state (after the final layer norm) is the conditioning
    text = model.encode_text(PROMPTS)
    states = text.hidden_states["text_encoder"]
    assert len(states) == 6  # embeddings + 5 blocks
    assert torch.equal(states[-1], cond)
    assert text.attention_mask["text_encoder"].shape == (2, 77)
    assert text.attention_mask["text_encoder"][0].sum() < 77  # padding is masked
