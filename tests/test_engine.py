"""The hook engine on a tiny random StableDiffusionPipeline: parity, CFG branches, early stop,
edits, cleanup, errors."""

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe import Edit
from diffprobe.errors import DiffprobeError, UnknownSiteError

SITES = [
    "unet.conv_in:input",
    "unet.down_blocks.0",
    "unet.down_blocks.1.attentions.0",
    "unet.down_blocks.1.resnets.1",
    "unet.mid_block",
    "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2",
    "unet.up_blocks.1",
    "text_encoder.encoder.layers.3",
    "vae.decoder.mid_block",
]
PROMPT = "a small red circle in the top left"


def plain_generate(model, guidance=5.0, seed=0):
    """The plain diffusers call, no diffprobe involved."""
    return model.pipe(
        PROMPT,
        num_inference_steps=3,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images


@pytest.fixture(scope="module")
def reference(sd_model):
    return plain_generate(sd_model)


@pytest.fixture(scope="module")
def inputs(sd_model):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    x0 = sd_model.encode_images(images)
    x_t, t = sd_model.add_noise(x0, noise_level=0.4, seed=7)
    cond = sd_model.encode_prompt(["a red circle", "a blue square", ""], negative="")
    return x_t, t, cond


def test_capture_during_generation_is_bit_identical(sd_model, reference):
    with diffprobe.capture(sd_model, SITES) as cache:
        images = sd_model.generate(PROMPT, steps=3, guidance_scale=5.0, seed=0)
    assert np.array_equal(images, reference)
    assert set(cache.sites) == set(SITES)
    # 3 steps x 2 CFG branches in the denoiser; prompt + negative prompt in the text encoder
    assert len(cache.records("unet.mid_block")) == 6
    assert len(cache.records("text_encoder.encoder.layers.3")) == 2
    calls = [(r.call, r.branch) for r in cache.records("unet.mid_block")]
    assert calls == [
        (0, "uncond"),
        (0, "cond"),
        (1, "uncond"),
        (1, "cond"),
        (2, "uncond"),
        (2, "cond"),
    ]
    timesteps = [r.timestep for r in cache.records("unet.mid_block", branch="cond")]
    assert timesteps == [float(t) for t in sd_model.pipe.scheduler.timesteps]
    assert all(
        r.call is None and r.branch == "none" for r in cache.records("vae.decoder.mid_block")
    )


def test_zero_edit_is_bit_identical(sd_model, reference):
    edits = [Edit(site, "add", value=0.0) for site in SITES if not site.startswith("vae")]
    with diffprobe.edit(sd_model, edits):
        images = sd_model.generate(PROMPT, steps=3, guidance_scale=5.0, seed=0)
    assert np.array_equal(images, reference)


def test_capture_equals_handwritten_forward_hook(sd_model, inputs):
    x_t, t, cond = inputs
    seen = []
    module = sd_model.pipe.unet.mid_block
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            sd_model.pipe.unet(x_t, t, encoder_hidden_states=cond.cond["encoder_hidden_states"])
    finally:
        handle.remove()
    with diffprobe.capture(sd_model, "unet.mid_block") as cache:
        sd_model.denoise(x_t, t, cond)
    assert torch.equal(cache.last("unet.mid_block"), seen[0])


def test_cfg_branches_are_kept_apart(sd_model, inputs):
    x_t, t, cond = inputs
    with diffprobe.capture(sd_model, ["unet.mid_block", "unet.up_blocks.1"]) as guided:
        sd_model.denoise(x_t, t, cond, guidance_scale=7.5)
    with diffprobe.capture(sd_model, ["unet.mid_block", "unet.up_blocks.1"]) as alone:
        sd_model.denoise(x_t, t, diffprobe.Conditioning(cond.uncond))
        sd_model.denoise(x_t, t, diffprobe.Conditioning(cond.cond))
    for site in ("unet.mid_block", "unet.up_blocks.1"):
        uncond, conditional = alone.records(site)
        torch.testing.assert_close(
            guided.last(site, "cond"), conditional.value, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(guided.last(site, "uncond"), uncond.value, rtol=1e-5, atol=1e-5)
        assert guided.last(site, "cond").shape[0] == x_t.shape[0]


def test_early_stop_equals_full_forward(sd_model, inputs):
    x_t, t, cond = inputs
    sites = ["unet.down_blocks.1", "unet.mid_block"]
    with diffprobe.capture(sd_model, sites) as full:
        prediction = sd_model.denoise(x_t, t, cond)
    calls = []
    up = sd_model.pipe.unet.up_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        with diffprobe.capture(sd_model, sites, stop_early=True) as early:
            result = sd_model.denoise(x_t, t, cond)
    finally:
        up.remove()
    assert prediction is not None and result is None
    assert calls == []  # nothing after the deepest site ran
    for site in sites:
        assert torch.equal(full.last(site), early.last(site))


def test_early_stop_on_raw_unet_call_is_contained(sd_model, inputs):
    # a raw denoiser call may stop early only where the caller catches the stop (catch_stop, as
    # model.denoise does); without it the call is refused (tests/test_hooks_cfg.py)
    from diffprobe.hooks.engine import catch_stop

    x_t, t, cond = inputs
    with diffprobe.capture(sd_model, "unet.mid_block", stop_early=True) as cache:
        with catch_stop(sd_model.pipe.unet) as scope:
            sd_model.pipe.unet(x_t, t, encoder_hidden_states=cond.cond["encoder_hidden_states"])
            pytest.fail("the forward should have stopped")  # pragma: no cover
    assert scope.stopped
    assert cache.last("unet.mid_block").shape[0] == x_t.shape[0]


def test_hooks_are_removed_on_exception(sd_model):
    def count_hooks():
        return sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks)
            for comp in sd_model.module_components.values()
            for m in comp.modules()
        )

    before = count_hooks()
    with pytest.raises(RuntimeError, match="boom"):
        with (
            diffprobe.capture(sd_model, SITES),
            diffprobe.edit(sd_model, Edit("unet.mid_block", "scale", factor=2.0)),
        ):
            raise RuntimeError("boom")
    assert count_hooks() == before


def test_add_edit_changes_only_the_chosen_branch(sd_model, inputs):
    x_t, t, cond = inputs
    direction = torch.randn(64)
    with diffprobe.capture(sd_model, "unet.up_blocks.1") as plain:
        sd_model.denoise(x_t, t, cond, guidance_scale=7.5)
    with (
        diffprobe.capture(sd_model, ["unet.mid_block", "unet.up_blocks.1"]) as edited,
        diffprobe.edit(sd_model, Edit("unet.mid_block", "add", value=direction, branch="cond")),
    ):
        sd_model.denoise(x_t, t, cond, guidance_scale=7.5)
    assert torch.equal(
        edited.last("unet.up_blocks.1", "uncond"), plain.last("unet.up_blocks.1", "uncond")
    )
    assert not torch.allclose(
        edited.last("unet.up_blocks.1", "cond"), plain.last("unet.up_blocks.1", "cond")
    )


def test_edit_ops_mask_and_timestep_window(sd_model, inputs):
    x_t, t, cond = inputs
    site = "unet.mid_block"

    def after(edit_spec):
        with diffprobe.capture(sd_model, site) as cache:
            with diffprobe.edit(sd_model, edit_spec):
                sd_model.denoise(x_t, t, cond)
        return cache.last(site)

    base = after(Edit(site, "scale", factor=1.0))
    # capture hooks were registered first, so they see the value before the edit: register the
    # edit first to read the edited value
    with diffprobe.edit(sd_model, Edit(site, "scale", factor=2.0)):
        with diffprobe.capture(sd_model, site) as cache:
            sd_model.denoise(x_t, t, cond)
    torch.testing.assert_close(cache.last(site), 2 * base)

    mask = torch.zeros(base.shape[-2:], dtype=torch.bool)
    mask[:2, :3] = True
    with diffprobe.edit(sd_model, Edit(site, "ablate", mask=mask)):
        with diffprobe.capture(sd_model, site) as cache:
            sd_model.denoise(x_t, t, cond)
    value = cache.last(site)
    assert torch.all(value[..., :2, :3] == 0)
    assert torch.equal(value[..., 2:, :], base[..., 2:, :])

    outside = (float(t[0]) + 1, float(t[0]) + 100)
    with diffprobe.edit(sd_model, Edit(site, "ablate", timesteps=outside)):
        with diffprobe.capture(sd_model, site) as cache:
            sd_model.denoise(x_t, t, cond)
    assert torch.equal(cache.last(site), base)


def test_patch_from_cache_transplants_activations(sd_model, inputs):
    x_t, t, cond = inputs
    other = sd_model.encode_prompt(["a green star"] * 3)
    with diffprobe.capture(sd_model, ["unet.mid_block", "unet.up_blocks.1"]) as source:
        sd_model.denoise(x_t, t, other)
    with diffprobe.edit(sd_model, Edit("unet.mid_block", "patch", source=source)):
        with diffprobe.capture(sd_model, "unet.mid_block") as patched:
            sd_model.denoise(x_t, t, cond)
    assert torch.equal(patched.last("unet.mid_block"), source.last("unet.mid_block"))


def test_unknown_site_suggests_the_right_name(sd_model):
    with pytest.raises(
        UnknownSiteError, match=r"did you mean 'unet\.mid_block'.*diffprobe sites dummy-sd"
    ):
        with diffprobe.capture(sd_model, "unet.midblock"):
            pass
    with pytest.raises(UnknownSiteError, match="no component 'unett'.*did you mean 'unet'"):
        with diffprobe.capture(sd_model, "unett.mid_block"):
            pass


def test_unknown_tuple_element_lists_the_valid_ones(sd_model, inputs):
    x_t, t, cond = inputs
    with pytest.raises(DiffprobeError, match="hidden_states, res_samples"):
        with diffprobe.capture(sd_model, "unet.down_blocks.1:skip"):
            sd_model.denoise(x_t, t, cond)
    with diffprobe.capture(sd_model, ["unet.down_blocks.1", "unet.down_blocks.1:0"]) as cache:
        sd_model.denoise(x_t, t, cond)
    assert torch.equal(cache.last("unet.down_blocks.1"), cache.last("unet.down_blocks.1:0"))


def test_noise_follows_the_documented_formula(sd_model):
    from diffusers import DDPMScheduler

    x0 = torch.randn(4, 4, 8, 8)
    x_t, t = sd_model.add_noise(x0, noise_level=0.25, seed=3, items=[10, 11, 12, 13])
    T = sd_model.pipe.scheduler.config.num_train_timesteps
    assert float(t[0]) == min(round(0.25 * T), T - 1)
    noise = torch.stack(
        [
            torch.randn(
                4,
                8,
                8,
                generator=torch.Generator().manual_seed(
                    int(np.random.SeedSequence([3, i]).generate_state(1)[0])
                ),
            )
            for i in range(10, 14)
        ]
    )
    expected = DDPMScheduler.from_config(sd_model.pipe.scheduler.config).add_noise(
        x0, noise, torch.full((4,), int(t[0]))
    )
    assert torch.equal(x_t, expected)
    # item noise does not depend on the batch it is in
    alone, _ = sd_model.add_noise(x0[2:3], noise_level=0.25, seed=3, items=[12])
    assert torch.equal(alone[0], x_t[2])
    # noise drawn once and handed in (the grid does this per chunk) gives the same bits
    given, _ = sd_model.add_noise(x0, noise_level=0.25, seed=99, items=[0, 1, 2, 3], noise=noise)
    assert torch.equal(given, expected)
    with pytest.raises(DiffprobeError, match=r"noise of shape \(3, 4, 8, 8\)"):
        sd_model.add_noise(x0, noise_level=0.25, noise=noise[:3])
    # the cached schedule follows a scheduler swapped in with other betas
    pipe = sd_model.pipe
    original = pipe.scheduler
    try:
        pipe.scheduler = DDPMScheduler.from_config(original.config, beta_end=0.02)
        swapped, _ = sd_model.add_noise(x0, noise_level=0.25, seed=3, items=[10, 11, 12, 13])
        assert not torch.equal(swapped, x_t)
        assert torch.equal(swapped, pipe.scheduler.add_noise(x0, noise, torch.full((4,), 250)))
    finally:
        pipe.scheduler = original


def test_bad_inputs_give_clear_errors(sd_model):
    with pytest.raises(DiffprobeError, match="noise level must lie in"):
        sd_model.timestep_for(1.5)
    with pytest.raises(diffprobe.errors.ImageSizeError, match="image size 30 px"):
        sd_model.encode_images(np.zeros((1, 30, 30, 3), np.uint8), size=30)
    with pytest.raises(DiffprobeError, match="needs a value"):
        Edit("unet.mid_block", "add")


def test_item_noise_depends_on_the_run_seed():
    from diffprobe.models.base import item_noise

    a = item_noise((4, 8, 8), seed=0, items=[1, 2])
    b = item_noise((4, 8, 8), seed=1, items=[1, 2])
    assert not torch.equal(a, b)
    assert torch.equal(item_noise((4, 8, 8), seed=1, items=[2]), b[1:])  # per item
    assert not torch.equal(a[0], a[1])
