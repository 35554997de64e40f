"""Diffusion Lens: the last lens layer reproduces the normal generation (every family), the lens
readout equals a truncated encoder's own output, same noise per layer, uncond not lensed,
padding, layer parsing and errors, saving, the CLI, emergence and the demo."""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe.errors import DiffprobeError
from diffprobe.lens import (
    LensError,
    emergence,
    emergence_accuracy,
    generate_from,
    lens,
    lens_embeddings,
    lens_layers,
    parse_layers,
)

PROMPT = "a red circle"
STEPS = 2


@cache
def family_model(family: str):
    from diffprobe.testing import dummy_cases

    builders = {case.name: case.build for case in dummy_cases()}  # every registered family
    return diffprobe.from_pipeline(builders[family](0), name=f"dummy-{family}")


def as_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- the invariant


@pytest.mark.parametrize(
    "family, encoder, pooled",
    [
        ("sd", "text_encoder", "full"),
        ("sdxl", "text_encoder", "full"),
        ("sdxl", "text_encoder_2", "full"),
        ("sd3", "text_encoder", "full"),
        ("sd3", "text_encoder_2", "full"),
        ("sd3", "text_encoder_3", "full"),
        ("sd3.5", "text_encoder_2", "full"),
        ("flux", "text_encoder", "lens"),
        ("flux", "text_encoder_2", "full"),
        ("if", "text_encoder", "full"),
    ],
)
def test_last_layer_reproduces_normal_generation(family, encoder, pooled):
    model = family_model(family)
    normal = model.generate(PROMPT, steps=STEPS, seed=3)
    embeds = lens_embeddings(model, [PROMPT], encoder=encoder, pooled=pooled)
    assert embeds.readout_check() and max(embeds.readout_check().values()) == 0.0
    assert embeds.reproduces_generation()
    lensed = generate_from(model, embeds.pipeline_kwargs(embeds.last_layer), seed=3,
                           steps=STEPS, guidance_scale=embeds.guidance_scale,
                           size=model.resolution)  # fmt: skip
    assert np.array_equal(lensed, normal)  # bit for bit, float images
    result = lens(model, PROMPT, layers="0,-1", seeds=[3], steps=STEPS, encoder=encoder,
                  pooled=pooled, progress=False)  # fmt: skip
    assert result.layers == [0, embeds.last_layer]
    assert np.array_equal(result.image(embeds.last_layer, 3), as_uint8(normal[0]))
    # the earliest layer really is a different conditioning
    assert not np.array_equal(result.image(0, 3), result.image(embeds.last_layer, 3))


def test_layer_indexing_per_family():
    # SD 1.x/2.x reads final_layer_norm(hidden_states[L]): lens layers 0..L
    assert lens_layers(family_model("sd")) == list(range(6))
    # SDXL and SD3 CLIP read hidden_states[-2] = hidden_states[L - 1]: lens layers 0..L-1
    assert lens_layers(family_model("sdxl"), "text_encoder") == list(range(5))
    assert lens_layers(family_model("sdxl")) == list(range(5))  # default: text_encoder_2
    assert lens_layers(family_model("sd3"), "text_encoder_2") == list(range(5))
    # with the final norm everywhere, the CLIP's last layer L becomes available
    assert lens_layers(family_model("sdxl"), "text_encoder", norm="final") == list(range(6))
    # T5 (2 blocks in SD3 and FLUX, 5 in IF): 0..L
    assert lens_layers(family_model("sd3")) == [0, 1, 2]
    assert lens_layers(family_model("flux")) == [0, 1, 2]
    assert lens_layers(family_model("if")) == list(range(6))


def test_full_size_layouts():
    """Tower layouts from the shipped full-size configs (meta device, no weights)."""
    from types import SimpleNamespace

    from diffprobe.lens import towers
    from diffprobe.models import meta

    def fake(alias: str, family: str, **extra):
        parts = {name: meta.build_component(alias, name) for name in meta.components(alias)
                 if name.startswith("text_encoder")}  # fmt: skip
        return SimpleNamespace(pipe=SimpleNamespace(**parts, **extra), family=family, name=alias)

    sd2 = towers(fake("sd2.1", "sd"))["text_encoder"]
    assert sd2.layers() == list(range(24))  # OpenCLIP's penultimate layer is the converted last
    sdxl = towers(fake("sdxl", "sdxl"))
    assert sdxl["text_encoder"].layers() == list(range(12))
    assert sdxl["text_encoder_2"].layers() == list(range(32))
    assert sdxl["text_encoder"].features == slice(0, 768)
    assert sdxl["text_encoder_2"].features == slice(768, 2048)
    assert sdxl["text_encoder_2"].pooled == slice(None)
    sd3 = towers(fake("sd3", "sd3", tokenizer_max_length=77))
    assert sd3["text_encoder_2"].features == slice(768, 2048)
    assert sd3["text_encoder"].pooled == slice(0, 768)
    assert sd3["text_encoder_2"].pooled == slice(768, 2048)  # = pooled_projection_dim
    assert sd3["text_encoder_3"].tokens == slice(77, None)
    assert sd3["text_encoder_3"].layers() == list(range(25))


def test_sdxl_final_norm_is_another_readout():
    model = family_model("sdxl")
    normal = model.generate(PROMPT, steps=STEPS, seed=0)
    embeds = lens_embeddings(model, [PROMPT], encoder="text_encoder", norm="final")
    assert not embeds.reproduces_generation()
    states = embeds.hidden_states
    norm = embeds.encoder_module.final_layer_norm
    assert torch.equal(embeds.token_embeddings(4), norm(states[4]))
    default = lens_embeddings(model, [PROMPT], encoder="text_encoder")
    assert torch.equal(default.token_embeddings(4), states[4])  # as the pipeline: no norm
    lensed = generate_from(model, embeds.pipeline_kwargs(4), seed=0, steps=STEPS,
                           guidance_scale=embeds.guidance_scale, size=64)  # fmt: skip
    assert not np.array_equal(lensed, normal)


# ----------------------------------------------------------- readout against an independent path


def truncated(encoder: torch.nn.Module, layers: int, t5: bool = False) -> torch.nn.Module:
    """A copy of ``encoder`` that keeps only its first ``layers`` blocks."""
    short = copy.deepcopy(encoder)
    if t5:
        short.encoder.block = short.encoder.block[:layers]
    else:
        core = short.text_model if hasattr(short, "text_model") else short
        core.encoder.layers = core.encoder.layers[:layers]
    return short


def test_clip_readout_equals_truncated_encoder():
    model = family_model("sd")
    embeds = lens_embeddings(model, [PROMPT])
    short = truncated(model.pipe.text_encoder, 2)
    with torch.no_grad():
        expected = short(embeds.input_ids).last_hidden_state
    assert torch.equal(embeds.token_embeddings(2), expected)
    sequence, _ = embeds.conditional(2)
    assert torch.equal(sequence, expected)


def test_pooled_lens_equals_truncated_encoder():
    model = family_model("sdxl")
    embeds = lens_embeddings(model, [PROMPT], encoder="text_encoder_2", pooled="lens")
    short = truncated(model.pipe.text_encoder_2, 2)
    with torch.no_grad():
        expected = short(embeds.input_ids).text_embeds
    sequence, pooled = embeds.conditional(2)
    assert torch.equal(pooled, expected)
    # the default keeps the full encoder's pooled vector
    _, full_pooled = lens_embeddings(model, [PROMPT], encoder="text_encoder_2").conditional(2)
    assert torch.equal(full_pooled, embeds.pooled_embeds)
    assert not torch.equal(full_pooled, expected)


def test_t5_readout_equals_truncated_encoder():
    model = family_model("if")
    embeds = lens_embeddings(model, [PROMPT])
    text = model.encode_text([PROMPT])
    short = truncated(model.pipe.text_encoder, 2, t5=True)
    with torch.no_grad():
        expected = short(
            text.input_ids["text_encoder"], attention_mask=text.attention_mask["text_encoder"]
        ).last_hidden_state
    assert torch.equal(embeds.token_embeddings(2), expected)  # final norm applied
    # the last T5 layer is already normalised: no second norm
    assert torch.equal(embeds.token_embeddings(5), embeds.hidden_states[5])


# ----------------------------------------------------------------------------- generation rules


@pytest.mark.slow
def test_identical_embeddings_give_identical_images():
    """Layer 3 of this encoder equals layer 2 (block 2 zeroed), so the same initial noise per
    layer must give identical images at layers 2 and 3."""
    from diffprobe.testing import dummy_sd_pipeline

    pipe = dummy_sd_pipeline(seed=1)
    block = pipe.text_encoder.encoder.layers[2]
    with torch.no_grad():
        for linear in (block.self_attn.out_proj, block.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
    model = diffprobe.from_pipeline(pipe)
    embeds = lens_embeddings(model, [PROMPT])
    assert torch.equal(embeds.hidden_states[2], embeds.hidden_states[3])
    result = lens(model, PROMPT, layers=[1, 2, 3], seeds=[0, 5], steps=STEPS, progress=False)
    for seed in (0, 5):
        assert np.array_equal(result.image(2, seed), result.image(3, seed))
        assert not np.array_equal(result.image(1, seed), result.image(2, seed))
    assert not np.array_equal(result.image(2, 0), result.image(2, 5))


def test_only_the_conditional_branch_is_lensed(sd_model):
    calls = []

    def record(module, args, kwargs):
        calls.append(kwargs["encoder_hidden_states"].clone())

    handle = sd_model.pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        lens(sd_model, PROMPT, layers=[1], seeds=[0], steps=STEPS, guidance_scale=7.5,
             progress=False)  # fmt: skip
    finally:
        handle.remove()
    full = sd_model.encode_prompt([PROMPT], negative="")
    lensed, _ = lens_embeddings(sd_model, [PROMPT], guidance_scale=7.5).conditional(1)
    assert len(calls) == STEPS
    for hidden in calls:
        uncond, cond = hidden.chunk(2)
        assert torch.equal(uncond, full.uncond["encoder_hidden_states"])
        assert torch.equal(cond, lensed)
        assert not torch.equal(cond, full.cond["encoder_hidden_states"])


def test_sdxl_uncond_and_pooled_come_from_the_full_encoders():
    model = family_model("sdxl")
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs["encoder_hidden_states"].clone(),
                     kwargs["added_cond_kwargs"]["text_embeds"].clone()))  # fmt: skip

    handle = model.pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        lens(model, PROMPT, layers=[1], seeds=[0], steps=STEPS, encoder="text_encoder",
             progress=False)  # fmt: skip
    finally:
        handle.remove()
    full = model.encode_prompt([PROMPT], cfg=True)
    width = model.pipe.text_encoder.config.hidden_size
    for hidden, pooled in seen:
        uncond, cond = hidden.chunk(2)
        assert torch.equal(uncond, full.uncond["encoder_hidden_states"])  # zeros for SDXL
        # text_encoder_2's half and the pooled vector are the full encoders'
        assert torch.equal(cond[..., width:], full.cond["encoder_hidden_states"][..., width:])
        assert not torch.equal(cond[..., :width], full.cond["encoder_hidden_states"][..., :width])
        assert torch.equal(pooled[1:], full.cond["added_cond_kwargs"]["text_embeds"])


@pytest.mark.parametrize("family", ["sd", "if"])
def test_padding_option(family):
    model = family_model(family)
    tokenizer = model.pipe.tokenizer
    keep = lens_embeddings(model, [PROMPT], padding="keep")
    full = lens_embeddings(model, [PROMPT], padding="full")
    text = PROMPT if family == "sd" else PROMPT.lower()
    real_tokens = len(tokenizer(text).input_ids)  # with start/end tokens, no padding
    mask = full.padding_mask[0]
    assert int(mask.sum()) == mask.numel() - real_tokens
    assert not mask[:real_tokens].any() and mask[real_tokens:].all()
    own = full.sequence[0]
    layer = 1
    keep_sequence = keep.conditional(layer)[0][0]
    full_sequence = full.conditional(layer)[0][0]
    assert torch.equal(full_sequence[mask], own[mask])
    assert torch.equal(full_sequence[~mask], keep_sequence[~mask])
    assert torch.equal(keep_sequence, keep.token_embeddings(layer)[0])
    assert not torch.equal(keep_sequence[mask], own[mask])
    # the last layer is the pipeline's own either way
    assert torch.equal(full.conditional(full.last_layer)[0], keep.conditional(keep.last_layer)[0])
    images = {
        padding: lens(
            model, PROMPT, layers=[layer], steps=STEPS, padding=padding, progress=False
        ).image(layer)  # fmt: skip
        for padding in ("keep", "full")
    }
    assert not np.array_equal(images["keep"], images["full"])


# ----------------------------------------------------------------------------- parsing, errors


def test_parse_layers():
    available = list(range(6))
    assert parse_layers("all", available) == available
    assert parse_layers(None, available) == available
    assert parse_layers("0,2,4", available) == [0, 2, 4]
    assert parse_layers(" 4, 0 ,4", available) == [4, 0]
    assert parse_layers("-1", available) == [5]
    assert parse_layers([-2, 1], available) == [4, 1]
    assert parse_layers(3, available) == [3]
    with pytest.raises(LensError, match=r"layer 6 is out of range .* 0\.\.5"):
        parse_layers("0,6", available)
    with pytest.raises(LensError, match="out of range"):
        parse_layers("-7", available)
    with pytest.raises(LensError, match="comma-separated integers"):
        parse_layers("0,two", available)
    with pytest.raises(LensError, match="no layers"):
        parse_layers(",", available)


def test_errors(sd_model):
    with pytest.raises(LensError, match=r"text_encoder of .* lens layers are 0\.\.4"):
        lens(family_model("sdxl"), PROMPT, layers="5", encoder="text_encoder", steps=1,
             progress=False)  # fmt: skip
    with pytest.raises(LensError, match="no text encoder"):
        lens(family_model("ddpm"), PROMPT, steps=1, progress=False)
    with pytest.raises(LensError, match=r"unknown encoder 'text_encoder2'.*'text_encoder_2'"):
        lens_embeddings(family_model("sdxl"), [PROMPT], encoder="text_encoder2")
    with pytest.raises(LensError, match="unknown encoder 'text_encoder_2'"):
        lens_layers(sd_model, "text_encoder_2")
    with pytest.raises(LensError, match="feeds no pooled vector"):
        lens_embeddings(sd_model, [PROMPT], pooled="lens")
    with pytest.raises(LensError, match="feeds only the pooled vector"):
        lens_embeddings(family_model("flux"), [PROMPT], encoder="text_encoder", pooled="full")
    with pytest.raises(LensError, match="padding must be one of keep, full"):
        lens_embeddings(sd_model, [PROMPT], padding="drop")
    with pytest.raises(LensError, match="seeds"):
        lens(sd_model, PROMPT, seeds=[], progress=False)


# ----------------------------------------------------------------------------- outputs


@pytest.mark.slow
def test_save_writes_pngs_grid_and_metadata(sd_model, tmp_path):
    from PIL import Image

    result = lens(sd_model, PROMPT, layers="0,5", seeds=[0, 1], steps=STEPS, progress=False)
    assert result.images.shape == (1, 2, 2, 64, 64, 3)
    out = result.save(tmp_path / "lens")
    for layer in (0, 5):
        for seed in (0, 1):
            png = np.asarray(Image.open(out / f"layer{layer:02d}_seed{seed}.png"))
            assert np.array_equal(png, result.image(layer, seed))
    grid = Image.open(out / "grid.png")
    assert grid.width > 2 * 64 and grid.height > 2 * 64
    meta = json.loads((out / "lens.json").read_text())
    assert meta["encoder"] == "text_encoder" and meta["lens_layers"] == list(range(6))
    assert [entry["layer"] for entry in meta["layers"]] == [0, 5]
    assert meta["layers"][1]["site"] == "text_encoder.encoder.layers.4"
    assert meta["last_layer_reproduces_generation"] is True
    text = " ".join(meta["semantics"])
    for phrase in ("final_layer_norm(hidden_states[ℓ])", "Only the conditional branch",
                   "same initial noise", "Padding tokens"):  # fmt: skip
        assert phrase in text
    assert len(meta["files"]) == 4 and not list(out.glob(".*"))  # no temporary files left


@pytest.mark.slow
def test_several_prompts_match_single_prompt_runs(sd_model):
    prompts = [PROMPT, "a blue square"]
    batched = lens(sd_model, prompts, layers=[2], seeds=[4], steps=STEPS, batch_size=2,
                   progress=False)  # fmt: skip
    for index, prompt in enumerate(prompts):
        alone = lens(sd_model, prompt, layers=[2], seeds=[4], steps=STEPS, progress=False)
        difference = np.abs(batched.image(2, 4, index).astype(int) - alone.image(2, 4))
        assert difference.max() <= 1  # same noise; batched matmuls may round differently


@pytest.fixture(scope="module")
def small_sd_folder(tmp_path_factory) -> Path:
    """A saved SD pipeline small enough for 20-step generations in a test: 32 px, 2-layer
    CLIP, a (8, 16)-channel UNet."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffprobe.testing import dummy_clip_text_config, dummy_sd_components

    components = dummy_sd_components(seed=0)
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=4,
    ).eval()  # fmt: skip
    config = dummy_clip_text_config(components["tokenizer"], num_hidden_layers=2)
    components["text_encoder"] = CLIPTextModel(config).eval()
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("small-sd")
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_demo(small_sd_folder, tmp_path, capsys):
    from diffprobe.lens import demo

    summary = demo(str(small_sd_folder), tmp_path / "demo")
    assert summary["layers"] == [0, 1, 2] and summary["seeds"] == [0, 1]
    assert Path(summary["grid"]).is_file()
    meta = json.loads((tmp_path / "demo" / "lens.json").read_text())
    assert meta["steps"] == 20 and len(meta["files"]) == 6
    assert summary["grid"] in capsys.readouterr().out


@pytest.mark.slow
def test_cli(small_sd_folder, tmp_path):
    from typer.testing import CliRunner

    from diffprobe.cli import app

    out = tmp_path / "cli"
    runner = CliRunner()
    result = runner.invoke(app, ["lens", "--model", str(small_sd_folder), "--prompt", PROMPT,
                                 "--layers", "0,-1", "--seeds", "0,1", "--steps", "2",
                                 "--pad", "full", "--out", str(out), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == [
        "grid.png", "layer00_seed0.png", "layer00_seed1.png", "layer02_seed0.png",
        "layer02_seed1.png",
    ]  # fmt: skip
    assert json.loads((out / "lens.json").read_text())["padding"] == "full"
    bad = runner.invoke(app, ["lens", "--model", str(small_sd_folder), "--prompt", PROMPT,
                              "--layers", "3", "--steps", "1", "--out", str(out), "-q"])  # fmt: skip
    assert bad.exit_code != 0 and "out of range" in str(bad.exception)
    bad = runner.invoke(app, ["lens", "--model", str(small_sd_folder), "--prompt", PROMPT,
                              "--pad", "nope", "--out", str(out), "-q"])  # fmt: skip
    # a DiffprobeError: the console entry point (diffprobe.cli.main) prints it as one line, exit 2
    assert isinstance(bad.exception, DiffprobeError), bad.output
    assert "--pad 'nope'" in str(bad.exception) and "keep, full" in str(bad.exception)


# ----------------------------------------------------------------------------- emergence


def test_emergence_accuracy_against_attribute_accuracy():
    from diffprobe.data import shapes
    from diffprobe.data.attributes import attribute_accuracy

    sample = shapes.sample(12, seed=0, split="heldout")
    blank = np.full_like(sample.images, 128)
    images = np.stack([blank, sample.images], axis=1)[:, :, None]  # (items, 2 layers, 1 seed)
    accuracy = emergence_accuracy(images, sample.factors)
    direct = attribute_accuracy(sample.images, sample.factors)
    for name in ("colour", "shape", "quadrant"):
        assert accuracy[name][0] == 0.0  # nothing readable: every item wrong
        assert accuracy[name][1] == pytest.approx(direct[name])
    assert accuracy["colour"][1] > 0.9


@pytest.mark.slow
def test_emergence_and_benchmark(sd_model, tmp_path):
    from diffprobe.data import shapes

    sample = shapes.sample(2, seed=0, split="heldout")
    result = emergence(sd_model, sample.captions, sample.factors, layers="0,-1", seeds=[0, 1],
                       steps=STEPS, progress=False)  # fmt: skip
    assert result.layers == [0, 5] and result.items == 4
    assert set(result.accuracy) == {"colour", "shape", "quadrant"}
    assert all(values.shape == (2,) for values in result.accuracy.values())
    assert result.chance["colour"] == pytest.approx(1 / 8)
    assert len(result.rows()) == 6

    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "lens_emergence.py"
    spec = importlib.util.spec_from_file_location("lens_emergence", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    folder = tmp_path / "sd"
    sd_model.pipe.save_pretrained(folder)
    summary = benchmark.main([str(folder), "--captions", "2", "--layers", "0,-1", "--steps", "1",
                              "--out", str(tmp_path / "bench"), "--quiet"])  # fmt: skip
    assert set(summary["accuracy"]) == {"colour", "shape", "quadrant"}
    csv = (tmp_path / "bench" / "lens_emergence.csv").read_text().splitlines()
    assert csv[0] == "layer,attribute,accuracy,chance" and len(csv) == 1 + 6
    assert (tmp_path / "bench" / "lens_emergence.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- docs


@pytest.mark.slow
def test_doc_examples_run():
    doc = Path(__file__).parents[1] / "docs" / "lens.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:  # the blocks build on one another, as in a notebook
        exec(compile(block, str(doc), "exec"), namespace)
