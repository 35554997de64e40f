"""The CFG branch is never mixed up silently: reading a site with both branches asks for one,
captures around the native pipeline are split by branch (or refused), early stop runs only
inside model.denoise; run_with_cache and site filters."""

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe.errors import UnknownSiteError
from diffprobe.hooks.engine import BranchLayoutError, CacheError, StopEarlyError

PROMPT = "a small red circle in the top left"
SITES = ["unet.mid_block", "unet.up_blocks.1", "text_encoder.encoder.layers.3"]


def plain(pipe, guidance=5.0, steps=3):
    return pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images


def hook_count(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks)
        for comp in model.module_components.values()
        for m in comp.modules()
    )


@pytest.fixture(scope="module")
def guided(sd_model):
    """A capture of a 3-step generation with CFG, through model.generate."""
    with diffprobe.capture(sd_model, SITES) as cache:
        sd_model.generate(PROMPT, steps=3, guidance_scale=5.0, seed=0)
    return cache


# -- hole 1: cache[site] stacked the uncond and cond records one after the other ----------------


def test_reading_a_site_with_both_branches_asks_for_one(guided):
    site = "unet.mid_block"
    with pytest.raises(CacheError, match=r"uncond and cond branches; pick one: cache\[") as err:
        guided[site]
    assert "\n" not in str(err.value)
    with pytest.raises(CacheError, match="pick one"):
        guided.stack(site)
    with pytest.raises(CacheError, match="pick one"):
        guided.last(site)
    records = guided.records(site)
    for branch in ("uncond", "cond"):
        expected = torch.stack([r.value for r in records if r.branch == branch])
        assert torch.equal(guided[site, branch], expected)
        assert torch.equal(guided.stack(site, branch=branch), expected)
        assert torch.equal(guided.last(site, branch), expected[-1])
    with pytest.raises(CacheError, match="no record of 'unet.mid_block' with branch 'none'"):
        guided[site, "none"]


def test_view_puts_the_branches_on_their_own_axis(guided):
    site = "unet.up_blocks.1"
    view = guided.view(site)
    assert view.branches == ("uncond", "cond")
    assert view.calls == (0, 1, 2)
    assert view.values.shape == (3, 2, *guided.last(site, "cond").shape)
    for index, branch in enumerate(view.branches):
        assert torch.equal(view.values[:, index], guided[site, branch])
        assert torch.equal(view.branch(branch), guided[site, branch])
    assert view.noise_levels == tuple(t / 1000 for t in view.timesteps)


def test_a_site_of_one_branch_needs_no_choice(guided, sd_model):
    # the text encoder runs outside denoiser calls: one "none" branch, prompt and negative prompt
    site = "text_encoder.encoder.layers.3"
    assert guided.branches(site) == ("none",)
    assert torch.equal(guided[site], torch.stack([r.value for r in guided.records(site)]))
    with diffprobe.capture(sd_model, "unet.mid_block") as cache:
        sd_model.generate(PROMPT, steps=2, guidance_scale=1.0, seed=0)
    assert cache.branches("unet.mid_block") == ("none",)
    assert cache["unet.mid_block"].shape[:2] == (2, 1)


# -- hole 2: a capture around the native pipeline recorded the doubled batch as "none" ----------


@pytest.mark.slow
def test_capture_around_the_native_pipeline_splits_the_branches(sd_model, guided):
    reference = plain(sd_model.pipe)
    for target in (sd_model, sd_model.pipe):  # a diffprobe model or the bare pipeline
        with diffprobe.capture(target, SITES) as native:
            images = sd_model.pipe(
                PROMPT,
                num_inference_steps=3,
                guidance_scale=5.0,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="np",
            ).images
        assert np.array_equal(images, reference)
        for site in SITES[:2]:
            got = [(r.call, r.branch) for r in native.records(site)]
            assert got == [(c, b) for c in range(3) for b in ("uncond", "cond")]
            for branch in ("uncond", "cond"):
                assert torch.equal(native[site, branch], guided[site, branch])


def test_native_pipeline_without_guidance_is_one_branch(sd_model):
    with diffprobe.capture(sd_model, "unet.mid_block") as cache:
        plain(sd_model.pipe, guidance=1.0, steps=2)
    assert [r.branch for r in cache.records("unet.mid_block")] == ["none", "none"]
    assert cache["unet.mid_block"].shape[1] == 1


def test_a_direct_denoiser_call_after_a_guided_generation_is_not_split(sd_model, guided):
    # the pipeline keeps its guidance scale after __call__; a later direct call is the batch the
    # caller built, not a CFG batch
    plain(sd_model.pipe, guidance=5.0, steps=1)
    assert sd_model.pipe.do_classifier_free_guidance
    x = torch.randn(2, 4, 32, 32)
    embeds = sd_model.encode_prompt(["a", "b"]).cond["encoder_hidden_states"]
    with diffprobe.capture(sd_model, "unet.mid_block") as cache, torch.no_grad():
        sd_model.pipe.unet(x, torch.tensor([500, 500]), encoder_hidden_states=embeds)
    (record,) = cache.records("unet.mid_block")
    assert record.branch == "none" and record.value.shape[0] == 2


def test_native_pipeline_that_cannot_tell_its_branches_is_refused():
    from diffprobe.testing.flux import dummy_flux_pipeline

    model = diffprobe.from_pipeline(dummy_flux_pipeline(seed=1, guidance_embeds=True))
    before = hook_count(model)
    ran = []
    handle = model.pipe.transformer.register_forward_hook(lambda *a: ran.append(1))
    try:
        with pytest.raises(BranchLayoutError, match="cannot tell the CFG branches of FluxPipeline"):
            with diffprobe.capture(model, "transformer.transformer_blocks.0"):
                model.pipe(
                    prompt="a red circle",
                    negative_prompt="",
                    true_cfg_scale=2.5,
                    num_inference_steps=1,
                    height=32,
                    width=32,
                    output_type="np",
                )
    finally:
        handle.remove()
    assert ran == []  # refused before the transformer ran
    assert hook_count(model) == before
    # its own generate labels the calls (tests/test_family_flux.py)
    with diffprobe.capture(model, "transformer.transformer_blocks.0") as cache:
        model.generate("a red circle", steps=1, size=32, true_cfg_scale=2.5, negative_prompt="")
    assert cache.branches("transformer.transformer_blocks.0") == ("cond", "uncond")
    # FLUX's transformer receives sigma itself: that is the call's noise level
    records = cache.records("transformer.transformer_blocks.0")
    assert all(0 < r.noise_level <= 1 and r.noise_level == r.timestep for r in records)


def test_native_pipeline_extra_conditional_pass_is_its_own_branch():
    # SD3's skip-layer guidance runs the conditional batch alone after the doubled one: an even
    # batch that must not be split (the same labels as model.generate gives)
    from diffprobe.testing.sd3 import dummy_sd3_pipeline

    model = diffprobe.from_pipeline(dummy_sd3_pipeline(seed=0))
    site = "transformer.transformer_blocks.0"
    kwargs = dict(
        prompt=["a red circle", "a blue square"],
        num_inference_steps=2,
        guidance_scale=5.0,
        height=32,
        width=32,
        output_type="np",
        skip_guidance_layers=[1],
        skip_layer_guidance_start=0.0,
        skip_layer_guidance_stop=1.0,
    )
    with diffprobe.capture(model, site) as native:
        model.pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0))
    expected = ["uncond", "cond", "uncond", "cond", "none"]
    assert [r.branch for r in native.records(site)] == expected
    assert all(r.value.shape[0] == 2 for r in native.records(site))


def test_native_unconditional_pipeline_is_one_branch():
    from diffprobe.testing.ddpm import dummy_ddpm_pipeline

    model = diffprobe.from_pipeline(dummy_ddpm_pipeline())
    with diffprobe.capture(model, "unet.mid_block") as cache:
        model.pipe(batch_size=2, num_inference_steps=2, output_type="np")
    assert cache.branches("unet.mid_block") == ("none",)
    assert cache["unet.mid_block"].shape[:2] == (2, 2)


# -- hole 3: stop_early around generate swallowed StopForward and skipped the with-block --------


def test_stop_early_around_generate_is_refused_before_anything_runs(sd_model):
    before = hook_count(sd_model)
    ran = []
    handle = sd_model.pipe.text_encoder.register_forward_hook(lambda *a: ran.append(1))
    after_generate = []
    try:
        with pytest.raises(StopEarlyError, match=r"stop_early=True.*model\.generate") as err:
            with diffprobe.capture(sd_model, "unet.mid_block", stop_early=True):
                sd_model.generate(PROMPT, steps=2, guidance_scale=5.0, seed=0)
                after_generate.append(1)  # pragma: no cover
    finally:
        handle.remove()
    assert "\n" not in str(err.value)
    assert ran == [] and after_generate == []
    assert hook_count(sd_model) == before
    # nothing is left armed: generation works again
    assert sd_model.generate(PROMPT, steps=1, seed=0).shape == (1, 64, 64, 3)


def test_stop_early_around_the_native_pipeline_is_refused(sd_model):
    ran = []
    handle = sd_model.pipe.unet.conv_in.register_forward_hook(lambda *a: ran.append(1))
    try:
        with pytest.raises(StopEarlyError, match="not a model.denoise"):
            with diffprobe.capture(sd_model, "unet.mid_block", stop_early=True):
                plain(sd_model.pipe, steps=2)
    finally:
        handle.remove()
    assert ran == []  # refused before the denoiser's first layer


def test_stop_early_in_a_text_encoder_is_refused(sd_model):
    with pytest.raises(StopEarlyError, match="'text_encoder'"):
        with diffprobe.capture(sd_model, "text_encoder.encoder.layers.1", stop_early=True):
            sd_model.encode_prompt([PROMPT])


def test_stop_early_inside_denoise_still_works_and_the_block_goes_on(sd_model):
    x = torch.randn(2, 4, 32, 32)
    cond = sd_model.encode_prompt(["a", "b"], negative="")
    steps = []
    with diffprobe.capture(sd_model, "unet.mid_block", stop_early=True) as cache:
        assert sd_model.denoise(x, 500, cond, guidance_scale=5.0) is None
        steps.append("after denoise")
    assert steps == ["after denoise"]
    assert cache["unet.mid_block", "cond"].shape[:2] == (1, 2)


# -- run_with_cache and site filters ------------------------------------------------------------


def top_level_blocks(unet):
    names = [f"unet.down_blocks.{i}" for i in range(len(unet.down_blocks))]
    names += [f"unet.up_blocks.{i}" for i in range(len(unet.up_blocks))]
    return [*names, "unet.mid_block"]  # in module registration order


@pytest.mark.slow
def test_run_with_cache_is_capture_around_generate(sd_model):
    images, cache = sd_model.run_with_cache(
        PROMPT, "unet.*_block*", steps=3, guidance_scale=5.0, seed=0
    )
    assert np.array_equal(images, plain(sd_model.pipe))
    assert cache.sites and sorted(cache.sites) == sorted(top_level_blocks(sd_model.pipe.unet))
    with diffprobe.capture(sd_model, top_level_blocks(sd_model.pipe.unet)) as explicit:
        sd_model.generate(PROMPT, steps=3, guidance_scale=5.0, seed=0)
    for site in explicit.sites:
        assert torch.equal(cache[site, "cond"], explicit[site, "cond"])


def test_site_filters_glob_and_callable(sd_model):
    from diffprobe.hooks.engine import select_sites

    comps = sd_model.module_components
    assert select_sites(comps, "unet.*_block*") == top_level_blocks(sd_model.pipe.unet)
    cross = [
        f"unet.{name}" for name, _ in sd_model.pipe.unet.named_modules() if name.endswith("attn2")
    ]
    assert cross and select_sites(comps, "unet.*.attn2") == cross
    assert select_sites(comps, lambda name: name.endswith("attn2")) == cross
    layers = select_sites(comps, ["text_encoder.encoder.layers.*:input", "unet.mid_block"])
    assert layers == [
        *(f"text_encoder.encoder.layers.{i}:input" for i in range(5)),
        "unet.mid_block",
    ]
    with diffprobe.capture(sd_model, "text_encoder.encoder.layers.*") as cache:
        sd_model.encode_prompt([PROMPT])
    assert cache.sites == [f"text_encoder.encoder.layers.{i}" for i in range(5)]


def test_site_filters_that_match_nothing_say_so(sd_model):
    with pytest.raises(UnknownSiteError, match=r"no site matches 'unet\.midblok\*'; did you mean "
                       r"'unet\.mid_block'\?.*diffprobe sites dummy-sd"):  # fmt: skip
        sd_model.run_with_cache(PROMPT, "unet.midblok*", steps=1)
    with pytest.raises(UnknownSiteError, match="accepted none of the sites"):
        with diffprobe.capture(sd_model, lambda name: False):
            pass
    with pytest.raises(UnknownSiteError, match="did you mean 'unet.mid_block'"):
        sd_model.run_with_cache(PROMPT, ["unet.midblock"], steps=1)
