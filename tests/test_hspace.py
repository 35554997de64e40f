"""h-space editing: the asymmetric step, inversion, the hook against a hand-written forward,
Δh sources and files, CFG branches, the edit metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffprobe.analysis.edits import frechet_distance, kernel_inception_distance, linearity, s_dir
from diffprobe.interventions import hspace as H
from diffprobe.loading import from_pipeline
from diffprobe.testing.ddpm import dummy_ddpm_pipeline

SIZE = 16


def _small_pipeline(mid_block_type: str | None = "UNetMidBlock2D"):
    """A 16 px random DDPM (two levels, h = 32×8×8), smaller than the conformance dummy."""
    from diffusers import UNet2DModel

    pipe = dummy_ddpm_pipeline(0)
    torch.manual_seed(0)
    pipe.unet = UNet2DModel(sample_size=SIZE, block_out_channels=(16, 32), layers_per_block=1,
                            norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "UpBlock2D"),
                            mid_block_type=mid_block_type).eval()  # fmt: skip
    return pipe


@pytest.fixture(scope="module")
def ddpm():
    return from_pipeline(_small_pipeline(), None, "dummy-ddpm")


def _noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_zero_delta_is_plain_ddim_bit_for_bit(ddpm):
    from diffusers import DDIMScheduler

    x_T = _noise((2, 3, SIZE, SIZE))
    shape = H.h_shape(ddpm)
    hspace = H.HSpaceEdit([H.ConstantDelta(torch.zeros(shape))], t_edit=0)
    edited = H.sample(ddpm, x_T, steps=6, hspace=hspace)
    # independent path: diffusers' own DDIM scheduler, η = 0, the UNet called directly
    scheduler = DDIMScheduler.from_config(ddpm.pipe.scheduler.config)
    scheduler.set_timesteps(6)
    x = x_T
    for t in scheduler.timesteps:
        with torch.no_grad():
            eps = ddpm.pipe.unet(x, t).sample
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    assert torch.equal(edited, x)
    # a non-zero Δh does change the result (the test can fail)
    nonzero = H.HSpaceEdit([H.ConstantDelta(torch.ones(shape))], t_edit=0)
    assert (H.sample(ddpm, x_T, steps=6, hspace=nonzero) - x).abs().max() > 1e-3


def test_asymmetric_step_uses_edited_noise_only_in_x0():
    x, eps, eps_edit = _noise((1, 3, 4, 4), 1), _noise((1, 3, 4, 4), 2), _noise((1, 3, 4, 4), 3)
    alpha, alpha_prev = torch.tensor(0.5), torch.tensor(0.8)
    previous, x0 = H.asymmetric_step(x, eps, eps_edit, alpha, alpha_prev)
    expected_x0 = (x - (1 - alpha) ** 0.5 * eps_edit) / alpha**0.5
    torch.testing.assert_close(x0, expected_x0)
    torch.testing.assert_close(
        previous, alpha_prev**0.5 * expected_x0 + (1 - alpha_prev) ** 0.5 * eps
    )


def _handwritten_forward(unet, sample, timestep, delta):
    """UNet2DModel's forward written out by hand, with h + Δh after the mid block."""
    timesteps = torch.full((sample.shape[0],), timestep, dtype=torch.long)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(unet.dtype))
    x = unet.conv_in(sample)
    skips = (x,)
    for block in unet.down_blocks:
        x, res = block(hidden_states=x, temb=emb)
        skips += res
    x = unet.mid_block(x, emb) + delta
    for block in unet.up_blocks:
        res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
        x = block(x, res, emb)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(x)))


def test_hook_delta_equals_handwritten_forward(ddpm):
    x = _noise((2, 3, SIZE, SIZE), 4)
    shape = H.h_shape(ddpm)
    torch.manual_seed(0)
    block = H.DeltaBlock(*shape)
    torch.nn.init.normal_(block.conv2.weight, std=0.1)  # non-zero Δh
    hspace = H.HSpaceEdit([block], strength=1.5, t_edit=0)
    with torch.no_grad():
        eps, eps_edit = H.process.denoise_pair(ddpm, x, 500, ddpm.encode_prompt(["", ""]), None,
                                               hspace, test_steps=10)  # fmt: skip
        unet = ddpm.pipe.unet
        h = {}
        handle = unet.mid_block.register_forward_hook(lambda m, i, o: h.setdefault("h", o))
        unet(x, 500)
        handle.remove()
        delta = 1.5 * block(h["h"], torch.tensor([500]))
        expected = _handwritten_forward(unet, x, 500, delta)
        plain = _handwritten_forward(unet, x, 500, 0.0)
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(eps_edit, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps, plain, rtol=1e-5, atol=1e-5)


def test_strength_scaled_by_train_over_test_steps(ddpm):
    direction = _noise(H.h_shape(ddpm), 5)
    h = torch.zeros(1, *direction.shape)
    edit = H.HSpaceEdit([H.ConstantDelta(direction), H.ConstantDelta(direction)],
                        coefficients=[1.0, -0.5], strength=2.0, train_steps=40)  # fmt: skip
    got = edit.delta(h, torch.tensor([10]), test_steps=20)
    torch.testing.assert_close(got[0], 2.0 * (40 / 20) * 0.5 * direction)


@pytest.mark.slow
def test_inversion_then_ddim_reconstructs_tiny():
    """Inversion + plain DDIM on `tiny` (40 steps) reconstructs shapes images ≥ 30 dB PSNR."""
    import diffprobe
    from diffprobe.analysis.edits import psnr
    from diffprobe.data import shapes
    from diffprobe.stages.hspace import to_uint8

    model = diffprobe.load("tiny")
    images = shapes.sample(2, seed=3).images
    with torch.no_grad():
        x0 = model.encode_images(images)
        x_T = H.ddim_invert(model, x0, steps=40)
        back = H.sample(model, x_T, steps=40)
        through_vae = to_uint8(H.decode(model, x0))
        reconstructed = to_uint8(H.decode(model, back))
    assert psnr(through_vae, reconstructed) >= 30.0  # measured 40.5 dB on 8 images
    # and the inverted x_T is far from the image (it is noise-like, not a copy)
    assert x_T.std() > 0.7


def test_cfg_edits_the_conditional_branch_only():
    from diffprobe.testing.sd import dummy_sd_pipeline

    model = from_pipeline(dummy_sd_pipeline(0), None, "dummy-sd")
    shape = H.h_shape(model)
    x = _noise((1, 4, *model.encode_images(torch.zeros(1, 3, 32, 32)).shape[-2:]), 6)
    hspace = H.HSpaceEdit([H.ConstantDelta(torch.ones(shape))], t_edit=0)
    cond = model.encode_prompt(["a red star"], cfg=True)
    cond_only = model.encode_prompt(["a red star"])
    uncond_only = model.encode_prompt([""])
    _, guided = H.process.denoise_pair(model, x, 500, cond, 5.0, hspace, 10)
    with torch.no_grad():
        uncond = model.denoise(x, torch.tensor([500.0]), uncond_only)
    _, cond_edit = H.process.denoise_pair(model, x, 500, cond_only, None, hspace, 10)
    torch.testing.assert_close(guided, uncond + 5.0 * (cond_edit - uncond), rtol=1e-4, atol=1e-5)


def test_sources_start_at_zero_and_round_trip(tmp_path):
    shape = (8, 4, 4)
    h = _noise((3, *shape), 7)
    for kind in ("conv", "transformer", "free"):
        source = H.build_delta(kind, shape, steps=5)
        assert torch.equal(source(h, torch.tensor([100]), 2), torch.zeros_like(h))
        for parameter in source.parameters():
            torch.nn.init.normal_(parameter, std=0.1)
        path = H.save_delta(tmp_path / f"{kind}.safetensors", source, {"t_edit": 300})
        loaded, info = H.load_delta(path, shape)
        assert info["t_edit"] == 300
        torch.testing.assert_close(loaded(h, torch.tensor([100]), 2),
                                   source.eval()(h, torch.tensor([100]), 2))  # fmt: skip
    with pytest.raises(H.HSpaceError, match="is for h of shape"):
        H.load_delta(tmp_path / "conv.safetensors", (16, 4, 4))


def test_mean_difference_and_pca_find_a_planted_direction():
    rng = torch.Generator().manual_seed(0)
    direction = torch.zeros(4, 2, 2)
    direction[1, 0, 1] = 3.0
    source = torch.randn(200, 4, 2, 2, generator=rng) * 0.1
    target = torch.randn(200, 4, 2, 2, generator=rng) * 0.1 + direction
    difference = H.mean_difference(source, target)
    assert (difference - direction).abs().max() < 0.05
    components, explained = H.pca_directions(torch.cat([source, target]), 1)
    assert abs(components[0, 1, 0, 1]) > 0.99 and explained[0] > 0.9


@pytest.mark.slow
def test_s_dir_frechet_kid_linearity_on_planted_data():
    rng = np.random.default_rng(0)
    original = rng.normal(size=(50, 8))
    text_source, text_target = np.eye(8)[0], np.eye(8)[1]
    edited = original + rng.normal(size=(50, 8))
    got = s_dir(edited, original, text_target, text_source)
    for i in (0, 17):  # the definition written out for single items
        unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
        delta = unit(unit(edited[i]) - unit(original[i]))
        assert got[i] == pytest.approx(delta @ unit(text_target - text_source))
    # an image moved from the source concept onto the target concept scores 1, the reverse −1
    assert s_dir(text_target[None], text_source[None], text_target, text_source)[
        0
    ] == pytest.approx(1)
    assert s_dir(text_source[None], text_target[None], text_target, text_source)[
        0
    ] == pytest.approx(-1)
    a = rng.normal(size=(400, 4))
    b = rng.normal(size=(400, 4)) + np.array([2.0, 0, 0, 0])
    # Fréchet distance of two Gaussians with equal covariance: the squared mean shift
    assert abs(frechet_distance(a, b) - 4.0) < 0.6
    assert frechet_distance(a, a) < 1e-6
    same = kernel_inception_distance(a, rng.normal(size=(400, 4)))[0]
    shifted = kernel_inception_distance(a, b)[0]
    assert abs(same) < 0.05 < shifted
    fit = linearity(np.array([-2, -1, 0, 1, 2.0]), np.array([-4, -2, 0, 2, 4.0]) + 1)
    assert fit["slope"] == pytest.approx(2.0) and fit["r2"] == pytest.approx(1.0)
    assert fit["spearman"] == pytest.approx(1.0)


def test_model_without_mid_block_is_refused():
    model = from_pipeline(_small_pipeline(mid_block_type=None), None, "no-mid")
    with pytest.raises(H.HSpaceError, match="has no UNet mid block"):
        H.mid_block(model)


def test_identical_source_and_target_refused():
    from diffprobe.interventions.hspace.clip import load_clip

    with pytest.raises(H.HSpaceError, match="same"):
        load_clip("tiny-clip").direction("red", " Red")


def test_mean_difference_direction_is_per_step_group_mean_of_h(ddpm, tmp_path):
    """The stored direction at step k is mean h_k(target chains) − mean h_k(source chains),
    recomputed here with diffusers' DDIM loop and a plain forward hook on the mid block, and
    sampling applies row k at the k-th timestep (no sign, order or step-scaling slip)."""
    from diffusers import DDIMScheduler

    from diffprobe.stages.hspace import make_direction, source_images

    steps = 4
    out = make_direction(ddpm, tmp_path / "md", source="red", target="blue", items=2,
                         steps=steps, progress=False)  # fmt: skip
    delta, info = H.load_delta(out / "delta.safetensors", H.h_shape(ddpm))
    assert isinstance(delta, H.FreeDelta) and info["train_steps"] == steps
    # chains of inverted images are sampled without clipping P_t (Asyrp; see the next test)
    scheduler = DDIMScheduler.from_config(ddpm.pipe.scheduler.config, clip_sample=False)
    scheduler.set_timesteps(steps)

    def chain_h(colour):
        x0 = ddpm.encode_images(source_images(colour, 2, start=10_000).images)
        x = H.ddim_invert(ddpm, x0, steps=steps)
        captured = []
        handle = ddpm.pipe.unet.mid_block.register_forward_hook(
            lambda module, args, output: captured.append(output.detach().clone())
        )
        try:
            for t in scheduler.timesteps:
                with torch.no_grad():
                    eps = ddpm.pipe.unet(x, t).sample
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        finally:
            handle.remove()
        return torch.stack(captured)  # (steps, items, C, H, W)

    expected = chain_h("blue").mean(1) - chain_h("red").mean(1)
    assert expected.abs().max() > 1e-3  # the two groups differ: the check can fail
    torch.testing.assert_close(delta.delta.detach(), expected, rtol=1e-4, atol=1e-5)

    # sampling adds row k at step k: the ε̃ of every step equals a pass with h + row k by hand
    x_T = _noise((1, 3, SIZE, SIZE), seed=5)
    seen = []
    edit = H.HSpaceEdit([delta], strength=2.0, t_edit=0, train_steps=steps)
    H.sample(ddpm, x_T, steps=steps, hspace=edit,
             on_step=lambda t, x0: seen.append((t, edit.step_index)))  # fmt: skip
    assert [t for t, _ in seen] == [int(t) for t in scheduler.timesteps]
    assert [k for _, k in seen] == list(range(steps))
    h = torch.randn(1, *delta.shape)
    for k in range(steps):
        edit.step_index = k
        torch.testing.assert_close(edit.delta(h, torch.tensor([0]), steps), 2.0 * expected[k:k + 1],
                                   rtol=1e-4, atol=1e-5)  # fmt: skip


def test_mean_difference_groups_are_colour_twins(ddpm, tmp_path):
    """The two groups of the mean difference differ in colour only: item i of the blue stream
    is item i of the red stream repainted (checked against the renderer), so the direction is
    the paired mean difference (no shape, position or background term), and direction.json
    says so."""
    import json

    from diffprobe.data import shapes
    from diffprobe.stages.hspace import make_direction, paired_groups, source_images

    red, blue = source_images("red", 8, start=10_000), source_images("blue", 8, start=10_000)
    assert paired_groups(red, blue)
    for i in range(8):
        f = red.item(i)
        twin = shapes.render(f["shape"], "blue", f["size"], f["x"], f["y"], f["background"],
                             f["rotation"])  # fmt: skip
        np.testing.assert_array_equal(blue.images[i], twin)
    assert not np.array_equal(red.images, blue.images)
    assert not paired_groups(red, source_images("blue", 8, start=10_001))  # the check can fail
    out = make_direction(ddpm, tmp_path / "md", source="red", target="blue", items=2, steps=2,
                         progress=False)  # fmt: skip
    assert json.loads((out / "direction.json").read_text())["paired"] is True


def test_inverted_chains_of_a_clipping_ddpm_reconstruct():
    """tiny-ddpm's scheduler clips x0 (``clip_sample``); DDIM inversion does not, so the edit
    path samples inverted chains unclipped (as Asyrp): clipped, the reconstruction is lost
    (≈ 6 dB); unclipped it is ≥ 25 dB (measured 29.2 dB on these 2 images, 20 steps)."""
    import diffprobe
    from diffprobe.stages.hspace import edit_images, source_images

    model = diffprobe.load("tiny-ddpm")
    assert model.pipe.scheduler.config.clip_sample
    x0 = model.encode_images(source_images("red", 2, start=20_000).images)
    x_T = H.ddim_invert(model, x0, steps=20)
    zero = H.ConstantDelta(torch.zeros(H.h_shape(model)))
    pixels = edit_images(model, x_T, [zero], strength=0.0, steps=20, t_edit=0, t_boost=-1,
                         train_steps=None)  # fmt: skip

    def psnr_db(x):
        return float(10 * torch.log10(4 / ((x.clamp(-1, 1) - x0) ** 2).mean()))

    assert psnr_db(pixels) >= 25
    assert psnr_db(H.sample(model, x_T, steps=20)) < 15  # the scheduler's clipping


@pytest.mark.parametrize("kind", ["conv", "transformer"])
def test_learned_delta_follows_h_to_its_device(kind):
    """The scheduler's timesteps live on the CPU while h and f_t sit on the GPU: the timestep
    embedding must follow h (a CUDA run failed in F.linear with mat1 on the CPU). The meta
    device stands in for the GPU: a CPU tensor meeting meta weights fails the same way."""
    delta = H.build_delta(kind, (16, 4, 4), 4).to("meta")
    h = torch.zeros(2, 16, 4, 4, device="meta")
    out = delta(h, torch.tensor(500), 0)
    assert out.device.type == "meta" and out.shape == h.shape
