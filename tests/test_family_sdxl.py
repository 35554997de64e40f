"""What is SDXL's own (the shared contract is in tests/test_conformance.py): its prompt
encoding (two encoders' penultimate layers, the pooled projection, zeros for the default
unconditional branch), time_ids, tuple elements, the documented shapes, the float16 VAE."""

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe import DiffprobeError
from diffprobe.models.sdxl import StableDiffusionXLModel
from diffprobe.testing.sdxl import dummy_sdxl_pipeline

PROMPTS = ["a red circle", "a blue square on white"]


@pytest.fixture(scope="module")
def model():
    model = diffprobe.from_pipeline(dummy_sdxl_pipeline(seed=0))
    assert isinstance(model, StableDiffusionXLModel)
    return model


def noisy_latents(model, t=500):
    pixels = torch.linspace(-1, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
    x_t, timesteps = model.add_noise(model.encode_images(pixels), timestep=t, seed=1)
    return x_t, timesteps


def test_documented_shapes(model):
    x_t, t = noisy_latents(model)
    assert x_t.shape == (2, 4, 32, 32)
    sites = ["unet.down_blocks.1", "text_encoder_2.text_model.encoder.layers.4"]
    with diffprobe.capture(model, sites) as cache:
        model.denoise(x_t, t, model.encode_prompt(PROMPTS))
    assert cache.last("unet.down_blocks.1").shape == (2, 4, 16, 16)  # the hidden_states element
    assert cache.last("text_encoder_2.text_model.encoder.layers.4").shape == (2, 77, 32)


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
    assert not default.uncond["encoder_hidden_states"].any()  # force_zeros_for_empty_prompt
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
