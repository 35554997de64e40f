"""Full-size architectures built on the meta device from the shipped configs: parameter counts,
site names and shapes, and every alias's pipeline assembled by its family's adapter (size rule,
sites, text towers). No weights, no network."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import diffprobe
from diffprobe import registry
from diffprobe.models import meta

# every registered alias but the embedded ones ships its configs
ALIASES = [spec.alias for spec in registry.list_models() if not spec.local]


def _first_of_each_family_fast(aliases: list[str]) -> list:
    """The aliases, each family's first one in the fast loop and the others marked slow: the
    fast loop runs every family's code path, ``make test`` every alias's configs."""
    seen: set[str] = set()
    params = []
    for alias in aliases:
        family = registry.resolve(alias).family
        params.append(alias if family not in seen else pytest.param(alias, marks=pytest.mark.slow))
        seen.add(family)
    return params


EXPECTED_COMPONENTS = {
    "sd1.5": ["unet", "vae", "text_encoder"],
    "sd2.1": ["unet", "vae", "text_encoder"],
    "sd2.1-base": ["unet", "vae", "text_encoder"],
    "sd-turbo": ["unet", "vae", "text_encoder"],
    "sdxl": ["unet", "vae", "text_encoder", "text_encoder_2"],
    "sdxl-turbo": ["unet", "vae", "text_encoder", "text_encoder_2"],
    "sd3": ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"],
    "sd3.5": ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"],
    "flux-schnell": ["transformer", "vae", "text_encoder", "text_encoder_2"],
    "if-i": ["unet", "text_encoder"],
    "ddpm-celebahq": ["unet"],
}

SD_VAE = 83_653_863  # AutoencoderKL, 4 latent channels (SD1.x, SD2.x, SDXL)
VAE_16 = 83_819_683  # AutoencoderKL, 16 latent channels, no quant convs (SD3, FLUX)
CLIP_L = 123_060_480  # CLIP ViT-L/14 text model
CLIP_L_PROJ = 123_650_304  # the same with its 768 × 768 text projection (SD3)
OPENCLIP_H = 340_387_840  # OpenCLIP ViT-H text tower as CLIPTextModel, 23 layers (SD2.x)
CLIP_BIGG_PROJ = 694_659_840  # OpenCLIP ViT-bigG text tower with projection (SDXL, SD3)
T5_XXL = 4_762_310_656  # T5 v1.1 XXL encoder

# (alias, component) -> parameter count on meta. Published figures: SD1.5 UNet, SD2.1 UNet,
# SDXL UNet, CLIP-L, the VAE; the rest are what these configs give and match the published
# rounded sizes (SD3-medium 2.03 B, SD3.5-large 8.1 B, FLUX 11.9 B, IF-I-XL 4.3 B).
PARAMETER_COUNTS = {
    ("sd1.5", "unet"): 859_520_964,
    ("sd1.5", "vae"): SD_VAE,
    ("sd1.5", "text_encoder"): CLIP_L,
    ("sd2.1", "unet"): 865_910_724,
    ("sd2.1", "vae"): SD_VAE,
    ("sd2.1", "text_encoder"): OPENCLIP_H,
    ("sd2.1-base", "unet"): 865_910_724,
    ("sd2.1-base", "vae"): SD_VAE,
    ("sd2.1-base", "text_encoder"): OPENCLIP_H,
    ("sd-turbo", "unet"): 865_910_724,
    ("sd-turbo", "vae"): SD_VAE,
    ("sd-turbo", "text_encoder"): OPENCLIP_H,
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "vae"): SD_VAE,
    ("sdxl", "text_encoder"): CLIP_L,
    ("sdxl", "text_encoder_2"): CLIP_BIGG_PROJ,
    ("sdxl-turbo", "unet"): 2_567_463_684,
    ("sdxl-turbo", "vae"): SD_VAE,
    ("sdxl-turbo", "text_encoder"): CLIP_L,
    ("sdxl-turbo", "text_encoder_2"): CLIP_BIGG_PROJ,
    ("sd3", "transformer"): 2_028_328_000,
    ("sd3", "vae"): VAE_16,
    ("sd3", "text_encoder"): CLIP_L_PROJ,
    ("sd3", "text_encoder_2"): CLIP_BIGG_PROJ,
    ("sd3", "text_encoder_3"): T5_XXL,
    ("sd3.5", "transformer"): 8_056_627_520,
    ("sd3.5", "vae"): VAE_16,
    ("sd3.5", "text_encoder"): CLIP_L_PROJ,
    ("sd3.5", "text_encoder_2"): CLIP_BIGG_PROJ,
    ("sd3.5", "text_encoder_3"): T5_XXL,
    ("flux-schnell", "transformer"): 11_891_178_560,
    ("flux-schnell", "vae"): VAE_16,
    ("flux-schnell", "text_encoder"): CLIP_L,
    ("flux-schnell", "text_encoder_2"): T5_XXL,
    ("if-i", "unet"): 4_304_695_110,
    ("if-i", "text_encoder"): T5_XXL,
    ("ddpm-celebahq", "unet"): 113_673_219,
}


@pytest.fixture(scope="module", autouse=True)
def _free_the_built_models():
    """The meta-device components and pipelines cached below (tens of thousands of Python
    objects) go when this file's tests are done, not at the end of the session: kept, they make
    every later garbage collection slower."""
    yield
    built.cache_clear()
    full_size_model.cache_clear()
    import gc

    gc.collect()


@functools.cache
def built(alias: str, component: str) -> tuple[str, frozenset[str], int]:
    """(class name, parameter devices, parameter count); each component is built once."""
    model = meta.build_component(alias, component)
    devices = frozenset(p.device.type for p in model.parameters())
    return type(model).__name__, devices, meta.parameter_count(model)


def test_every_alias_has_configs_and_a_native_size():
    assert meta.available_configs() == sorted(ALIASES)
    assert set(EXPECTED_COMPONENTS) == set(ALIASES)
    for alias in ALIASES:
        assert meta.components(alias) == EXPECTED_COMPONENTS[alias]
        # the registry's resolution, and one the family's size rule takes
        assert meta.native_size(alias) == registry.resolve(alias).resolution
        assert meta.latent_geometry(alias, meta.native_size(alias))["image_size"] > 0


@pytest.mark.parametrize("alias, component", sorted(PARAMETER_COUNTS))
def test_component_builds_on_meta_with_published_parameter_count(alias, component):
    class_name, devices, count = built(alias, component)
    assert class_name == meta.component_config(alias, component)["_class_name"]
    assert devices == {"meta"}
    assert count == PARAMETER_COUNTS[alias, component]


def test_parameter_table_covers_every_component():
    listed = {(alias, c) for alias in ALIASES for c in meta.components(alias)}
    assert listed == set(PARAMETER_COUNTS)


def test_rounded_sizes_match_published_figures():
    assert round(built("sd3", "transformer")[2] / 1e9, 2) == 2.03
    assert round(built("sd3.5", "transformer")[2] / 1e9, 1) == 8.1
    assert round(built("flux-schnell", "transformer")[2] / 1e9, 1) == 11.9
    assert round(built("if-i", "unet")[2] / 1e9, 1) == 4.3


def test_bfloat16_keeps_float32_modules():
    model = meta.build_component("sd3", "text_encoder_3", dtype=torch.bfloat16)
    block = model.encoder.block[0]
    assert block.layer[0].SelfAttention.q.weight.dtype == torch.bfloat16
    assert block.layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # _keep_in_fp32_modules


@pytest.mark.slow
def test_sd15_site_shapes_at_512():
    shapes = meta.site_shapes("sd1.5", 512)
    assert shapes["unet.mid_block"].shape == (1280, 8, 8)
    assert shapes["unet.up_blocks.1"].shape == (1280, 32, 32)
    down = shapes["unet.down_blocks.1"]
    assert down.module_class == "CrossAttnDownBlock2D"
    # The default element leaves the block after its downsampler: 32 × 32 -> 16 × 16.
    assert down.shape == (640, 16, 16)
    assert down.elements["hidden_states"] == (640, 16, 16)
    assert down.elements["res_samples"] == ((640, 32, 32), (640, 32, 32), (640, 16, 16))
    assert shapes["unet.up_blocks.1.attentions.1"].shape == (1280, 16, 16)
    assert shapes["unet.conv_out"].shape == (4, 64, 64)
    assert shapes["text_encoder.encoder.layers.5"].shape == (77, 768)
    assert shapes["vae.encoder.down_blocks.0"].shape == (128, 256, 256)
    assert shapes["vae.decoder"].shape == (3, 512, 512)
    assert shapes["unet.down_blocks.0.resnets.0.nonlinearity"].calls == 3
    assert all(site.split(".")[0] in {"unet", "vae", "text_encoder"} for site in shapes)
    assert meta.site_shapes("sd1.5") == shapes  # 512 px is the native size


@pytest.mark.slow
def test_site_shapes_follow_the_image_size():
    shapes = meta.site_shapes("sd1.5", 768, components=["unet"])
    assert shapes["unet.mid_block"].shape == (1280, 12, 12)
    assert all(site.startswith("unet.") for site in shapes)


@pytest.mark.slow
def test_sd3_transformer_block_at_1024():
    shapes = meta.site_shapes("sd3", 1024, components=["transformer"])
    block = shapes["transformer.transformer_blocks.8"]
    assert block.module_class == "JointTransformerBlock"
    assert block.shape == (4096, 1536)
    assert block.elements == {"encoder_hidden_states": (333, 1536), "hidden_states": (4096, 1536)}
    last = shapes["transformer.transformer_blocks.23"]  # context_pre_only: no text stream out
    assert last.elements == {"hidden_states": (4096, 1536)}


@pytest.mark.slow
def test_flux_sites():
    shapes = meta.site_shapes("flux-schnell", 1024, components=["transformer"])
    assert shapes["transformer.transformer_blocks.0"].shape == (4096, 3072)
    single = shapes["transformer.single_transformer_blocks.37"]
    assert single.elements["encoder_hidden_states"] == (256, 3072)
    assert shapes["transformer.proj_out"].shape == (4096, 64)


@pytest.mark.slow
def test_text_encoder_layers():
    sd15 = meta.site_shapes("sd1.5", components=["text_encoder"])
    assert sd15["text_encoder.encoder.layers.11"].shape == (77, 768)
    sdxl = meta.site_shapes("sdxl", components=["text_encoder_2"])
    assert sdxl["text_encoder_2.text_model.encoder.layers.31"].shape == (77, 1280)
    assert sdxl["text_encoder_2.text_projection"].shape == (1280,)
    if_i = meta.site_shapes("if-i", components=["text_encoder"])
    assert if_i["text_encoder.encoder.block.23"].shape == (77, 4096)


@pytest.mark.slow
@pytest.mark.parametrize("alias", ALIASES)
def test_every_alias_gives_site_shapes_at_native_size(alias):
    shapes = meta.site_shapes(alias)
    size = meta.native_size(alias)
    geometry = meta.latent_geometry(alias, size)
    prefixes = {site.split(".")[0] for site in shapes}
    assert prefixes == set(meta.components(alias))
    if geometry["denoiser"] == "unet":
        out_channels = meta.component_config(alias, "unet")["out_channels"]
        latent = geometry["latent_size"]
        assert shapes["unet.conv_out"].shape == (out_channels, latent, latent)
    else:
        assert shapes["transformer.proj_out"].shape[0] == geometry["tokens"]
    if "vae" in prefixes:
        assert shapes["vae.decoder"].shape == (3, size, size)


def test_latent_geometry():
    assert meta.latent_geometry("sd1.5", 512) == {
        "image_size": 512,
        "vae_scale_factor": 8,
        "latent_channels": 4,
        "latent_size": 64,
        "multiple": 64,
        "denoiser": "unet",
        "denoiser_class": "UNet2DConditionModel",
        "input_shape": (4, 64, 64),
        "tokens": None,
    }
    flux = meta.latent_geometry("flux-schnell", 1024)
    assert (flux["latent_channels"], flux["tokens"], flux["input_shape"]) == (16, 4096, (4096, 64))
    assert meta.latent_geometry("sd3", 1024)["multiple"] == 16
    assert meta.latent_geometry("sdxl", 1024)["multiple"] == 32
    assert meta.latent_geometry("if-i", 64)["vae_scale_factor"] == 1
    assert meta.latent_geometry("if-i", 64)["input_shape"] == (3, 64, 64)
    assert meta.latent_geometry("ddpm-celebahq", 256)["multiple"] == 32


@pytest.mark.parametrize(
    "alias, size",
    [
        ("sd1.5", 500),
        ("sdxl", 1000),
        ("sd3", 1000),
        ("flux-schnell", 1000),
        ("if-i", 60),
        ("sd3", 4096),
    ],
)
def test_size_that_cannot_be_taken_raises(alias, size):
    with pytest.raises(ValueError, match=f"image size {size} px"):
        meta.site_shapes(alias, size)


def test_errors_name_the_input():
    with pytest.raises(ValueError, match="did you mean 'sd1.5'"):
        meta.components("sd15")
    with pytest.raises(ValueError, match="no component 'transformer'"):
        meta.site_shapes("sd1.5", components=["transformer"])
    with pytest.raises(ValueError, match="positive integer"):
        meta.latent_geometry("sd1.5", 0)


def test_cached_result_cannot_be_changed_by_callers():
    first = meta.site_shapes("sd1.5", components=["text_encoder"])
    first.clear()
    again = meta.site_shapes("sd1.5", components=["text_encoder"])
    assert again["text_encoder.encoder.layers.5"].shape == (77, 768)
    with pytest.raises(TypeError):
        again["text_encoder.encoder"].elements["x"] = (1,)


@pytest.mark.slow
def test_local_diffusers_folder(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from diffprobe.testing import dummy_sd_pipeline

    UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    ).save_config(tmp_path / "unet")
    AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    ).save_config(tmp_path / "vae")
    CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=1000,
        max_position_embeddings=77,
    ).save_pretrained(tmp_path / "text_encoder")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({}))

    assert meta.components(tmp_path) == ["unet", "vae", "text_encoder"]
    geometry = meta.latent_geometry(tmp_path, 64)
    # factor 2 × 2 down-samplings is 4, and StableDiffusionPipeline.check_inputs takes
    # multiples of 8: the one size rule, the one Model.check_size asks
    assert (geometry["vae_scale_factor"], geometry["multiple"]) == (2, 8)
    assert meta.size_rule(tmp_path) == diffprobe.from_pipeline(dummy_sd_pipeline()).size_rule()
    shapes = meta.site_shapes(tmp_path)  # native size: sample_size 32 × VAE factor 2
    assert shapes["unet.mid_block"].shape == (64, 16, 16)
    assert shapes["unet.down_blocks.1"].elements["res_samples"] == ((64, 16, 16), (64, 16, 16))
    assert shapes["vae.encoder.down_blocks.0"].shape == (32, 32, 32)
    assert shapes["text_encoder.encoder.layers.4"].shape == (77, 32)
    assert meta.site_shapes(str(tmp_path), 128)["unet.mid_block"].shape == (64, 32, 32)
    with pytest.raises(ValueError, match="image size 66 px"):
        meta.site_shapes(tmp_path, 66)


@functools.cache
def full_size_model(alias: str):
    """``alias``'s pipeline assembled by its family's adapter from meta-device components."""
    from diffprobe.testing.full_size import random_pipeline

    return diffprobe.from_pipeline(random_pipeline(alias, device="meta"), registry.resolve(alias))


@pytest.mark.parametrize("alias", _first_of_each_family_fast(ALIASES))
def test_every_alias_assembles_into_its_familys_adapter(alias):
    spec = registry.resolve(alias)
    model = full_size_model(alias)
    adapter = registry.adapter(spec.family)
    assert type(model) is adapter and model.device.type == "meta"
    # the same size rule on the loaded pipeline as on the shipped configs
    assert model.size_rule() == meta.size_rule(alias)
    model.check_size(spec.resolution)
    assert model.resolution == spec.resolution
    expected = {n for n in meta.components(alias) if n not in adapter.optional_text_encoders}
    assert set(model.module_components) == expected
    shapes = meta.site_shapes(alias)  # cached: the same call as the native-size test's
    assert {s for s in shapes if s.split(".")[0] in expected} <= set(model.site_names())
    towers = adapter.text_towers(model.pipe)
    assert set(towers) == {n for n in expected if n.startswith("text_encoder")}
    if towers:
        assert adapter.default_tower(towers) in towers


def test_optional_t5_is_left_out_unless_asked():
    from diffprobe.testing.full_size import random_pipeline

    pipe = random_pipeline("sd3", device="meta", t5=True)
    assert pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None
    model = diffprobe.from_pipeline(pipe, registry.resolve("sd3"))
    assert registry.adapter("sd3").default_tower(model.text_towers(pipe)) == "text_encoder_3"
    assert full_size_model("sd3").pipe.text_encoder_3 is None
    # without T5 the lens reads CLIP-G
    towers = full_size_model("sd3").text_towers(full_size_model("sd3").pipe)
    assert registry.adapter("sd3").default_tower(towers) == "text_encoder_2"
