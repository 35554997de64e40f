"""FLUX adapter on tiny random FluxPipelines ("schnell"-like and "dev"-like): parity with the
plain pipeline, true-CFG branches, early stop, hand-written hooks, packing, the noise formula
and the pipeline's inputs."""

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe import Edit
from diffprobe.models.flux import FluxModel
from diffprobe.testing.flux import dummy_flux_pipeline

PROMPTS = ["a red circle", "a blue square"]
SITES = [
    "transformer.transformer_blocks.0",
    "transformer.transformer_blocks.1:encoder_hidden_states",
    "transformer.transformer_blocks.0.attn",
    "transformer.single_transformer_blocks.0",
    "transformer.single_transformer_blocks.1:encoder_hidden_states",
    "transformer.single_transformer_blocks.1:input",
    "text_encoder.encoder.layers.3",
    "text_encoder_2.encoder.block.1",
]
DENOISER_SITES = [s for s in SITES if s.startswith("transformer.")]


@pytest.fixture(scope="module")
def schnell():
    return diffprobe.from_pipeline(dummy_flux_pipeline(seed=0))


@pytest.fixture(scope="module")
def dev():
    return diffprobe.from_pipeline(dummy_flux_pipeline(seed=1, guidance_embeds=True))


def plain(pipe, **kwargs):
    return pipe(
        prompt=PROMPTS,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(0),
        height=32,
        width=32,
        output_type="np",
        **kwargs,
    ).images


@pytest.fixture(scope="module")
def latents(schnell):
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x0 = schnell.encode_images(images)
    x_t, t = schnell.add_noise(x0, noise_level=0.6, seed=3)
    return x0, x_t, t


def pack(latents):
    """2 x 2 patches -> tokens, written out: token (i, j) holds channels c * 4 + 2 di + dj."""
    items, channels, height, width = latents.shape
    patches = latents.reshape(items, channels, height // 2, 2, width // 2, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(items, height * width // 4, channels * 4)


def unpack(tokens, height, width):
    items, _, packed = tokens.shape
    patches = tokens.reshape(items, height // 2, width // 2, packed // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(items, packed // 4, height, width)


def image_ids(height, width):
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()


def test_adapter_geometry(schnell, latents):
    assert isinstance(schnell, FluxModel) and schnell.flow_matching
    assert schnell.resolution == 32 and schnell.size_multiple() == 4
    assert latents[0].shape == (2, 4, 16, 16)  # unpacked
    assert not schnell.generation_uses_cfg(7.0)


def test_generate_with_captures_equals_pipeline(schnell):
    # schnell's adapter uses 256 T5 tokens (the pipeline's default is 512)
    assert schnell.max_sequence_length == 256
    reference = plain(schnell.pipe, guidance_scale=5.0, max_sequence_length=256)
    with diffprobe.capture(schnell, SITES) as cache:
        images = schnell.generate(PROMPTS, steps=2, guidance_scale=5.0, seed=0, size=32)
    np.testing.assert_array_equal(images, reference)
    for site in DENOISER_SITES:
        records = cache.records(site)
        assert [(r.call, r.branch) for r in records] == [(0, "none"), (1, "none")]
        assert records[0].value.shape[0] == len(PROMPTS)
    assert cache.last("transformer.transformer_blocks.0").shape == (2, 64, 32)
    text_tokens = cache.last("transformer.single_transformer_blocks.1:encoder_hidden_states")
    assert text_tokens.shape == (2, 256, 32)
    # the transformer receives sigma, so that is the timestep the engine records
    assert cache.records("transformer.transformer_blocks.0")[0].timestep == 1.0

    edits = [Edit(site, "add", value=0.0) for site in SITES]
    with diffprobe.edit(schnell, edits):
        images = schnell.generate(PROMPTS, steps=2, guidance_scale=5.0, seed=0, size=32)
    np.testing.assert_array_equal(images, reference)


def test_true_cfg_calls_are_labelled_and_equal_pipeline(dev):
    cfg = dict(guidance_scale=3.0, true_cfg_scale=2.5, negative_prompt="")
    reference = plain(dev.pipe, **cfg)
    sites = [*DENOISER_SITES, "transformer:input"]
    with diffprobe.capture(dev, sites) as cache:
        images = dev.generate(PROMPTS, steps=2, seed=0, size=32, **cfg)
    np.testing.assert_array_equal(images, reference)
    for site in sites:
        assert [(r.call, r.branch) for r in cache.records(site)] == [
            (0, "cond"),
            (1, "uncond"),
            (2, "cond"),
            (3, "uncond"),
        ]
    assert dev.branch_layout is None

    # the conditional call of step 1 is model.denoise on the same inputs
    x_t = unpack(cache.records("transformer:input", branch="cond")[1].value, 16, 16)
    t = dev.pipe.scheduler.timesteps[1].expand(len(PROMPTS))
    cond = dev.encode_prompt(PROMPTS)
    with diffprobe.capture(dev, DENOISER_SITES) as alone:
        dev.denoise(x_t, t, cond, embedded_guidance=3.0)
    for site in DENOISER_SITES:
        torch.testing.assert_close(
            alone.last(site), cache.records(site, branch="cond")[1].value, rtol=0, atol=0
        )

    # a branch edit touches only the calls of that branch
    site = "transformer.single_transformer_blocks.0"
    with diffprobe.edit(dev, Edit(site, "add", value=0.0, branch="uncond")):
        np.testing.assert_array_equal(
            dev.generate(PROMPTS, steps=2, seed=0, size=32, **cfg), reference
        )
    with diffprobe.edit(dev, Edit(site, "add", value=1.0, branch="uncond")):
        with diffprobe.capture(dev, site) as edited:
            dev.generate(PROMPTS, steps=2, seed=0, size=32, **cfg)
    first_cond, first_uncond = edited.records(site)[:2]
    torch.testing.assert_close(
        first_cond.value, cache.records(site, call=0)[0].value, rtol=0, atol=0
    )
    torch.testing.assert_close(
        first_uncond.value, cache.records(site, call=1)[0].value + 1.0, rtol=0, atol=0
    )


def test_stop_early_equals_full_forward(dev, latents):
    _, x_t, t = latents
    cond = dev.encode_prompt(PROMPTS, negative="")
    sites = [
        "transformer.transformer_blocks.0",
        "transformer.transformer_blocks.1:encoder_hidden_states",
    ]
    later = []
    handle = dev.pipe.transformer.single_transformer_blocks[0].register_forward_hook(
        lambda *args: later.append(1)
    )
    try:
        with diffprobe.capture(dev, sites, stop_early=True) as early:
            assert dev.denoise(x_t, t, cond, guidance_scale=4.0) is None
        assert not later
    finally:
        handle.remove()
    with diffprobe.capture(dev, sites) as full:
        assert dev.denoise(x_t, t, cond, guidance_scale=4.0) is not None
    for site in sites:
        for branch in ("cond", "uncond"):  # both true-CFG calls ran up to the stop
            torch.testing.assert_close(
                early.last(site, branch), full.last(site, branch), rtol=0, atol=0
            )


def test_capture_equals_forward_hook(schnell, latents):
    _, x_t, t = latents
    cond = schnell.encode_prompt(PROMPTS)
    transformer, seen = schnell.pipe.transformer, {}
    hooks = [
        transformer.transformer_blocks[1].register_forward_hook(
            lambda m, a, out: seen.update(text=out[0])
        ),
        transformer.single_transformer_blocks[0].register_forward_hook(
            lambda m, a, out: seen.update(single=out[1])
        ),
        transformer.transformer_blocks[0].attn.register_forward_hook(
            lambda m, a, out: seen.update(attn=out[0])
        ),
    ]
    try:
        with diffprobe.capture(schnell, DENOISER_SITES[:4]) as cache:
            schnell.denoise(x_t, t, cond)
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(cache.last(DENOISER_SITES[1]), seen["text"], rtol=0, atol=0)
    torch.testing.assert_close(cache.last(DENOISER_SITES[2]), seen["attn"], rtol=0, atol=0)
    torch.testing.assert_close(cache.last(DENOISER_SITES[3]), seen["single"], rtol=0, atol=0)


def test_add_noise_formula(schnell, latents):
    x0 = latents[0]
    x_t, t = schnell.add_noise(x0, noise_level=0.3, seed=7, items=[3, 5])
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


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_denoise_equals_direct_transformer_call(variant, request, latents):
    model = request.getfixturevalue(variant)
    _, x_t, t = latents
    pipe = model.pipe
    with torch.no_grad():
        tokens = model.max_sequence_length
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=tokens)
        negative, negative_pooled, _ = pipe.encode_prompt(["", ""], max_sequence_length=tokens)

        def run(text, pooled_text):
            guidance = torch.full([2], 2.0) if variant == "dev" else None
            out = pipe.transformer(
                hidden_states=pack(x_t),
                timestep=t / 1000,
                guidance=guidance,
                pooled_projections=pooled_text,
                encoder_hidden_states=text,
                txt_ids=text_ids,
                img_ids=image_ids(16, 16),
                return_dict=False,
            )[0]
            return unpack(out, 16, 16)

        cond_pred, uncond_pred = run(embeds, pooled), run(negative, negative_pooled)
    cond = model.encode_prompt(PROMPTS, negative="")
    torch.testing.assert_close(
        model.denoise(x_t, t, cond, embedded_guidance=2.0), cond_pred, rtol=0, atol=0
    )
    torch.testing.assert_close(
        model.denoise(x_t, t, cond, guidance_scale=4.0, embedded_guidance=2.0),
        uncond_pred + 4.0 * (cond_pred - uncond_pred),
        rtol=0,
        atol=0,
    )


def test_encode_prompt_and_text_equal_pipeline(schnell):
    ours = schnell.encode_prompt(PROMPTS, negative="")
    with torch.no_grad():  # as in the pipeline's __call__
        embeds, pooled, _ = schnell.pipe.encode_prompt(PROMPTS, max_sequence_length=256)
        negative, negative_pooled, _ = schnell.pipe.encode_prompt("", max_sequence_length=256)
    torch.testing.assert_close(ours.cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.cond["pooled_projections"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(
        ours.uncond["encoder_hidden_states"], negative.expand(2, -1, -1), rtol=0, atol=0
    )
    torch.testing.assert_close(
        ours.uncond["pooled_projections"], negative_pooled.expand(2, -1), rtol=0, atol=0
    )
    text = schnell.encode_text(PROMPTS)
    assert [len(text.hidden_states[k]) for k in ("text_encoder", "text_encoder_2")] == [6, 3]
    torch.testing.assert_close(text.hidden_states["text_encoder_2"][-1], embeds, rtol=0, atol=0)
    with diffprobe.capture(schnell, "text_encoder.encoder.layers.3") as cache:
        schnell.encode_text(PROMPTS)
    torch.testing.assert_close(
        cache.last("text_encoder.encoder.layers.3"),
        text.hidden_states["text_encoder"][4],
        rtol=0,
        atol=0,
    )
