"""What is FLUX's own (the shared contract is in tests/test_conformance.py): the T5 length per
variant, packed token shapes and the sigma the transformer receives, a true-CFG call being
``denoise`` on its unpacked inputs, embedded guidance, the prompt encoding."""

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe.models.flux import FluxModel
from diffprobe.testing.flux import dummy_flux_pipeline, image_ids, pack, unpack

PROMPTS = ["a red circle", "a blue square"]
DENOISER_SITES = [
    "transformer.transformer_blocks.0",
    "transformer.transformer_blocks.1:encoder_hidden_states",
    "transformer.transformer_blocks.0.attn",
    "transformer.single_transformer_blocks.0",
    "transformer.single_transformer_blocks.1:encoder_hidden_states",
    "transformer.single_transformer_blocks.1:input",
]


@pytest.fixture(scope="module")
def schnell():
    model = diffprobe.from_pipeline(dummy_flux_pipeline(seed=0))
    assert isinstance(model, FluxModel) and model.flow_matching
    return model


@pytest.fixture(scope="module")
def dev():
    return diffprobe.from_pipeline(dummy_flux_pipeline(seed=1, guidance_embeds=True))


@pytest.fixture(scope="module")
def latents(schnell):
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x0 = schnell.encode_images(images)
    x_t, t = schnell.add_noise(x0, noise_level=0.6, seed=3)
    return x0, x_t, t


def test_t5_length_token_shapes_and_the_sigma_received(schnell, dev, latents):
    # schnell's adapter uses 256 T5 tokens (the pipeline's default is 512), dev 512
    assert (schnell.max_sequence_length, dev.max_sequence_length) == (256, 512)
    assert latents[0].shape == (2, 4, 16, 16)  # unpacked
    sites = ["transformer.transformer_blocks.0",
             "transformer.single_transformer_blocks.1:encoder_hidden_states"]  # fmt: skip
    with diffprobe.capture(schnell, sites) as cache:
        schnell.generate(PROMPTS, steps=2, guidance_scale=5.0, seed=0, size=32)
    assert cache.last(sites[0]).shape == (2, 64, 32)  # (size / 16)² image tokens
    assert cache.last(sites[1]).shape == (2, 256, 32)
    # the transformer receives sigma, so that is the timestep the engine records
    assert cache.records(sites[0])[0].timestep == 1.0


@pytest.mark.slow
def test_a_true_cfg_call_is_denoise_on_its_inputs(dev):
    cfg = dict(guidance_scale=3.0, true_cfg_scale=2.5, negative_prompt="")
    sites = [*DENOISER_SITES, "transformer:input"]
    with diffprobe.capture(dev, sites) as cache:
        dev.generate(PROMPTS, steps=2, seed=0, size=32, **cfg)
    # the conditional call of step 1 is model.denoise on the same (unpacked) inputs
    x_t = unpack(cache.records("transformer:input", branch="cond")[1].value, 16, 16)
    t = dev.pipe.scheduler.timesteps[1].expand(len(PROMPTS))
    cond = dev.encode_prompt(PROMPTS)
    with diffprobe.capture(dev, DENOISER_SITES) as alone:
        dev.denoise(x_t, t, cond, embedded_guidance=3.0)
    for site in DENOISER_SITES:
        torch.testing.assert_close(
            alone.last(site), cache.records(site, branch="cond")[1].value, rtol=0, atol=0
        )


def test_embedded_guidance_is_a_transformer_input(dev, latents):
    _, x_t, t = latents
    pipe = dev.pipe
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=512)
        negative, negative_pooled, _ = pipe.encode_prompt(["", ""], max_sequence_length=512)

        def run(text, pooled_text):
            out = pipe.transformer(
                hidden_states=pack(x_t),
                timestep=t / 1000,
                guidance=torch.full([2], 2.0),
                pooled_projections=pooled_text,
                encoder_hidden_states=text,
                txt_ids=text_ids,
                img_ids=image_ids(16, 16),
                return_dict=False,
            )[0]
            return unpack(out, 16, 16)

        cond_pred, uncond_pred = run(embeds, pooled), run(negative, negative_pooled)
    cond = dev.encode_prompt(PROMPTS, negative="")
    torch.testing.assert_close(
        dev.denoise(x_t, t, cond, embedded_guidance=2.0), cond_pred, rtol=0, atol=0
    )
    torch.testing.assert_close(
        dev.denoise(x_t, t, cond, guidance_scale=4.0, embedded_guidance=2.0),
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
