"""SDXL adapter on a tiny random StableDiffusionXLPipeline: parity with the plain pipeline,
CFG branches, early stop, hand-written hooks, noise, prompt encoding, tuple elements."""

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe import DiffprobeError, Edit
from diffprobe.models.base import _concat
from diffprobe.models.sdxl import StableDiffusionXLModel
from diffprobe.testing.sdxl import dummy_sdxl_pipeline

PROMPTS = ["a red circle", "a blue square on white"]
SITES = [
    "unet:input",
    "unet.down_blocks.1",
    "unet.down_blocks.1.attentions.0",
    "unet.down_blocks.0.resnets.1",
    "unet.mid_block",
    "unet.up_blocks.0.attentions.1",
    "unet.up_blocks.1:input",
    "text_encoder.encoder.layers.2",
    "text_encoder_2.text_model.encoder.layers.4",
]


@pytest.fixture(scope="module")
def model():
    model = diffprobe.from_pipeline(dummy_sdxl_pipeline(seed=0))
    assert isinstance(model, StableDiffusionXLModel)
    return model


def plain(pipe, guidance_scale, steps=2, seed=0):
    """The pipeline called directly, no diffprobe."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        prompt=PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generator,
        height=64,
        width=64,
        output_type="np",
    ).images


def noisy_latents(model, t=500):
    pixels = torch.linspace(-1, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
    x_t, timesteps = model.add_noise(model.encode_images(pixels), timestep=t, seed=1)
    return x_t, timesteps


def test_geometry(model):
    assert model.resolution == 64 and model.size_multiple() == 8
    with pytest.raises(diffprobe.DiffprobeError, match="multiple of 8"):
        model.check_size(60)
    assert model.generation_uses_cfg(5.0) and not model.generation_uses_cfg(1.0)


def test_generate_with_hooks_equals_plain_pipeline_cfg(model):
    reference = plain(model.pipe, guidance_scale=5.0)
    with diffprobe.capture(model, SITES) as cache:
        images = model.generate(PROMPTS, steps=2, guidance_scale=5.0, seed=0, size=64)
    assert np.array_equal(images, reference)

    # the CFG batch [uncond, cond] is split into halves, one pair per denoiser call
    mid = cache.records("unet.mid_block")
    assert [(r.call, r.branch) for r in mid] == [
        (0, "uncond"),
        (0, "cond"),
        (1, "uncond"),
        (1, "cond"),
    ]
    assert all(r.value.shape[0] == len(PROMPTS) for r in mid)
    # text encoders run outside denoiser calls: one record, no branch
    text = cache.records("text_encoder.encoder.layers.2")
    assert [(r.call, r.branch) for r in text] == [(None, "none")]
    assert cache.last("text_encoder_2.text_model.encoder.layers.4").shape == (2, 77, 32)

    # the cond half equals a run of the denoiser on the cond inputs alone; the uncond half a
    # run on the pipeline's uncond inputs (zeros: force_zeros_for_empty_prompt). CPU kernels
    # block their work by batch size, so the inputs are doubled to the CFG batch size to make the
    # comparison bitwise; at the natural batch size they agree to float32 rounding.
    x_t = cache.records("unet:input", branch="cond", call=1)[0]
    assert torch.equal(x_t.value, cache.records("unet:input", branch="uncond", call=1)[0].value)
    conditioning = model.encode_prompt(PROMPTS, cfg=True)
    assert not conditioning.uncond["encoder_hidden_states"].any()
    sites = SITES[1:7]
    for branch, kwargs in [("cond", conditioning.cond), ("uncond", conditioning.uncond)]:
        doubled = diffprobe.Conditioning(_concat(kwargs, kwargs), None, PROMPTS * 2)
        with diffprobe.capture(model, sites) as same_batch:
            model.denoise(torch.cat([x_t.value, x_t.value]), x_t.timestep, doubled)
        with diffprobe.capture(model, sites) as alone:
            model.denoise(x_t.value, x_t.timestep, diffprobe.Conditioning(kwargs, None, PROMPTS))
        for site in sites:
            expected = cache.records(site, branch=branch, call=1)[0].value
            assert torch.equal(same_batch.last(site)[: len(PROMPTS)], expected), (site, branch)
            torch.testing.assert_close(alone.last(site), expected, rtol=1e-4, atol=1e-4)


def test_edit_with_zero_is_bit_identical(model):
    reference = plain(model.pipe, guidance_scale=5.0)
    edits = [Edit(site, "add", value=0.0) for site in SITES]
    with diffprobe.edit(model, edits):
        images = model.generate(PROMPTS, steps=2, guidance_scale=5.0, seed=0)
    assert np.array_equal(images, reference)


def test_turbo_style_generation_has_no_branches(model):
    # SDXL-Turbo samples with guidance_scale=0: no CFG, one record per call, branch "none"
    reference = plain(model.pipe, guidance_scale=0.0, steps=1)
    with diffprobe.capture(model, ["unet.mid_block"]) as cache:
        images = model.generate(PROMPTS, steps=1, guidance_scale=0.0, seed=0)
    assert np.array_equal(images, reference)
    assert [(r.call, r.branch, r.value.shape[0]) for r in cache.records("unet.mid_block")] == [
        (0, "none", 2)
    ]


def test_stop_early_equals_full_forward(model):
    x_t, t = noisy_latents(model)
    cond = model.encode_prompt(PROMPTS, negative="")
    sites = ["unet.down_blocks.1.attentions.0", "unet.mid_block"]
    with diffprobe.capture(model, sites) as full:
        prediction = model.denoise(x_t, t, cond, guidance_scale=5.0)
    assert prediction.shape == x_t.shape

    ran_after = []
    handle = model.pipe.unet.conv_out.register_forward_hook(lambda *a: ran_after.append(1))
    try:
        with diffprobe.capture(model, sites, stop_early=True) as early:
            assert model.denoise(x_t, t, cond, guidance_scale=5.0) is None
    finally:
        handle.remove()
    assert not ran_after  # the forward really stopped at the mid block
    for site in sites:
        for branch in ("uncond", "cond"):
            assert torch.equal(early.last(site, branch), full.last(site, branch))


def test_capture_equals_hand_written_forward_hook(model):
    x_t, t = noisy_latents(model)
    cond = model.encode_prompt(PROMPTS)
    unet = model.pipe.unet
    modules = {
        "unet.down_blocks.1": unet.down_blocks[1],
        "unet.down_blocks.1.attentions.0": unet.down_blocks[1].attentions[0],
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
            model.denoise(x_t, t, cond)
    finally:
        for handle in handles:
            handle.remove()
    for site in modules:
        assert torch.equal(cache.last(site), seen[site]), site
    assert cache.last("unet.down_blocks.1").shape == (2, 4, 16, 16)  # the hidden_states element


def test_add_noise_matches_ddpm_formula(model):
    from diffusers import DDPMScheduler

    x0 = model.encode_images(np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), np.uint8))
    assert x0.shape == (3, 4, 32, 32)
    pixels = model.prepare_images(
        np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), np.uint8)
    )
    mean = model.pipe.vae.encode(pixels).latent_dist.mean
    assert torch.equal(x0, mean * model.pipe.vae.config.scaling_factor)

    noisy, timesteps = model.add_noise(x0, noise_level=0.3, seed=7, items=[4, 9, 2])
    assert timesteps.tolist() == [300.0] * 3
    schedule = DDPMScheduler.from_config(model.pipe.scheduler.config)
    noise = torch.stack(
        [
            torch.randn(
                x0.shape[1:],
                generator=torch.Generator().manual_seed(
                    int(np.random.SeedSequence([7, i]).generate_state(1)[0])
                ),
            )
            for i in (4, 9, 2)
        ]
    )
    expected = schedule.add_noise(x0, noise, torch.tensor([300, 300, 300]))
    assert torch.equal(noisy, expected)
    assert model.timestep_for(1.0) == 999.0


def test_encode_prompt_equals_pipeline(model):
    pipe = model.pipe
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS)
        _, neg_empty, _, neg_pooled_empty = pipe.encode_prompt(PROMPTS, negative_prompt=["", ""])
    default = model.encode_prompt(PROMPTS, cfg=True)
    assert torch.equal(default.cond["encoder_hidden_states"], embeds)
    assert torch.equal(default.cond["added_cond_kwargs"]["text_embeds"], pooled)
    assert torch.equal(default.uncond["encoder_hidden_states"], neg)
    assert torch.equal(default.uncond["added_cond_kwargs"]["text_embeds"], neg_pooled)
    empty = model.encode_prompt(PROMPTS, negative="")
    assert torch.equal(empty.uncond["encoder_hidden_states"], neg_empty)
    assert torch.equal(empty.uncond["added_cond_kwargs"]["text_embeds"], neg_pooled_empty)
    assert model.encode_prompt(PROMPTS).uncond is None

    # encode_text: the penultimate layer of each encoder, concatenated, is the conditioning;
    # the pooled text_embeds is text_encoder_2's projected final-norm state at the EOS token
    text = model.encode_text(PROMPTS)
    first, second = text.hidden_states["text_encoder"], text.hidden_states["text_encoder_2"]
    assert len(first) == len(second) == 6  # embeddings + 5 layers
    assert torch.equal(torch.cat([first[-2], second[-2]], dim=-1), embeds)
    encoder_2 = pipe.text_encoder_2
    with torch.no_grad():
        normed = encoder_2.text_model.final_layer_norm(second[-1])
        eos = text.input_ids["text_encoder_2"].eq(pipe.tokenizer_2.eos_token_id).int().argmax(-1)
        projected = encoder_2.text_projection(normed[torch.arange(len(PROMPTS)), eos])
    torch.testing.assert_close(projected, pooled, rtol=1e-5, atol=1e-6)


def test_time_ids_follow_the_image_size(model):
    x_t = torch.zeros(2, 4, 24, 32)
    assert model.time_ids(x_t).tolist() == [[48, 64, 0, 0, 48, 64]] * 2
    cond = model.encode_prompt(PROMPTS).cond
    assert model.denoiser_kwargs(x_t, torch.zeros(2), cond)["added_cond_kwargs"][
        "time_ids"
    ].shape == (2, 6)


def test_tuple_elements(model):
    x_t, t = noisy_latents(model)
    cond = model.encode_prompt(PROMPTS)
    with diffprobe.capture(
        model, ["unet.down_blocks.1", "unet.down_blocks.1:hidden_states"]
    ) as cache:
        model.denoise(x_t, t, cond)
    assert torch.equal(
        cache.last("unet.down_blocks.1"), cache.last("unet.down_blocks.1:hidden_states")
    )
    with pytest.raises(DiffprobeError, match=r"res_samples.*tuple of 2 tensors"):
        with diffprobe.capture(model, ["unet.down_blocks.1:res_samples"]):
            model.denoise(x_t, t, cond)
    with pytest.raises(DiffprobeError, match=r"'skips'.*hidden_states, res_samples"):
        with diffprobe.capture(model, ["unet.down_blocks.1:skips"]):
            model.denoise(x_t, t, cond)
    # no hooks are left behind after the errors
    assert not model.pipe.unet.down_blocks[1]._forward_hooks


def test_float16_vae_encodes_in_float32():
    model = diffprobe.from_pipeline(dummy_sdxl_pipeline(seed=1))
    vae = model.pipe.vae
    assert vae.config.force_upcast
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), np.uint8)
    vae.to(dtype=torch.float16).to(dtype=torch.float32)  # the weights a float16 VAE holds
    expected = model.encode_images(images)
    vae.to(dtype=torch.float16)
    assert torch.equal(model.encode_images(images), expected)
    assert vae.dtype == torch.float16
