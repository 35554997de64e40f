"""What is DeepFloyd IF's own (the shared contract is in tests/test_conformance.py): prompts
lower-cased and stripped alike for encoding and generation, T5 run for both branches, the
noise/variance split of the UNet output, the prompt encoding."""

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe.models.deepfloyd_if import IFModel
from diffprobe.testing.deepfloyd_if import dummy_if_pipeline

PROMPTS = ["A Red Circle ", "a blue square on white"]


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


def test_generation_sees_the_text_that_is_encoded(model):
    reference = plain(model.pipe, guidance_scale=5.0)
    with diffprobe.capture(model, ["text_encoder.encoder.block.2"]) as cache:
        images = model.generate(PROMPTS, steps=2, guidance_scale=5.0, seed=0)
    assert images.shape == (2, 32, 32, 3)
    assert np.array_equal(images, reference)
    # T5 runs twice outside the denoiser (prompt, then the "" negative prompt)
    text = cache.records("text_encoder.encoder.block.2")
    assert [(r.call, r.branch) for r in text] == [(None, "none"), (None, "none")]
    assert text[0].value.shape == (2, 77, 32)


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
