"""SD3 / SD3.5 adapter on a tiny random StableDiffusion3Pipeline: parity with the plain pipeline,
CFG branches, early stop, hand-written hooks, the noise formula and the pipeline's inputs."""

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe import DiffprobeError, Edit
from diffprobe.models.sd3 import StableDiffusion3Model
from diffprobe.testing.sd3 import dummy_sd3_pipeline

PROMPTS = ["a red circle", "a blue square"]
SITES = [
    "transformer.transformer_blocks.0",
    "transformer.transformer_blocks.1",
    "transformer.transformer_blocks.1:encoder_hidden_states",
    "transformer.transformer_blocks.0.attn",
    "transformer.transformer_blocks.2:input",
    "text_encoder.text_model.encoder.layers.3",
    "text_encoder_3.encoder.block.1",
]
DENOISER_SITES = [s for s in SITES if s.startswith("transformer.")]


@pytest.fixture(scope="module")
def model():
    return diffprobe.from_pipeline(dummy_sd3_pipeline(seed=0))


def plain(pipe, steps=2, guidance_scale=5.0, **kwargs):
    return pipe(
        prompt=PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(0),
        height=32,
        width=32,
        output_type="np",
        **kwargs,
    ).images


@pytest.fixture(scope="module")
def reference(model):
    return plain(model.pipe)


@pytest.fixture(scope="module")
def latents(model):
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x0 = model.encode_images(images)
    x_t, t = model.add_noise(x0, noise_level=0.6, seed=3)
    return x0, x_t, t


def test_adapter_geometry(model):
    assert isinstance(model, StableDiffusion3Model) and model.flow_matching
    assert model.resolution == 32 and model.size_multiple() == 4
    with pytest.raises(diffprobe.DiffprobeError, match="multiple of 4"):
        model.check_size(30)


def test_generate_with_captures_equals_pipeline(model, reference):
    with diffprobe.capture(model, [*SITES, "transformer:input"]) as cache:
        images = model.generate(PROMPTS, steps=2, guidance_scale=5.0, seed=0, size=32)
    np.testing.assert_array_equal(images, reference)
    for site in DENOISER_SITES:
        records = cache.records(site)
        assert [r.branch for r in records] == ["uncond", "cond"] * 2
        assert [r.call for r in records] == [0, 0, 1, 1]
        assert all(r.value.shape[0] == len(PROMPTS) for r in records)
    assert cache.last("transformer.transformer_blocks.1:encoder_hidden_states", "cond").shape == (
        2,
        77 + 256,
        32,
    )
    assert {r.call for r in cache.records("text_encoder_3.encoder.block.1")} == {None}
    assert cache.records("transformer.transformer_blocks.0")[0].timestep == 1000.0

    # the cond half of the CFG batch is what the denoiser computes on the cond inputs alone
    x_t = cache.records("transformer:input", branch="cond", call=1)[0].value
    timestep = cache.records("transformer:input", branch="cond", call=1)[0].timestep
    cond = model.encode_prompt(PROMPTS)
    with diffprobe.capture(model, DENOISER_SITES) as alone:
        model.denoise(x_t, timestep, cond)
    for site in DENOISER_SITES:
        torch.testing.assert_close(
            alone.last(site),
            cache.records(site, branch="cond", call=1)[0].value,
            rtol=1e-5,
            atol=1e-6,
        )
        assert alone.last(site).shape[0] == len(PROMPTS)


def test_edit_add_zero_equals_pipeline(model, reference):
    edits = [Edit(site, "add", value=0.0) for site in SITES]
    with diffprobe.edit(model, edits):
        images = model.generate(PROMPTS, steps=2, guidance_scale=5.0, seed=0, size=32)
    np.testing.assert_array_equal(images, reference)


def test_skip_layer_guidance_pass_is_its_own_branch(model):
    kwargs = dict(
        skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0
    )
    reference = plain(model.pipe, **kwargs)
    site = "transformer.transformer_blocks.0"
    with diffprobe.capture(model, site) as cache:
        images = model.generate(PROMPTS, steps=2, guidance_scale=5.0, seed=0, size=32, **kwargs)
    np.testing.assert_array_equal(images, reference)
    assert [r.branch for r in cache.records(site)] == ["uncond", "cond", "uncond", "cond", "none"]
    assert model.branch_layout is None


def test_stop_early_equals_full_forward(model, latents):
    _, x_t, t = latents
    cond = model.encode_prompt(PROMPTS, negative="")
    sites = [
        "transformer.transformer_blocks.0",
        "transformer.transformer_blocks.0:encoder_hidden_states",
    ]
    later = []
    handle = model.pipe.transformer.transformer_blocks[1].register_forward_hook(
        lambda *args: later.append(1)
    )
    try:
        with diffprobe.capture(model, sites, stop_early=True) as early:
            assert model.denoise(x_t, t, cond, guidance_scale=4.0) is None
        assert not later  # the forward stopped after block 0
    finally:
        handle.remove()
    with diffprobe.capture(model, sites) as full:
        assert model.denoise(x_t, t, cond, guidance_scale=4.0) is not None
    for site in sites:
        for branch in ("uncond", "cond"):
            torch.testing.assert_close(
                early.last(site, branch), full.last(site, branch), rtol=0, atol=0
            )


def test_capture_equals_forward_hook(model, latents):
    _, x_t, t = latents
    cond = model.encode_prompt(PROMPTS)
    seen = {}
    block = model.pipe.transformer.transformer_blocks[1]
    hooks = [
        block.register_forward_hook(lambda m, a, out: seen.update(text=out[0], image=out[1])),
        model.pipe.transformer.transformer_blocks[0].attn.register_forward_hook(
            lambda m, a, out: seen.update(attn=out[0])
        ),
    ]
    try:
        with diffprobe.capture(model, SITES[1:4]) as cache:
            model.denoise(x_t, t, cond)
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(cache.last(SITES[1]), seen["image"], rtol=0, atol=0)
    torch.testing.assert_close(cache.last(SITES[2]), seen["text"], rtol=0, atol=0)
    torch.testing.assert_close(cache.last(SITES[3]), seen["attn"], rtol=0, atol=0)


def test_add_noise_formula_and_schedule(model, latents):
    x0 = latents[0]
    x_t, t = model.add_noise(x0, noise_level=0.3, seed=7, items=[3, 5])
    noise = torch.stack(
        [
            torch.randn(
                x0.shape[1:],
                generator=torch.Generator().manual_seed(
                    int(np.random.SeedSequence([7, i]).generate_state(1)[0])
                ),
            )
            for i in (3, 5)
        ]
    )
    torch.testing.assert_close(x_t, (1 - 0.3) * x0 + 0.3 * noise, rtol=0, atol=0)
    assert t.tolist() == [300.0, 300.0]
    # the sampler's shift picks the sigmas it visits; timestep = sigma * 1000 throughout, and
    # the scheduler's own forward process at a visited timestep is add_noise at p = sigma
    scheduler = model.pipe.scheduler
    scheduler.set_timesteps(4)
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)
    sigma, timestep = float(scheduler.sigmas[1]), scheduler.timesteps[1:2]
    ours, _ = model.add_noise(x0[:1], timestep=float(timestep), seed=0)
    reference = scheduler.scale_noise(x0[:1], timestep, noise=model_noise(x0))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert model.timestep_for(sigma) == pytest.approx(float(timestep), rel=1e-6)


def model_noise(x0):
    return torch.randn(
        x0.shape[1:],
        generator=torch.Generator().manual_seed(
            int(np.random.SeedSequence([0, 0]).generate_state(1)[0])
        ),
    )[None]


def test_denoise_equals_direct_transformer_call(model, latents):
    _, x_t, t = latents
    pipe = model.pipe
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=True
        )
        cond_pred = pipe.transformer(
            hidden_states=x_t,
            timestep=t,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        both = pipe.transformer(
            hidden_states=torch.cat([x_t, x_t]),
            timestep=torch.cat([t, t]),
            encoder_hidden_states=torch.cat([negative, embeds]),
            pooled_projections=torch.cat([negative_pooled, pooled]),
            return_dict=False,
        )[0]
    uncond_pred, text_pred = both.chunk(2)
    cond = model.encode_prompt(PROMPTS, negative="")
    torch.testing.assert_close(model.denoise(x_t, t, cond), cond_pred, rtol=0, atol=0)
    torch.testing.assert_close(
        model.denoise(x_t, t, cond, guidance_scale=4.0),
        uncond_pred + 4.0 * (text_pred - uncond_pred),
        rtol=0,
        atol=0,
    )


def test_encode_prompt_and_text_equal_pipeline(model):
    ours = model.encode_prompt(PROMPTS, negative="")
    # under no_grad, as in the pipeline's __call__ (T5 attention rounds differently with grad on)
    with torch.no_grad():
        theirs = model.pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    for value, expected in zip(
        [
            ours.cond["encoder_hidden_states"],
            ours.uncond["encoder_hidden_states"],
            ours.cond["pooled_projections"],
            ours.uncond["pooled_projections"],
        ],
        theirs,
        strict=True,
    ):
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    text = model.encode_text(PROMPTS)
    assert [
        len(text.hidden_states[k]) for k in ("text_encoder", "text_encoder_2", "text_encoder_3")
    ] == [6, 6, 3]
    # the prompt embedding is built from the penultimate CLIP layers and T5's output
    clip = torch.cat(
        [text.hidden_states["text_encoder"][-2], text.hidden_states["text_encoder_2"][-2]], -1
    )
    embeds = ours.cond["encoder_hidden_states"]
    torch.testing.assert_close(embeds[:, :77, : clip.shape[-1]], clip, rtol=0, atol=0)
    assert not embeds[:, :77, clip.shape[-1] :].any()
    torch.testing.assert_close(
        embeds[:, 77:], text.hidden_states["text_encoder_3"][-1], rtol=0, atol=0
    )


def test_context_pre_only_text_tokens_error(model, latents):
    _, x_t, t = latents
    cond = model.encode_prompt(PROMPTS)
    block = model.pipe.transformer.transformer_blocks[2]
    assert block.context_pre_only
    with pytest.raises(DiffprobeError, match="transformer_blocks.2:encoder_hidden_states"):
        with diffprobe.capture(model, "transformer.transformer_blocks.2:encoder_hidden_states"):
            model.denoise(x_t, t, cond)
    assert not block._forward_hooks and not model.pipe.transformer._forward_pre_hooks


def test_sd35_variant_parity():
    pipe = dummy_sd3_pipeline(seed=1, variant="3.5")
    model = diffprobe.from_pipeline(pipe)
    reference = plain(pipe)
    sites = [
        "transformer.transformer_blocks.0",
        "transformer.transformer_blocks.0.attn2",
        "transformer.transformer_blocks.1:encoder_hidden_states",
    ]
    with diffprobe.capture(model, sites) as cache:
        images = model.generate(PROMPTS, steps=2, guidance_scale=5.0, seed=0, size=32)
    np.testing.assert_array_equal(images, reference)
    assert [r.branch for r in cache.records(sites[1])] == ["uncond", "cond"] * 2
