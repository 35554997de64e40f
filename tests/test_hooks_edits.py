"""Typed edits against direct computations (hand-written forward hooks, torch ops on captured
values), windows in noise levels and timesteps, the Edit factory, one-line errors, cleanup."""

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe import (
    Ablate,
    Add,
    Apply,
    Clamp,
    Edit,
    NoiseWindow,
    Patch,
    Replace,
    Scale,
    TimestepWindow,
)
from diffprobe.hooks.engine import EditError

SITE = "unet.mid_block"  # (items, 64, 16, 16) on the dummy SD at 64 px
TOKENS = "unet.down_blocks.1.attentions.0.transformer_blocks.0"  # (items, 256, 64)
PROMPT = "a small red circle in the top left"


@pytest.fixture(scope="module")
def inputs(sd_model):
    images = np.random.default_rng(2).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        x0 = sd_model.encode_images(images)
        x_t, t = sd_model.add_noise(x0, noise_level=0.4, seed=5)
        cond = sd_model.encode_prompt(["a red circle", "a blue square", ""], negative="")
    return x_t, t, cond


def by_hand(sd_model, inputs, site, change):
    """The plain UNet's prediction with ``change(output)`` in a hand-written forward hook."""
    x_t, t, cond = inputs
    handle = sd_model.module(site).register_forward_hook(lambda m, a, out: change(out))
    try:
        with torch.no_grad():
            return sd_model.pipe.unet(
                x_t, t, encoder_hidden_states=cond.cond["encoder_hidden_states"]
            ).sample
    finally:
        handle.remove()


def edited(sd_model, inputs, *edits, guidance=None):
    x_t, t, cond = inputs
    with diffprobe.edit(sd_model, list(edits)), torch.no_grad():
        return sd_model.denoise(x_t, t, cond, guidance_scale=guidance)


def captured(sd_model, inputs, site, *edits):
    """(value before the edits, value after them) at ``site``."""
    x_t, t, cond = inputs
    with (
        diffprobe.capture(sd_model, site) as before,
        diffprobe.edit(sd_model, list(edits)),
        diffprobe.capture(sd_model, site) as after,
        torch.no_grad(),
    ):
        sd_model.denoise(x_t, t, cond)
    return before.last(site), after.last(site)


def test_add_equals_a_handwritten_hook(sd_model, inputs):
    per_item = torch.randn(3, 64, 16, 16)
    vector = torch.randn(64)
    assert torch.equal(
        edited(sd_model, inputs, Add(SITE, per_item)),
        by_hand(sd_model, inputs, SITE, lambda out: out + per_item),
    )
    assert torch.equal(
        edited(sd_model, inputs, Add(SITE, vector)),
        by_hand(sd_model, inputs, SITE, lambda out: out + vector.view(1, -1, 1, 1)),
    )
    # a channel vector on token sequences runs along the last axis
    assert torch.equal(
        edited(sd_model, inputs, Add(TOKENS, vector)),
        by_hand(sd_model, inputs, TOKENS, lambda out: out + vector),
    )


def test_channels_restrict_an_edit(sd_model, inputs):
    def add_to_some(out):
        out = out.clone()
        out[:, [5, 9]] += 2.0
        return out

    assert torch.equal(
        edited(sd_model, inputs, Add(SITE, 2.0, channels=[5, 9])),
        by_hand(sd_model, inputs, SITE, add_to_some),
    )
    before, after = captured(
        sd_model, inputs, SITE, Scale(SITE, torch.tensor([3.0, -1.0]), channels=[0, 7])
    )
    expected = before.clone()
    expected[:, 0] *= 3.0
    expected[:, 7] *= -1.0
    assert torch.equal(after, expected)


@pytest.mark.slow
def test_scale_replace_ablate_clamp_on_the_captured_value(sd_model, inputs):
    before, after = captured(sd_model, inputs, SITE, Scale(SITE, 0.5))
    assert torch.equal(after, before * 0.5)
    replacement = torch.randn(64, 16, 16)
    _, after = captured(sd_model, inputs, SITE, Replace(SITE, replacement))
    assert torch.equal(after, replacement.expand(3, -1, -1, -1))
    _, after = captured(sd_model, inputs, SITE, Ablate(SITE))
    assert torch.equal(after, torch.zeros_like(after))
    before, after = captured(sd_model, inputs, SITE, Clamp(SITE, min=-0.1, max=0.2))
    assert torch.equal(after, torch.clamp(before, -0.1, 0.2))
    low = torch.linspace(-1, 0, 64)
    before, after = captured(sd_model, inputs, SITE, Clamp(SITE, min=low))
    assert torch.equal(after, torch.clamp(before, min=low.view(1, -1, 1, 1)))


def test_masks_on_maps_and_on_tokens(sd_model, inputs):
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[3:7, 2:12] = True
    before, after = captured(sd_model, inputs, SITE, Ablate(SITE, mask=mask))
    assert torch.equal(after, torch.where(mask, 0.0, before))
    # a (height, width) mask on (items, height × width, channels) tokens, row-major
    before, after = captured(sd_model, inputs, TOKENS, Scale(TOKENS, 2.0, mask=mask.int()))
    assert torch.equal(after, torch.where(mask.reshape(1, 256, 1), before * 2.0, before))


@pytest.mark.slow
def test_edits_apply_to_their_branch_only(sd_model, inputs):
    x_t, t, cond = inputs
    value = torch.randn(3, 64, 16, 16)  # per item: each branch has 3 items
    with diffprobe.capture(sd_model, "unet.up_blocks.1") as plain, torch.no_grad():
        sd_model.denoise(x_t, t, cond, guidance_scale=7.5)
    with (
        diffprobe.edit(sd_model, Add(SITE, value, branch="uncond")),
        diffprobe.capture(sd_model, "unet.up_blocks.1") as after,
        torch.no_grad(),
    ):
        sd_model.denoise(x_t, t, cond, guidance_scale=7.5)
    assert torch.equal(after["unet.up_blocks.1", "cond"], plain["unet.up_blocks.1", "cond"])
    # the unconditional half equals the unconditional batch run alone with the addition by hand
    seen = []
    handles = [
        sd_model.pipe.unet.mid_block.register_forward_hook(lambda m, a, out: out + value),
        sd_model.pipe.unet.up_blocks[1].register_forward_hook(lambda m, a, out: seen.append(out)),
    ]
    try:
        with torch.no_grad():
            sd_model.pipe.unet(x_t, t, encoder_hidden_states=cond.uncond["encoder_hidden_states"])
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(
        after["unet.up_blocks.1", "uncond"][0], seen[0], rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(
        after["unet.up_blocks.1", "uncond"], plain["unet.up_blocks.1", "uncond"]
    )
    # without CFG the single pass counts as the conditional one
    assert torch.equal(
        edited(sd_model, inputs, Add(SITE, value, branch="cond")),
        by_hand(sd_model, inputs, SITE, lambda out: out + value),
    )
    assert torch.equal(
        edited(sd_model, inputs, Add(SITE, value, branch="uncond")),
        by_hand(sd_model, inputs, SITE, lambda out: out),
    )


def test_apply_sees_one_branch_at_a_time(sd_model, inputs):
    seen = []

    def double(value, state):
        seen.append((state.index, state.branch, value.shape[0]))
        return value * 2

    assert torch.equal(
        edited(sd_model, inputs, Apply(SITE, double), guidance=5.0),
        edited(sd_model, inputs, Scale(SITE, 2.0), guidance=5.0),
    )
    assert seen == [(0, "uncond", 3), (0, "cond", 3)]


def test_patch_transplants_one_branch(sd_model, inputs):
    x_t, t, cond = inputs
    other = sd_model.encode_prompt(["a green star"] * 3, negative="a")
    with diffprobe.capture(sd_model, SITE) as source, torch.no_grad():
        sd_model.denoise(x_t, t, other, guidance_scale=5.0)
    with (
        diffprobe.capture(sd_model, SITE) as plain,
        diffprobe.edit(sd_model, Patch(SITE, source, branch="cond")),
        diffprobe.capture(sd_model, SITE) as patched,
        torch.no_grad(),
    ):
        sd_model.denoise(x_t, t, cond, guidance_scale=5.0)
    assert torch.equal(patched[SITE, "cond"], source[SITE, "cond"])
    assert torch.equal(patched[SITE, "uncond"], plain[SITE, "uncond"])
    assert not torch.equal(source[SITE, "uncond"], plain[SITE, "uncond"])


@pytest.mark.slow
def test_windows_in_noise_levels_and_timesteps_select_the_same_calls(sd_model):
    scheduler = sd_model.pipe.scheduler
    scheduler.set_timesteps(4)
    timesteps = [float(t) for t in scheduler.timesteps]
    T = scheduler.config.num_train_timesteps
    low, high = timesteps[2] - 0.5, timesteps[1] + 0.5  # the middle two of four steps

    def calls_edited(window):
        seen = []

        def note(value, state):
            seen.append((state.index, state.timestep, state.noise_level))
            return value

        with diffprobe.edit(sd_model, Apply(SITE, note, window=window, branch="cond")):
            sd_model.generate(PROMPT, steps=4, guidance_scale=5.0, seed=0)
        return seen

    by_timestep = calls_edited(TimestepWindow(low, high))
    by_noise = calls_edited(NoiseWindow(low / T, high / T))
    assert by_timestep == by_noise
    assert [(index, t) for index, t, _ in by_timestep] == [(1, timesteps[1]), (2, timesteps[2])]
    assert all(level == t / T for _, t, level in by_noise)
    # the factory's timesteps=(low, high) is a TimestepWindow
    assert Edit(SITE, "ablate", timesteps=(low, high)).window == TimestepWindow(low, high)


def test_the_edit_factory_builds_typed_edits(sd_model, inputs):
    spec = Edit(SITE, "scale", factor=2.0)
    assert isinstance(spec, Scale) and spec.factor == 2.0
    assert isinstance(Edit(SITE, value=1.0), Add)
    assert isinstance(Edit(SITE, "fn", fn=lambda v, s: v), Apply)
    assert torch.equal(
        edited(sd_model, inputs, Edit(SITE, "clamp", max=0.0)),
        edited(sd_model, inputs, Clamp(SITE, max=0.0)),
    )
    with pytest.raises(
        EditError, match="Edit op 'scale' at 'unet.mid_block' takes factor, not value"
    ):
        Edit(SITE, "scale", factor=2, value=3)
    with pytest.raises(EditError, match="needs a factor"):
        Edit(SITE, "scale")
    with pytest.raises(EditError, match="unknown edit op 'shift'"):
        Edit(SITE, "shift")


def one_line(error_info):
    message = str(error_info.value)
    assert "\n" not in message, message
    return message


def test_construction_errors_are_one_line():
    with pytest.raises(TypeError):  # a field the edit does not have
        Scale(SITE, factor=2.0, value=3.0)
    cases = [
        (lambda: Add(SITE, "up"), "value must be a number or a tensor, got str"),
        (lambda: Add(SITE, 1.0, mask=torch.full((4, 4), 0.5)), "values other than 0 and 1"),
        (lambda: Add(SITE, 1.0, mask=torch.ones(1, 4, 4)), r"mask of shape \(1, 4, 4\)"),
        (lambda: Add(SITE, 1.0, window=(0.2, 0.5)), r"NoiseWindow\(0.2, 0.5\) for noise levels"),
        (lambda: Add(SITE, 1.0, branch="both"), "branch must be None, 'cond' or 'uncond'"),
        (lambda: Add(SITE, 1.0, channels=[1, 1]), "distinct"),
        (lambda: NoiseWindow(0.2, 2.0), "noise levels lie in"),
        (lambda: TimestepWindow(800, 200), "low must not exceed high"),
        (lambda: Clamp(SITE), "needs min=, max= or both"),
        (lambda: Clamp(SITE, min=1.0, max=0.0), "exceeds"),
        (lambda: Patch(SITE, {}), "source must be a Cache"),
        (lambda: Apply(SITE, 3), "fn must be callable"),
    ]
    for build, message in cases:
        with pytest.raises(EditError, match=message) as err:
            build()
        one_line(err)


def test_application_errors_name_the_site_and_the_shapes(sd_model, inputs):
    cases = [
        (
            Add(SITE, torch.randn(3, 7)),
            r"Add at 'unet.mid_block': value of shape \(3, 7\) does not fit the site's value "
            r"per CFG branch "
            r"\(items, channels, height, width\) = \(3, 64, 16, 16\)",
        ),
        (Add(SITE, torch.randn(10)), r"a \(64,\) channel vector"),
        (Ablate(SITE, mask=torch.ones(8, 8, dtype=torch.bool)), r"expected \(16, 16\)"),
        (Scale(SITE, 2.0, channels=[70]), "which has 64 channels"),
        (Apply(SITE, lambda v, s: v[:1]), r"fn returned \(1, 64, 16, 16\)"),
        (Patch(SITE, diffprobe.Cache()), "the source cache holds no record of it"),
    ]
    for spec, message in cases:
        with pytest.raises(EditError, match=message) as err:
            edited(sd_model, inputs, spec)
        one_line(err)


def test_hooks_are_removed_after_errors(sd_model, inputs):
    def count():
        return sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks)
            for comp in sd_model.module_components.values()
            for m in comp.modules()
        )

    before = count()
    with pytest.raises(EditError):
        with diffprobe.capture(sd_model, [SITE, TOKENS]):
            edited(sd_model, inputs, Scale(TOKENS, 1.0), Add(SITE, torch.randn(2, 2)))
    with pytest.raises(EditError, match="NoiseWindow needs a diffprobe model"):
        with diffprobe.edit(sd_model.pipe, Ablate(SITE, window=NoiseWindow(0, 1))):
            pass
    assert count() == before


def test_patch_outside_denoiser_calls_matches_forwards_in_order(sd_model):
    site = "text_encoder.encoder.layers.2"
    with diffprobe.capture(sd_model, site) as source:
        sd_model.encode_prompt(["a green star"], negative="a blue square")
    with (
        diffprobe.edit(sd_model, Patch(site, source)),
        diffprobe.capture(sd_model, site) as patched,
    ):
        sd_model.encode_prompt(["a red circle"], negative="")
    # prompt then negative prompt: the n-th forward got the n-th record
    assert len(patched.records(site)) == 2
    for got, want in zip(patched.records(site), source.records(site), strict=True):
        assert torch.equal(got.value, want.value)
    with pytest.raises(EditError, match="forward 3 needs one more"):
        with diffprobe.edit(sd_model, Patch(site, source)):
            sd_model.encode_prompt(["a"], negative="")
            sd_model.encode_prompt(["c"])
