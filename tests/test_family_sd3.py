"""What is SD3's own (the shared contract is in tests/test_conformance.py): the joint text
tokens and the timestep the transformer receives, the skip-layer-guidance pass, the sampler's
schedule against the noise formula, the prompt encoding, the context_pre_only last block."""

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe import DiffprobeError
from diffprobe.models.sd3 import StableDiffusion3Model
from diffprobe.testing.sd3 import dummy_sd3_pipeline

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def model():
    model = diffprobe.from_pipeline(dummy_sd3_pipeline(seed=0))
    assert isinstance(model, StableDiffusion3Model) and model.flow_matching
    return model


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
def latents(model):
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x0 = model.encode_images(images)
    x_t, t = model.add_noise(x0, noise_level=0.6, seed=3)
    return x0, x_t, t


def test_text_tokens_and_timesteps_the_transformer_receives(model):
    sites = ["transformer.transformer_blocks.1:encoder_hidden_states",
             "transformer.transformer_blocks.0"]  # fmt: skip
    with diffprobe.capture(model, sites) as cache:
        model.generate(PROMPTS, steps=2, guidance_scale=5.0, seed=0, size=32)
    # 77 CLIP tokens and 256 T5 tokens (the pipeline's max_sequence_length), joint width 32
    assert cache.last(sites[0], "cond").shape == (2, 77 + 256, 32)
    assert cache.records(sites[1])[0].timestep == 1000.0  # sigma 1 at the first step


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


def model_noise(x0):
    return torch.randn(
        x0.shape[1:],
        generator=torch.Generator().manual_seed(
            int(np.random.SeedSequence([0, 0]).generate_state(1)[0])
        ),
    )[None]


def test_add_noise_is_the_schedulers_own_forward_process(model, latents):
    x0 = latents[0]
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
