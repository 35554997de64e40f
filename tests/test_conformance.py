"""One conformance suite over every registered family (timm's ``test_models.py`` way).

Each test runs on every dummy case registered by ``diffprobe/testing/<family>.py`` (the tiny
seeded pipelines of diffusers' own tests): sites listed and resolvable, meta-device shapes equal
to a real forward's, ``encode_images`` / ``encode_prompt`` / ``add_noise`` / ``denoise`` against
independent computations, generation bit for bit equal to the native pipeline with no-op hooks,
CFG branches kept apart, the default guidance, the one size rule, the text towers. What is
truly unique to a family stays in ``tests/test_family_<family>.py``.

The last case is a *toy family* defined here: one adapter class and its dummy components,
registered for the duration of its tests. Adding a family is that and nothing else.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import diffprobe
from diffprobe import Edit, registry
from diffprobe.errors import DiffprobeError, ImageSizeError
from diffprobe.hooks.elements import element_index, element_names
from diffprobe.lens import LensError, lens_embeddings, towers
from diffprobe.models import Conditioning, Model, TextEncoding, meta
from diffprobe.models.geometry import SizeRule, unet_rule, vae_factor
from diffprobe.models.towers import Tower, last_layer_tower
from diffprobe.models.unet import UNET_TUPLE_ELEMENTS, text_unet_inputs
from diffprobe.registry import registered_adapter
from diffprobe.testing import (
    SD_SCHEDULE,
    DummyCase,
    dummy_cases,
    dummy_clip_text_config,
    dummy_clip_tokenizer,
    dummy_vae,
    plain_generate,
    registered_dummies,
)

PROMPTS = ["a red circle", "a blue square on white"]
STEPS = 2

# ------------------------------------------------------------------------ the toy family


class ToyPipeline(StableDiffusionPipeline):
    """A UNet2DConditionModel text-to-image pipeline under its own name."""


class ToyModel(Model):
    """A whole family in one class: what an adapter file holds."""

    family = "toy"
    pipeline_classes = ("ToyPipeline",)
    denoiser_name = "unet"
    denoiser_classes = ("UNet2DConditionModel",)
    default_guidance_scale = 6.0
    tuple_elements = UNET_TUPLE_ELEMENTS
    default_encoder = "text_encoder"
    assemble_options = {"requires_safety_checker": False}

    @classmethod
    def pipeline_class(cls, name: str | None = None) -> type:
        return ToyPipeline

    @classmethod
    def size_rule_for(cls, configs) -> SizeRule:
        return unet_rule(vae_factor(configs.get("vae")), configs["unet"], 8)

    @classmethod
    def meta_denoiser_inputs(cls, config, geometry) -> dict:
        return text_unet_inputs(config, geometry)

    @classmethod
    def text_towers(cls, pipe) -> dict[str, Tower]:
        return {"text_encoder": last_layer_tower("text_encoder", pipe.text_encoder, "clip")}

    def encode_images(self, images, size=None) -> torch.Tensor:
        pixels = self.prepare_images(images, size)
        with torch.no_grad():
            mean = self.pipe.vae.encode(pixels).latent_dist.mean
        return mean * self.pipe.vae.config.scaling_factor

    def _encode_prompt(self, prompts, negative, uncond) -> Conditioning:
        with torch.no_grad():
            cond, unconditional = self.pipe.encode_prompt(
                prompts, self.device, 1, uncond, negative_prompt=negative
            )
        return Conditioning(
            {"encoder_hidden_states": cond},
            {"encoder_hidden_states": unconditional} if uncond else None,
            prompts,
        )

    def encode_text(self, prompts) -> TextEncoding:
        tokens = self.pipe.tokenizer(
            list(prompts), padding="max_length", max_length=77, truncation=True,
            return_tensors="pt",
        )  # fmt: skip
        with torch.no_grad():
            out = self.pipe.text_encoder(tokens.input_ids, output_hidden_states=True)
        return TextEncoding(
            {"text_encoder": tuple(out.hidden_states)},
            {"text_encoder": tokens.input_ids},
            {"text_encoder": None},
        )

    def denoiser_kwargs(self, x_t, timestep, cond) -> dict:
        return {"sample": x_t, "timestep": timestep,
                "encoder_hidden_states": cond["encoder_hidden_states"], "return_dict": False}  # fmt: skip


def dummy_toy_pipeline(seed: int = 0) -> ToyPipeline:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        norm_num_groups=32,
    )  # fmt: skip
    tokenizer = dummy_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(dummy_clip_text_config(tokenizer))
    components = dict(unet=unet.eval(), vae=dummy_vae(seed=seed).eval(), tokenizer=tokenizer,
                      text_encoder=text_encoder.eval(), scheduler=DDIMScheduler(**SD_SCHEDULE))  # fmt: skip
    pipe = ToyModel.assemble(components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


TOY_CASE = DummyCase(
    name="toy",
    family="toy",
    build=dummy_toy_pipeline,
    call_denoiser=lambda pipe, x_t, t, branch: pipe.unet(
        x_t, t, encoder_hidden_states=branch["encoder_hidden_states"]
    ).sample,
    sites=("unet:input", "unet.down_blocks.0", "unet.down_blocks.0.attentions.0",
           "unet.mid_block", "unet.up_blocks.1.attentions.0", "text_encoder.encoder.layers.1"),
    hooked={"unet.down_blocks.0": 0, "unet.down_blocks.0.attentions.0": 0, "unet.mid_block": 0},
    stop_sites=("unet.down_blocks.0", "unet.mid_block"),
    later_site="unet.conv_out",
    resolution=32,
    size_multiple=8,  # VAE factor 2 × 2 down-samplings is 4; the SD pipeline takes 8s
    default_guidance_scale=6.0,
)  # fmt: skip

CASES = [*dummy_cases(), TOY_CASE]


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=CASES, ids=[case.name for case in CASES])
def case(request):
    if request.param is not TOY_CASE:
        yield request.param
        return
    # registered only while its tests run: no test changes the registries for others
    with (
        registered_adapter(ToyModel),
        registered_dummies("toy", TOY_CASE, scheduler=lambda alias: None),
    ):
        yield request.param


@pytest.fixture(scope="module")
def model(case):
    model = diffprobe.from_pipeline(case.build(0), name=f"dummy-{case.name}")
    return model


@pytest.fixture(scope="module")
def folder(case, model, tmp_path_factory):
    """The dummy's configs in diffusers layout, for the meta device (no weights)."""
    root = tmp_path_factory.mktemp(f"configs-{case.name}")
    for name, module in model.module_components.items():
        if hasattr(module, "save_config"):  # diffusers
            module.save_config(root / name)
        else:  # transformers: the class goes in "architectures", as save_pretrained writes it
            config = copy.deepcopy(module.config)
            config.architectures = [type(module).__name__]
            config.save_pretrained(root / name)
    (root / "model_index.json").write_text(json.dumps({"_class_name": type(model.pipe).__name__}))
    return root


@pytest.fixture(scope="module")
def reference(case, model):
    """The native pipeline's generation (with CFG when the family has it)."""
    kwargs = case.cfg_kwargs if case.cfg_kwargs is not None else case.no_cfg_kwargs
    return plain_generate(case, model.pipe, PROMPTS, steps=STEPS, seed=0,
                          size=model.resolution, **kwargs)  # fmt: skip


def images(model, size=None, items=2, seed=0):
    size = size or model.resolution
    return np.random.default_rng(seed).integers(0, 256, (items, size, size, 3), dtype=np.uint8)


def conditioning(case, model, **kwargs):
    if case.unconditional:
        return model.encode_prompt([""] * len(PROMPTS))
    return model.encode_prompt(PROMPTS, **kwargs)


@pytest.fixture(scope="module")
def noisy(model):
    x0 = model.encode_images(images(model))
    x_t, t = model.add_noise(x0, noise_level=0.6, seed=3)
    return x0, x_t, t


def concat(a, b):
    if isinstance(a, dict):
        return {key: concat(a[key], b[key]) for key in a}
    return torch.cat([a, b])


def tensors(tree):
    if isinstance(tree, dict):
        return [t for key in sorted(tree) for t in tensors(tree[key])]
    return [tree]


def tree_equal(a, b) -> bool:
    return len(tensors(a)) == len(tensors(b)) and all(
        torch.equal(x, y) for x, y in zip(tensors(a), tensors(b), strict=True)
    )


def branches(case) -> tuple:
    """The branch labels of one CFG step, in call order."""
    return ("cond", "uncond") if case.cfg_calls == "calls" else ("uncond", "cond")


def denoiser_block(case, model) -> str:
    return next(s for s in case.stop_sites if ":" not in s)


# -------------------------------------------------------------------------- the registry


def test_every_registered_family_has_dummy_components():
    covered = {case.family for case in CASES}
    assert set(registry.families()) <= covered
    assert {"sd", "sdxl", "sd3", "flux", "if", "ddpm"} <= covered
    for spec in registry.list_models():
        assert spec.family in registry.families(), spec.alias


def test_adapter_wraps_and_assembles_its_pipeline(case, model):
    adapter = registry.adapter(case.family)
    assert type(model) is adapter and model.family == case.family
    assert registry.adapter_for_pipeline(model.pipe) is adapter
    rebuilt = adapter.assemble(
        {k: v for k, v in model.pipe.components.items() if v is not None},
        pipeline=type(model.pipe).__name__,
    )
    assert type(rebuilt) is type(model.pipe)
    for name, module in model.module_components.items():
        assert getattr(rebuilt, name) is module


# ------------------------------------------------------------------------------- sites


def test_sites_are_listed_and_resolve_to_their_modules(case, model, folder):
    names = model.site_names()
    assert {site.split(".")[0] for site in names} == set(model.module_components)
    for site in names:
        component, _, path = site.partition(".")
        assert model.module(site) is model.module_components[component].get_submodule(path)
    for site in [*case.sites, *case.hooked, *case.stop_sites, case.later_site]:
        base = site.split(":")[0]
        assert base in names or base in model.module_components, site
    assert set(meta.site_shapes(folder, model.resolution)) <= set(names)


def per_item(shape) -> tuple:
    shape = tuple(int(d) for d in shape)
    return shape[1:] if shape and shape[0] == len(PROMPTS) else shape


def describe(value):
    if isinstance(value, torch.Tensor):
        return per_item(value.shape)
    if isinstance(value, (tuple, list)) and value:
        parts = tuple(describe(v) for v in value)
        return parts if any(p is not None for p in parts) else None
    return None


def real_record(module, output):
    """(class, default shape, elements) of what a module returned in a real forward."""
    name = type(module).__name__
    if isinstance(output, torch.Tensor):
        return name, per_item(output.shape), {}
    if isinstance(output, dict):
        elements = {k: describe(v) for k, v in output.items() if describe(v) is not None}
        return (name, next(iter(elements.values())), elements) if elements else None
    if isinstance(output, (tuple, list)) and output:
        parts = [describe(v) for v in output]
        if all(p is None for p in parts):
            return None
        labels = element_names(name)
        if labels is None or len(labels) != len(parts):
            labels = [str(i) for i in range(len(parts))]
        default = parts[element_index(name, None, len(parts))]
        default = default if default is not None else next(p for p in parts if p is not None)
        return name, default, {k: p for k, p in zip(labels, parts, strict=True) if p is not None}
    return None


def real_shapes(model, size) -> dict:
    """Every site's (class, shape, elements, calls) in real forwards of each component: the
    denoiser through ``denoise``, text encoders on the ids ``encode_text`` tokenizes, the VAE
    encoding an image and decoding a latent."""
    first, calls, handles = {}, {}, []

    def hook_for(site):
        def hook(module, args, output):
            calls[site] = calls.get(site, 0) + 1
            if site not in first and real_record(module, output) is not None:
                first[site] = real_record(module, output)

        return hook

    pixels = model.prepare_images(images(model, size), size)
    x0 = model.encode_images(images(model, size), size)
    x_t, t = model.add_noise(x0, noise_level=0.5, seed=0)
    prompts = [""] * len(PROMPTS) if not model.text_towers(model.pipe) else PROMPTS
    cond = model.encode_prompt(prompts)
    text = model.encode_text(prompts)
    try:
        for component, module in model.module_components.items():
            for name, sub in module.named_modules():
                if name:
                    handles.append(sub.register_forward_hook(hook_for(f"{component}.{name}")))
        with torch.no_grad():
            model.denoise(x_t, t, cond)
            for name, ids in text.input_ids.items():
                getattr(model.pipe, name)(input_ids=ids)
            if getattr(model.pipe, "vae", None) is not None:
                model.pipe.vae.encode(pixels)
                model.pipe.vae.decode(x0)
    finally:
        for handle in handles:
            handle.remove()
    return {site: (*record, calls[site]) for site, record in first.items()}


def test_meta_shapes_equal_the_real_forward(model, folder):
    shapes = meta.site_shapes(folder, model.resolution)
    real = real_shapes(model, model.resolution)
    assert set(real) == set(shapes)
    for site, shape in shapes.items():
        meta_record = (shape.module_class, shape.shape, dict(shape.elements), shape.calls)
        assert real[site] == meta_record, site


# ------------------------------------------------------------------- the five operations


def test_encode_images_is_the_documented_formula(model, folder):
    pixels = images(model)
    x0 = model.encode_images(pixels)
    geometry = meta.latent_geometry(folder, model.resolution)
    latent = geometry["latent_size"]
    assert x0.shape == (2, geometry["latent_channels"], latent, latent)
    scaled = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = getattr(model.pipe, "vae", None)
    if vae is None:  # pixel models denoise the pixels themselves
        assert torch.equal(x0, scaled)
    else:
        with torch.no_grad():
            mean = vae.encode(scaled).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        assert torch.equal(x0, (mean - shift) * vae.config.scaling_factor)
    assert torch.equal(model.encode_images(pixels), x0)  # no posterior sample


def noise_of(shape, seed, items):
    return torch.stack([
        torch.randn(shape, generator=torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, i]).generate_state(1)[0])))
        for i in items
    ])  # fmt: skip


def test_add_noise_is_the_documented_formula(model, noisy):
    from diffusers import DDPMScheduler

    x0 = noisy[0]
    x0 = torch.cat([x0, x0[:1]])
    x_t, t = model.add_noise(x0, noise_level=0.3, seed=7, items=[4, 9, 2])
    noise = noise_of(x0.shape[1:], 7, [4, 9, 2])
    steps = model.pipe.scheduler.config.num_train_timesteps
    assert t.tolist() == [0.3 * steps] * 3
    if model.flow_matching:
        assert torch.equal(x_t, (1 - 0.3) * x0 + 0.3 * noise)
        assert model.timestep_for(1.0) == float(steps)
    else:
        schedule = DDPMScheduler.from_config(model.pipe.scheduler.config)
        assert torch.equal(x_t, schedule.add_noise(x0, noise, torch.tensor([300] * 3)))
        assert model.timestep_for(1.0) == float(steps - 1)
    alone, _ = model.add_noise(x0[1:2], noise_level=0.3, seed=7, items=[9])
    assert torch.equal(alone[0], x_t[1])  # an item's noise does not depend on its batch


def test_denoise_equals_the_denoiser_called_by_hand(case, model, noisy):
    _, x_t, t = noisy
    cond = conditioning(case, model, negative="")
    with torch.no_grad():
        by_hand = case.call_denoiser(model.pipe, x_t, t, cond.cond)
    prediction = model.denoise(x_t, t, cond)
    assert prediction.shape == x_t.shape
    assert torch.equal(prediction, by_hand)
    if case.unconditional:
        with pytest.raises(DiffprobeError, match="CFG needs an unconditional"):
            model.denoise(x_t, t, cond, guidance_scale=3.0)
        return
    with torch.no_grad():
        if case.cfg_calls == "batch":
            both = case.call_denoiser(model.pipe, torch.cat([x_t, x_t]), torch.cat([t, t]),
                                      concat(cond.uncond, cond.cond))  # fmt: skip
            uncond, text = both.chunk(2)
        else:
            text = case.call_denoiser(model.pipe, x_t, t, cond.cond)
            uncond = case.call_denoiser(model.pipe, x_t, t, cond.uncond)
    guided = model.denoise(x_t, t, cond, guidance_scale=4.0)
    assert torch.equal(guided, uncond + 4.0 * (text - uncond))


def test_encode_prompt_branches(case, model):
    if case.unconditional:
        empty = model.encode_prompt(["a", "b", "c"])
        assert empty.cond == {} and empty.uncond is None and len(empty) == 3
        assert model.encode_text(["a"]).hidden_states == {}
        for kwargs in ({"negative": ""}, {"cfg": True}):
            with pytest.raises(DiffprobeError, match="unconditional"):
                model.encode_prompt(["a"], **kwargs)
        return
    only = model.encode_prompt(PROMPTS)
    empty = model.encode_prompt(PROMPTS, negative="")
    listed = model.encode_prompt(PROMPTS, negative=["", ""])
    own = model.encode_prompt(PROMPTS, cfg=True)
    assert only.uncond is None and len(only) == 2 and only.prompts == PROMPTS
    for both in (empty, listed, own):
        assert tree_equal(both.cond, only.cond)
        assert [u.shape for u in tensors(both.uncond)] == [c.shape for c in tensors(both.cond)]
    assert tree_equal(listed.uncond, empty.uncond)
    # cfg=True: the family's own unconditional branch (zeros for SDXL base, else "")
    if getattr(model.pipe.config, "force_zeros_for_empty_prompt", False):
        assert not any(u.any() for u in tensors(own.uncond))
    else:
        assert tree_equal(own.uncond, empty.uncond)
    single = model.encode_prompt(PROMPTS[0])
    assert single.prompts == PROMPTS[:1]
    for value, expected in zip(tensors(single.cond), tensors(only.select([0]).cond), strict=True):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(DiffprobeError, match="3 negative prompts for 2 prompts"):
        model.encode_prompt(PROMPTS, negative=["a", "b", "c"])


def test_encode_prompt_is_what_the_pipeline_generates_from(case, model):
    """The pipeline fed our embeddings (``prompt_embeds=`` ...) generates what it generates
    from the prompts: encode_prompt is the pipeline's own encoding, both branches."""
    if case.unconditional:
        pytest.skip("an unconditional pipeline takes no prompt embeddings")
    kwargs = dict(case.cfg_kwargs)
    own = model.encode_prompt(PROMPTS, cfg=True)
    embeds, pooled = model.prompt_embeds(own.cond)
    negative, negative_pooled = model.prompt_embeds(own.uncond)
    fed = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    if pooled is not None:
        fed.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
    if "negative_prompt" in kwargs:  # one per prompt: the same batch as our encoding's
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(PROMPTS)
    plain = plain_generate(case, model.pipe, PROMPTS, steps=1, seed=0, size=model.resolution,
                           **kwargs)  # fmt: skip
    kwargs.pop("negative_prompt", None)
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        ours = model.pipe(num_inference_steps=1, generator=generator, height=model.resolution,
                          width=model.resolution, output_type="np",
                          **{**case.plain_kwargs, **kwargs, **fed}).images  # fmt: skip
    assert np.array_equal(ours, plain)


# ------------------------------------------------------------------------- generation


def test_generate_with_noop_hooks_equals_the_native_pipeline(case, model, reference):
    kwargs = case.cfg_kwargs if case.cfg_kwargs is not None else case.no_cfg_kwargs
    with diffprobe.capture(model, list(case.sites)) as cache:
        generated = model.generate(PROMPTS, steps=STEPS, seed=0, **kwargs)
    assert generated.shape == (2, model.resolution, model.resolution, 3)
    assert np.array_equal(generated, reference)
    with diffprobe.edit(model, [Edit(site, "add", value=0.0) for site in case.sites]):
        assert np.array_equal(model.generate(PROMPTS, steps=STEPS, seed=0, **kwargs), reference)
    for site in case.sites:
        records = cache.records(site)
        assert records, site
        if site.startswith(model.denoiser_name):
            assert all(r.value.shape[0] == len(PROMPTS) for r in records), site
        else:  # text encoders, VAE: outside denoiser calls
            assert {(r.call, r.branch) for r in records} == {(None, "none")}, site
    if case.unconditional:
        assert np.array_equal(model.generate(len(PROMPTS), steps=STEPS, seed=0), reference)


def test_generation_without_cfg_is_one_record_per_call(case, model):
    kwargs = case.no_cfg_kwargs
    reference = plain_generate(case, model.pipe, PROMPTS, steps=STEPS, seed=0,
                               size=model.resolution, **kwargs)  # fmt: skip
    if "guidance_scale" in kwargs:
        assert not model.generation_uses_cfg(kwargs["guidance_scale"])
    site = denoiser_block(case, model)
    with diffprobe.capture(model, site) as cache:
        generated = model.generate(PROMPTS, steps=STEPS, seed=0, **kwargs)
    assert np.array_equal(generated, reference)
    labels = [(r.call, r.branch, r.value.shape[0]) for r in cache.records(site)]
    assert labels == [(call, "none", len(PROMPTS)) for call in range(STEPS)]


def test_cfg_branches_are_labelled_and_kept_apart(case, model, reference):
    if case.cfg_kwargs is None:
        pytest.skip("the family has no classifier-free guidance")
    kwargs = case.cfg_kwargs
    # "batch": the pipeline's guidance doubles the batch; "calls": it never does (FLUX's
    # guidance_scale is embedded guidance, true CFG runs calls of their own)
    guidance = kwargs.get("guidance_scale", model.default_guidance_scale)
    assert model.generation_uses_cfg(guidance) == (case.cfg_calls == "batch")
    site = denoiser_block(case, model)
    entry = f"{model.denoiser_name}:input"
    hooked = [s for s in case.hooked if s.startswith(model.denoiser_name)]
    sites = list(dict.fromkeys([site, entry, *hooked]))
    with diffprobe.capture(model, sites) as cache:
        assert np.array_equal(model.generate(PROMPTS, steps=STEPS, seed=0, **kwargs), reference)
    assert model.branch_layout is None
    expected = [(call, branch) for call in range(STEPS) for branch in branches(case)]
    if case.cfg_calls == "calls":  # each branch is a call of its own
        expected = [(index, branch) for index, (_, branch) in enumerate(expected)]
    for name in sites:
        records = cache.records(name)
        assert [(r.call, r.branch) for r in records] == expected, name
        assert all(r.value.shape[0] == len(PROMPTS) for r in records), name

    # an edit of one branch touches that branch only
    first_call = {branch: cache.records(site, branch=branch)[0].value for branch in branches(case)}
    with diffprobe.edit(model, Edit(site, "add", value=1.0, branch="uncond")):
        with diffprobe.capture(model, site) as edited:
            model.generate(PROMPTS, steps=STEPS, seed=0, **kwargs)
    assert torch.equal(edited.records(site, branch="cond")[0].value, first_call["cond"])
    assert torch.equal(edited.records(site, branch="uncond")[0].value, first_call["uncond"] + 1)

    if case.cfg_calls != "batch":
        return
    # each half of the CFG batch is the denoiser run on that branch's inputs: the family's own
    # unconditional branch is encode_prompt(cfg=True). Doubled to the CFG batch size, so CPU
    # kernels block the work alike and the comparison is bitwise; alone, to rounding.
    x_t = cache.records(entry, branch="cond", call=1)[0]
    assert torch.equal(x_t.value, cache.records(entry, branch="uncond", call=1)[0].value)
    own = model.encode_prompt(PROMPTS, cfg=True)
    for branch, kwargs in [("cond", own.cond), ("uncond", own.uncond)]:
        doubled = Conditioning(concat(kwargs, kwargs), None, PROMPTS * 2)
        with diffprobe.capture(model, hooked) as same_batch:
            model.denoise(torch.cat([x_t.value, x_t.value]), x_t.timestep, doubled)
        with diffprobe.capture(model, hooked) as alone:
            model.denoise(x_t.value, x_t.timestep, Conditioning(kwargs, None, PROMPTS))
        for name in hooked:
            expected = cache.records(name, branch=branch, call=1)[0].value
            assert torch.equal(same_batch.last(name)[: len(PROMPTS)], expected), (name, branch)
            # float32 rounding of sums that CPU kernels block differently for a batch of 2 and
            # of 4 scales with the values (an AMD EPYC: 2.8e-6 where max |x| = 3.7, past the
            # old fixed 1e-6); a mixed-up branch differs by the cond - uncond gap, ~0.1-1
            scale = float(expected.abs().max())
            torch.testing.assert_close(alone.last(name), expected, rtol=1e-5,
                                       atol=max(1e-6, 1e-5 * scale))  # fmt: skip


def test_stop_early_equals_the_full_forward(case, model, noisy):
    _, x_t, t = noisy
    cond = conditioning(case, model, negative="")
    guidance = None if case.unconditional else 4.0
    sites = list(case.stop_sites)
    with diffprobe.capture(model, sites) as full:
        assert model.denoise(x_t, t, cond, guidance_scale=guidance).shape == x_t.shape
    later = []
    handle = model.module(case.later_site).register_forward_hook(lambda *a: later.append(1))
    try:
        with diffprobe.capture(model, sites, stop_early=True) as early:
            assert model.denoise(x_t, t, cond, guidance_scale=guidance) is None
    finally:
        handle.remove()
    assert not later  # the forward really stopped
    for site in sites:
        for branch in [None] if case.unconditional else branches(case):
            assert torch.equal(early.last(site, branch), full.last(site, branch)), (site, branch)


def test_capture_equals_a_hand_written_forward_hook(case, model, noisy):
    _, x_t, t = noisy
    seen, handles = {}, []
    for site, index in case.hooked.items():
        handles.append(model.module(site.split(":")[0]).register_forward_hook(
            lambda module, args, out, site=site, index=index: seen.__setitem__(
                site, (out if isinstance(out, torch.Tensor) else out[index]).clone())
        ))  # fmt: skip
    try:
        with diffprobe.capture(model, list(case.hooked)) as cache:
            model.denoise(x_t, t, conditioning(case, model))
    finally:
        for handle in handles:
            handle.remove()
    for site in case.hooked:
        assert torch.equal(cache.last(site), seen[site]), site


def test_default_guidance(case, model):
    assert type(model).default_guidance_scale == case.default_guidance_scale
    guidance = {} if case.default_guidance_scale is None else {
        "guidance_scale": case.default_guidance_scale}  # fmt: skip
    reference = plain_generate(case, model.pipe, PROMPTS, steps=1, seed=0,
                               size=model.resolution, **guidance)  # fmt: skip
    assert np.array_equal(model.generate(PROMPTS, steps=1, seed=0), reference)
    if not case.unconditional:  # the lens generates with the same default
        embeds = lens_embeddings(model, PROMPTS[:1], pooled=lens_pooled(model))
        assert embeds.guidance_scale == case.default_guidance_scale


def lens_pooled(model, encoder=None) -> str:
    tower = towers(model)[encoder or type(model).default_tower(towers(model))]
    return "lens" if tower.pipeline_layer is None else "full"


# ------------------------------------------------------------------------- the size rule


def one_line_error(call) -> str:
    with pytest.raises(ImageSizeError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return re.sub(r", native size \d+ px", "", message)


def test_one_size_rule_for_the_model_and_the_meta_device(case, model, folder):
    assert model.resolution == case.resolution
    rule = model.size_rule()
    assert rule.multiple == case.size_multiple
    assert rule == meta.size_rule(folder)
    assert model.size_multiple() == rule.multiple
    step, native = rule.multiple, model.resolution
    # named as meta names the folder, so both messages can be compared
    named = type(model)(model.pipe, name=repr(str(folder)))
    for size in [native, native + step, step]:
        named.check_size(size)
        assert meta.latent_geometry(folder, size)["multiple"] == step
    refused = [0, -step, 1.5, True]
    if step > 1:
        refused += [native + step // 2, native + 1]
    if rule.largest is not None:
        named.check_size(rule.largest)
        refused.append(rule.largest + step)
    for size in refused:
        message = one_line_error(lambda size=size: named.check_size(size))
        assert repr(size) in message or str(size) in message
        assert f"multiple of {step} px" in message or f"at most {rule.largest} px" in message
        assert message == one_line_error(lambda size=size: meta.latent_geometry(folder, size))
        with pytest.raises(ImageSizeError):
            model.encode_images(images(model), size=size)


def test_an_accepted_size_gives_the_documented_shapes(case, model, folder):
    size = model.resolution + model.size_rule().multiple
    x0 = model.encode_images(images(model, size), size)
    geometry = meta.latent_geometry(folder, size)
    assert x0.shape[-1] == geometry["latent_size"]
    site = denoiser_block(case, model)
    x_t, t = model.add_noise(x0, noise_level=0.5, seed=0)
    with diffprobe.capture(model, site) as cache:
        assert model.denoise(x_t, t, conditioning(case, model)).shape == x0.shape
    shapes = meta.site_shapes(folder, size, components=[model.denoiser_name])
    assert tuple(cache.last(site).shape[1:]) == shapes[site].shape


# --------------------------------------------------------------------------- text towers


def test_text_towers(case, model):
    if case.unconditional:
        assert type(model).text_towers(model.pipe) == {}
        with pytest.raises(LensError, match="no text encoder"):
            towers(model)
        return
    found = towers(model)
    assert type(model).default_tower(found) in found
    text = model.encode_text(PROMPTS)
    sequence, _ = model.prompt_embeds(model.encode_prompt(PROMPTS).cond)
    covered = torch.zeros(sequence.shape[1:], dtype=torch.bool)
    for name, tower in found.items():
        assert tower.encoder == name and getattr(model.pipe, name) is not None
        assert getattr(model.pipe, tower.tokenizer) is not None
        assert len(text.hidden_states[name]) == tower.num_layers + 1
        # the tower's readout of the layer the pipeline reads is its part of the embeddings
        embeds = lens_embeddings(model, PROMPTS, encoder=name, pooled=lens_pooled(model, name))
        assert max(embeds.readout_check().values()) == 0.0, name
        if tower.pipeline_layer is not None:
            covered[tower.tokens, tower.features] = True
    # the towers account for every non-zero entry of prompt_embeds (SD3 pads CLIP with zeros)
    assert not sequence[:, ~covered].any()
