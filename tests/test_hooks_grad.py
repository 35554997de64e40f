"""Gradients flow through model.denoise: from a site's captured activation (also when the
forward stopped right after it) and from the prediction back to the input latent, and into an
edit's value (a learned direction)."""

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe import Add

SITE = "unet.mid_block"


@pytest.fixture(scope="module")
def inputs(sd_model):
    images = np.random.default_rng(1).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        x0 = sd_model.encode_images(images)
        x_t, t = sd_model.add_noise(x0, noise_level=0.5, seed=3)
        cond = sd_model.encode_prompt(["a red circle", "a blue square"], negative="")
    return x_t, t, cond


def objective(activation):
    return activation[:, 3].square().mean()  # one channel's energy, a deep-dream objective


def reference_gradient(sd_model, x_t, t, cond):
    """The gradient by a hand-written forward hook on the plain UNet, no diffprobe involved."""
    seen = []
    handle = sd_model.pipe.unet.mid_block.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        x = x_t.clone().requires_grad_(True)
        sd_model.pipe.unet(x, t, encoder_hidden_states=cond.cond["encoder_hidden_states"])
    finally:
        handle.remove()
    (gradient,) = torch.autograd.grad(objective(seen[0]), x)
    return gradient


@pytest.mark.parametrize("stop_early", [False, True])
def test_gradient_from_a_site_reaches_the_input_latent(sd_model, inputs, stop_early):
    x_t, t, cond = inputs
    x = x_t.clone().requires_grad_(True)
    with diffprobe.capture(sd_model, SITE, detach=False, stop_early=stop_early) as cache:
        prediction = sd_model.denoise(x, t, cond)
    assert (prediction is None) == stop_early
    objective(cache.last(SITE)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, reference_gradient(sd_model, x_t, t, cond))


def test_gradient_of_one_cfg_branch(sd_model, inputs):
    x_t, t, cond = inputs
    x = x_t.clone().requires_grad_(True)
    with diffprobe.capture(sd_model, SITE, detach=False, stop_early=True) as cache:
        sd_model.denoise(x, t, cond, guidance_scale=4.0)
    objective(cache.last(SITE, "cond")).backward()
    # the conditional half of the CFG batch is the plain conditional forward
    torch.testing.assert_close(x.grad, reference_gradient(sd_model, x_t, t, cond))


def test_prediction_is_differentiable_and_captures_detach_by_default(sd_model, inputs):
    x_t, t, cond = inputs
    x = x_t.clone().requires_grad_(True)
    with diffprobe.capture(sd_model, SITE) as cache:
        prediction = sd_model.denoise(x, t, cond)
    assert not cache.last(SITE).requires_grad
    prediction.square().mean().backward()
    assert x.grad.abs().sum() > 0
    # the caller chooses: under no_grad nothing is tracked
    with torch.no_grad():
        assert not sd_model.denoise(x_t, t, cond).requires_grad


def test_gradient_reaches_an_added_direction(sd_model, inputs):
    x_t, t, cond = inputs
    channels = sd_model.pipe.unet.mid_block.resnets[-1].out_channels
    direction = torch.zeros(channels, requires_grad=True)
    with diffprobe.edit(sd_model, Add(SITE, direction)):
        prediction = sd_model.denoise(x_t, t, cond)
    prediction.square().mean().backward()
    assert direction.grad is not None and direction.grad.abs().sum() > 0
    # the same gradient by hand: the direction added in a plain forward hook
    delta = torch.zeros(channels, requires_grad=True)
    handle = sd_model.pipe.unet.mid_block.register_forward_hook(
        lambda m, a, out: out + delta.view(1, -1, 1, 1)
    )
    try:
        plain = sd_model.pipe.unet(x_t, t, encoder_hidden_states=cond.cond["encoder_hidden_states"])
    finally:
        handle.remove()
    plain.sample.square().mean().backward()
    torch.testing.assert_close(direction.grad, delta.grad)
