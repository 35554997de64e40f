"""Deep dream: every transform and filter against a direct computation, the objective algebra,
the render loop on the dummy SD pipeline (early stop equals the full forward, the transforms
list untouched, the objective rises, items independent of their batch), and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe.interventions import dream
from diffprobe.interventions.dream import DreamError, Step
from diffprobe.interventions.dream.render import forward, pass_plan
from diffprobe.models.noise import item_seed

SITE = "unet.up_blocks.0"  # CrossAttnUpBlock2D of the dummy UNet: 64 channels


def generators(seeds):
    return [torch.Generator().manual_seed(item_seed(s, 1)) for s in seeds]


# ------------------------------------------------------------------------------- transforms


def test_jitter_is_a_roll_by_the_drawn_shifts():
    x = torch.randn(3, 2, 8, 8)
    out = dream.Jitter(2)(x, dream.Draw(generators([0, 1, 2])))
    replay = dream.Draw(generators([0, 1, 2]))
    dy, dx = replay.integers(-2, 2), replay.integers(-2, 2)
    for i in range(3):
        assert torch.equal(out[i], torch.roll(x[i], (int(dy[i]), int(dx[i])), dims=(-2, -1)))
    # over many draws every shift in [-2, 2] occurs and none outside
    draw = dream.Draw(generators(range(200)))
    assert set(draw.integers(-2, 2).tolist()) == {-2, -1, 0, 1, 2}


def test_rotate_by_zero_and_scale_one_are_the_identity():
    x = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(dream.affine(x, torch.zeros(2), torch.ones(2)), x)
    draw = dream.Draw(generators([0, 1]))
    assert dream.rotate(0.0)(x, draw) is x and dream.Affine(0.0, (1.0, 1.0))(x, draw) is x


def test_rotate_by_90_degrees_is_rot90_counter_clockwise():
    x = torch.randn(2, 3, 10, 10)
    out = dream.affine(x, torch.full((2,), 90.0), torch.ones(2))
    # np.rot90 / torch.rot90 with k=1 turn an image counter-clockwise as displayed
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_scale_zooms_in_about_the_centre():
    size = 16
    centres = (torch.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    ramp = centres.view(1, 1, 1, size).expand(1, 1, size, size).contiguous()
    out = dream.affine(ramp, torch.zeros(1), torch.full((1,), 2.0))
    # output pixel u samples the input at u / 2: the ramp's value there is u / 2
    torch.testing.assert_close(out[0, 0], ramp[0, 0] / 2, atol=1e-6, rtol=0)


def test_affine_draws_stay_in_their_ranges():
    transform = dream.Affine(5.0, (1.0, 1.1))
    draw = dream.Draw(generators(range(100)))
    angles, scales = draw.uniform(-5, 5), draw.uniform(1.0, 1.1)
    assert angles.abs().max() <= 5 and angles.std() > 1
    assert scales.min() >= 1 and scales.max() <= 1.1
    with pytest.raises(DreamError, match="scale range"):
        dream.Affine(5.0, (1.2, 1.0))
    assert transform == dream.Affine(5.0, (1.0, 1.1))


def test_renoise_is_the_forward_process_with_fresh_noise(sd_model):
    z = torch.randn(2, 4, 8, 8)
    draw = dream.Draw(generators([3, 4]), timestep=400.0,
                      add_noise=lambda x, n, t: sd_model.add_noise(x, timestep=t, noise=n)[0])  # fmt: skip
    first = dream.Renoise()(z, draw)
    second = dream.Renoise()(z, draw)
    replay = dream.Draw(generators([3, 4]))
    noise = replay.normal(z.shape[1:])
    alpha = sd_model.pipe.scheduler.alphas_cumprod[400]
    torch.testing.assert_close(first, alpha.sqrt() * z + (1 - alpha).sqrt() * noise)
    assert not torch.allclose(first, second)  # fresh noise each call
    fixed = dream.Renoise(timestep=0)(z, draw)  # its own timestep, not the pass's
    noise = replay.normal(z.shape[1:]) * 0 + replay.normal(z.shape[1:])  # the third draw
    alpha = sd_model.pipe.scheduler.alphas_cumprod[0]
    torch.testing.assert_close(fixed, alpha.sqrt() * z + (1 - alpha).sqrt() * noise)


# ---------------------------------------------------------------------------------- filters


def test_spectral_filter_keeps_std_and_damps_high_frequencies():
    size = 16
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    low = torch.cos(2 * math.pi * 1 * xx / size)  # |f| = 1
    high = torch.cos(2 * math.pi * (4 * yy + 6 * xx) / size)  # |f| = sqrt(52)
    gradient = torch.stack([low + high, 3 * low - high]).view(1, 2, size, size).double()
    out = dream.Spectral()(gradient, 0, 10)
    # the direct computation: each cosine scaled by 1 / (|f| + 1), then the item's std restored
    expected = (
        torch.stack(
            [low / 2 + high / (1 + math.sqrt(52)), 3 * low / 2 - high / (1 + math.sqrt(52))]
        )
        .view_as(gradient)
        .double()
    )
    expected = expected * gradient.std() / expected.std()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)  # float32 weights
    torch.testing.assert_close(out.std(), gradient.std())
    # per item: a second item of another scale keeps its own std
    both = torch.cat([gradient, 5 * torch.randn_like(gradient)])
    filtered = dream.Spectral()(both, 0, 10)
    torch.testing.assert_close(filtered.flatten(1).std(1), both.flatten(1).std(1))


def test_radial_frequency_is_the_ifftshifted_centred_grid():
    grid = dream.transforms.radial_frequency(6, 4)
    fy = np.fft.ifftshift(np.arange(-3, 3))
    fx = np.fft.ifftshift(np.arange(-2, 2))
    np.testing.assert_allclose(grid.numpy(), np.hypot(fy[:, None], fx[None, :]), atol=1e-6)


def test_gaussian_blur_matches_scipy_and_follows_its_schedule():
    from scipy.ndimage import gaussian_filter

    gradient = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    blur = dream.GaussianBlur(9, (0.5, 0.0))
    assert blur.sigma_at(0, 100) == 0.5 and blur.sigma_at(99, 100) == 0.0
    assert blur.sigma_at(33, 100) == pytest.approx(0.5 * (1 - 33 / 99))
    for step in (0, 50):
        sigma = blur.sigma_at(step, 100)
        expected = gaussian_filter(gradient.numpy(), sigma=(0, 0, sigma, sigma), mode="mirror",
                                   radius=(0, 0, 4, 4))  # fmt: skip
        np.testing.assert_allclose(blur(gradient, step, 100).numpy(), expected, atol=1e-12)
    assert blur(gradient, 99, 100) is gradient  # σ = 0: no blur
    with pytest.raises(DreamError, match="odd"):
        dream.GaussianBlur(8)


# ------------------------------------------------------------------------------- objectives


def z_step(z):
    return Step({}, z, 0.0)


def test_penalties_equal_their_formulas():
    z = torch.randn(3, 4, 8, 8) * 2
    arr = z.numpy()
    tv = np.abs(np.diff(arr, axis=2)).mean((1, 2, 3)) + np.abs(np.diff(arr, axis=3)).mean((1, 2, 3))
    np.testing.assert_allclose(dream.total_variation()(z_step(z)).numpy(), tv, rtol=1e-6)
    excess = np.maximum(np.abs(arr) - 3.0, 0) ** 2
    np.testing.assert_allclose(dream.range_penalty(3.0)(z_step(z)).numpy(), excess.mean((1, 2, 3)),
                               rtol=1e-6)  # fmt: skip
    flat = arr.reshape(3, -1)
    expected = np.abs(flat.mean(1)) + np.abs(flat.std(1, ddof=1) - 1)
    np.testing.assert_allclose(dream.moment()(z_step(z)).numpy(), expected, rtol=1e-5)
    assert float(dream.range_penalty(3.0)(z_step(torch.full((1, 1, 2, 2), 2.9)))) == 0


def test_objective_algebra():
    z = torch.randn(2, 4, 8, 8) * 3
    tv, rp, mo = dream.total_variation(), dream.range_penalty(3.0), dream.moment()
    a, b, c = (f(z_step(z)) for f in (tv, rp, mo))
    composed = tv + rp - 2 * mo
    torch.testing.assert_close(composed(z_step(z)), a + b - 2 * c)
    torch.testing.assert_close((-tv)(z_step(z)), -a)
    torch.testing.assert_close((tv / 4)(z_step(z)), a / 4)
    torch.testing.assert_close((0.5 * (tv - rp))(z_step(z)), 0.5 * a - 0.5 * b)
    assert composed.weights == (1.0, 1.0, -2.0)
    assert composed.leaves == (tv, rp, mo)
    total, values = composed.evaluate(z_step(z))
    torch.testing.assert_close(values[2], c)
    assert tv.weights == (1.0,)  # composing never changes its parts
    with pytest.raises(TypeError):
        tv * tv
    with pytest.raises(TypeError):
        tv + 1.0


def test_channel_neuron_direction_read_the_site():
    acts = torch.randn(3, 5, 4, 4)
    step = Step({("s", 0.0, "cond"): acts, ("s", 10.0, "cond"): 2 * acts}, torch.zeros(3), 0.0)
    torch.testing.assert_close(dream.channel("s", 2)(step), acts[:, 2].mean((1, 2)))
    torch.testing.assert_close(
        dream.channel("s", [0, 1, 4])(step),
        torch.stack([acts[i, c].mean() for i, c in enumerate([0, 1, 4])]),
    )
    # a set of timesteps: the mean over them
    torch.testing.assert_close(dream.channel("s", 2, timestep=(0, 10))(step),
                               1.5 * acts[:, 2].mean((1, 2)))  # fmt: skip
    torch.testing.assert_close(dream.neuron("s", 1, 2, 3)(step), acts[:, 1, 2, 3])
    vector = torch.randn(5)
    torch.testing.assert_close(dream.direction("s", vector)(step),
                               torch.einsum("ichw,c->i", acts, vector) / 16)  # fmt: skip
    with pytest.raises(DreamError, match="channel 5 is out of range: 's' has channels 0 to 4"):
        dream.channel("s", 5)(step)
    with pytest.raises(DreamError, match="outside"):
        dream.neuron("s", 1, 4, 0)(step)


def test_sae_feature_is_the_mean_pre_activation():
    from diffprobe.sae import TopKSAE

    sae = TopKSAE(5, 12, 3, seed=1)
    acts = torch.randn(2, 5, 4, 4)
    step = Step({("s", 0.0, "cond"): acts}, torch.zeros(2), 0.0)
    tokens = acts.flatten(2).transpose(1, 2)
    expected = torch.relu(torch.nn.functional.linear(tokens - sae.b_dec, sae.encoder, sae.b_enc))
    torch.testing.assert_close(
        dream.sae_feature("s", sae, [7, 2])(step),
        torch.stack([expected[0, :, 7].mean(), expected[1, :, 2].mean()]),
    )
    with pytest.raises(DreamError, match="feature 12 is out of range"):
        dream.sae_feature("s", sae, 12)


# ------------------------------------------------------------------------------ render loop


def test_early_stop_equals_the_full_forward_at_the_site(sd_model):
    z = torch.randn(2, *dream.input_shape(sd_model), requires_grad=True)
    objective = dream.channel(SITE, [3, 9])
    plan = pass_plan(sd_model, objective, 250.0)
    cond = {"cond": sd_model.encode_prompt(["", ""])}
    total, _ = forward(sd_model, objective, z, plan, cond, (), [], 250.0)
    (gradient,) = torch.autograd.grad(total.sum(), z)
    # by hand: a plain forward hook on the native UNet, the whole forward run
    seen = []
    module = sd_model.module(SITE)
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        t = torch.full((2,), 250.0)
        out = sd_model.pipe.unet(
            z, t, encoder_hidden_states=cond["cond"].cond["encoder_hidden_states"]
        )
    finally:
        handle.remove()
    assert out.sample.shape == z.shape  # the full forward ran
    expected = torch.stack([seen[0][0, 3].mean(), seen[0][1, 9].mean()])
    torch.testing.assert_close(total, expected)
    (by_hand,) = torch.autograd.grad(expected.sum(), z)
    torch.testing.assert_close(gradient, by_hand)


@pytest.mark.slow
def test_render_raises_the_objective_and_leaves_its_inputs_alone(sd_model):
    transforms = [dream.Jitter(1), dream.Affine(5.0, (1.0, 1.1)), dream.Renoise()]
    filters = [dream.Spectral(), dream.GaussianBlur(9, (0.5, 0.0))]
    kept_transforms, kept_filters = list(transforms), list(filters)
    ids = [id(t) for t in transforms]
    objective = dream.channel(SITE, [3, 9]) - 0.5 * dream.total_variation()
    init = dream.noise_init(dream.input_shape(sd_model), [0, 1])
    init_copy = init.clone()
    result = dream.render(sd_model, objective, init, timestep=100, seeds=[0, 1], steps=12,
                          lr=0.1, transforms=transforms, filters=filters, snapshot_every=5,
                          progress=False)  # fmt: skip
    assert transforms == kept_transforms and [id(t) for t in transforms] == ids
    assert filters == kept_filters and torch.equal(init, init_copy)
    assert sorted(result.snapshots) == [0, 5, 10, 12]
    torch.testing.assert_close(result.snapshots[0], init)
    assert result.images.shape == (2, 64, 64, 3) and result.images.dtype == np.uint8
    assert len(result.stats) == 12 * 2 and result.leaves == [f"channel({SITE})", "total_variation"]
    activation = dream.channel(SITE, [3, 9])
    before, _ = dream.measure(sd_model, activation, init, timestep=100)
    after, _ = dream.measure(sd_model, activation, result.latents, timestep=100)
    assert (after > before).all()
    # an item's dream does not depend on the rest of its batch
    alone = dream.render(sd_model, dream.channel(SITE, 9) - 0.5 * dream.total_variation(),
                         init[1:], timestep=100, seeds=[1], steps=12, lr=0.1,
                         transforms=transforms, filters=filters, progress=False,
                         decode_images=False)  # fmt: skip
    torch.testing.assert_close(alone.latents[0], result.latents[1], atol=1e-4, rtol=1e-4)


def test_bad_input_is_one_clear_error(sd_model):
    init = dream.noise_init(dream.input_shape(sd_model), [0])
    run = dict(steps=1, transforms=(), filters=(), progress=False, decode_images=False)
    with pytest.raises(DreamError, match="channel 64 is out of range"):
        dream.render(sd_model, dream.channel(SITE, 64), init, **run)
    with pytest.raises(DreamError, match="timestep 1000 is outside the schedule"):
        dream.render(sd_model, dream.channel(SITE, 0), init, timestep=1000, **run)
    with pytest.raises(DreamError, match="timestep 2.5 is outside"):
        dream.render(sd_model, dream.channel(SITE, 0, timestep=2.5), init, **run)
    with pytest.raises(DreamError, match="'vae.decoder.mid_block' is in 'vae'"):
        dream.render(sd_model, dream.channel("vae.decoder.mid_block", 0), init, **run)
    with pytest.raises(DreamError, match="2 seeds for 1 items"):
        dream.render(sd_model, dream.channel(SITE, 0), init, seeds=[0, 1], **run)


def test_capture_is_gone_after_a_render(sd_model):
    init = dream.noise_init(dream.input_shape(sd_model), [0])
    dream.render(sd_model, dream.channel(SITE, 0), init, steps=1, transforms=(), filters=(),
                 progress=False, decode_images=False)  # fmt: skip
    module = sd_model.module(SITE)
    assert not module._forward_hooks and not sd_model.pipe.unet._forward_pre_hooks
    images = sd_model.generate("", steps=1, guidance_scale=1.0)  # no stop-early guard left
    assert images.shape[0] == 1


def test_prior_latents_load_and_are_checked(tmp_path):
    from safetensors.torch import save_file

    shape = (4, 8, 8)
    save_file({"latents": torch.ones(3, *shape)}, str(tmp_path / "p.safetensors"))
    assert dream.load_prior(tmp_path / "p.safetensors", shape).shape == (3, *shape)
    with pytest.raises(DreamError, match=r"has shape \(3, 4, 8, 8\)"):
        dream.load_prior(tmp_path / "p.safetensors", (4, 16, 16))
    with pytest.raises(DreamError, match="no such file"):
        dream.load_prior(tmp_path / "missing.safetensors", shape)


def test_diffprobe_exposes_nothing_new_at_top_level():
    # dream lives under diffprobe.interventions; the package facade is untouched
    assert not hasattr(diffprobe, "render")
