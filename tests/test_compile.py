"""Regional compilation keeps captures, edits, early stop and gradients exact.

The semantics are tested with dynamo's ``eager`` backend (graphs traced by dynamo, run without
a code generator, so values must be bit-identical and no compiler is needed on CI); the speed
of the inductor backend is measured on the GPU in benchmarks/extract.py (docs/performance.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe.hooks.compiled import compiled_regions, make_reachable, uncompile
from diffprobe.hooks.engine import Add, capture, edit
from diffprobe.testing import dummy_sd_pipeline


def _models():
    """Two copies of the same random SD pipeline: one stays eager, one gets compiled."""
    return (
        diffprobe.from_pipeline(dummy_sd_pipeline(seed=0), name="dummy-sd"),
        diffprobe.from_pipeline(dummy_sd_pipeline(seed=0), name="dummy-sd"),
    )


def _inputs(model, items=2):
    size = model.resolution
    pixels = np.random.default_rng(1).integers(0, 256, (items, size, size, 3), dtype=np.uint8)
    x0 = model.encode_images(pixels, size)
    cond = model.encode_prompt(["a red circle"] * items)
    x_t, t = model.add_noise(x0, noise_level=0.5, seed=0, items=list(range(items)))
    return x_t, t, cond


SITES = ["unet.down_blocks.0", "unet.mid_block", "unet.up_blocks.0.attentions.0", "unet.conv_out"]


def test_regions_are_the_repeated_blocks():
    eager, compiled = _models()
    paths = compiled.compile(backend="eager")
    unet, vae = compiled.denoiser, compiled.pipe.vae
    expected = sorted(
        [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
        + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
        + ["mid_block"]
    )
    assert paths["unet"] == expected
    assert compiled_regions(unet) == expected
    coder = [
        f"{part}.{blocks}.{i}"
        for part, blocks in (("decoder", "up_blocks"), ("encoder", "down_blocks"))
        for i in range(len(getattr(getattr(vae, part), blocks)))
    ]
    assert paths["vae"] == sorted([*coder, "decoder.mid_block", "encoder.mid_block"])
    for root in (unet, vae):
        uncompile(root)
        assert compiled_regions(root) == []
        assert not any("forward" in m.__dict__ for m in root.modules())


@pytest.mark.slow
def test_capture_inside_and_at_boundaries_equals_eager():
    eager, compiled = _models()
    compiled.compile(backend="eager")
    x_t, t, cond = _inputs(eager)
    with capture(eager, SITES) as want:
        out_e = eager.denoise(x_t, t, cond)
    with capture(compiled, SITES) as got:
        out_c = compiled.denoise(x_t, t, cond)
    assert torch.equal(out_e, out_c)
    for site in SITES:
        assert torch.equal(want[site], got[site]), site
    # the site inside up_blocks.0 split that block: its children are the regions now
    regions = compiled_regions(compiled.denoiser)
    assert "up_blocks.0" not in regions
    assert "up_blocks.0.attentions.0" in regions
    assert "down_blocks.0" in regions


@pytest.mark.slow
def test_hook_inside_a_region_runs_only_because_the_region_is_split():
    """Without make_reachable dynamo would run a traced block without the inner hook: the
    split is what makes the capture exact (this test fails if resolve stops splitting)."""
    _, compiled = _models()
    compiled.compile(backend="eager")
    x_t, t, cond = _inputs(compiled)
    compiled.denoise(x_t, t, cond)  # trace the blocks once, before any hook exists
    inner = "unet.down_blocks.1.resnets.0"
    with capture(compiled, [inner]) as cache:
        compiled.denoise(x_t, t, cond)
    assert len(cache.records(inner)) == 1
    assert "down_blocks.1" not in compiled_regions(compiled.denoiser)


@pytest.mark.slow
def test_edit_and_early_stop_equal_eager():
    eager, compiled = _models()
    compiled.compile(backend="eager")
    x_t, t, cond = _inputs(eager)
    channels = eager.module("unet.mid_block").resnets[-1].conv2.out_channels
    direction = torch.linspace(-1, 1, channels)
    outs = []
    for model in (eager, compiled):
        with edit(model, Add("unet.mid_block", direction[None, :, None, None])):
            with capture(model, ["unet.up_blocks.0"], stop_early=True) as cache:
                model.denoise(x_t, t, cond)
        outs.append(cache["unet.up_blocks.0"])
    assert torch.equal(outs[0], outs[1])


@pytest.mark.slow
def test_gradients_through_compiled_regions_equal_eager():
    eager, compiled = _models()
    compiled.compile(backend="aot_eager")
    x_t, t, cond = _inputs(eager)
    grads = []
    for model in (eager, compiled):
        z = x_t.clone().requires_grad_(True)
        with capture(model, ["unet.mid_block"], detach=False, stop_early=True) as cache:
            model.denoise(z, t, cond)
        cache.last("unet.mid_block")[:, 3].mean().backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


def test_make_reachable_on_an_uncompiled_model_is_a_no_op():
    eager, _ = _models()
    make_reachable(eager.denoiser, eager.module("unet.mid_block"))
    assert not any("forward" in m.__dict__ for m in eager.denoiser.modules())


@pytest.mark.slow
def test_channels_last_and_tuned_options_reach_weights_and_compiler(monkeypatch):
    from diffprobe.hooks import compiled as compiled_module

    seen = []
    real = torch.compile

    def spy(fn, **options):
        seen.append(options)
        return real(fn, backend="eager")

    monkeypatch.setattr(compiled_module.torch, "compile", spy)
    eager, model = _models()
    model.compile(channels_last=True, tuned=True)
    conv = model.denoiser.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert model.pipe.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert seen and all(o["options"] == compiled_module.TUNED_INDUCTOR for o in seen)
    x_t, t, cond = _inputs(eager)
    with capture(eager, SITES[:2]) as a:
        eager.denoise(x_t, t, cond)
    with capture(model, SITES[:2]) as b:
        model.denoise(x_t, t, cond)
    for site in SITES[:2]:  # a layout changes the kernels, not the maths
        torch.testing.assert_close(b.last(site), a.last(site), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        _models()[1].compile(tuned=True, mode="max-autotune")


def test_blocks_wrapped_by_another_tool_stay_eager_and_are_named(caplog):
    _, model = _models()
    block = model.denoiser.down_blocks[0]
    block.forward = type(block).forward.__get__(block)  # as nnsight's Envoy patches it
    with caplog.at_level("WARNING", logger="diffprobe.hooks.compiled"):
        paths = model.compile(backend="eager")
    assert "down_blocks.0" not in paths["unet"] and "down_blocks.1" in paths["unet"]
    assert "down_blocks.0" in caplog.text and "stay eager" in caplog.text
