"""The model registry, loading errors and the CLI's offline commands."""

import json
import time

import pytest
from typer.testing import CliRunner

import diffprobe
from diffprobe.cli import app
from diffprobe.errors import ModelLoadError, UnknownModelError
from diffprobe.registry import list_models, resolve

REQUIRED = [
    "sd1.5",
    "sd2.1",
    "sd2.1-base",
    "sd-turbo",
    "sdxl",
    "sdxl-turbo",
    "sd3",
    "sd3.5",
    "flux-schnell",
    "if-i",
    "ddpm-celebahq",
    "tiny",
]


def test_every_required_alias_is_registered_with_its_facts():
    specs = {s.alias: s for s in list_models()}
    for alias in REQUIRED:
        assert alias in specs
        spec = specs[alias]
        assert spec.family in diffprobe.registry.families()
        assert spec.resolution > 0 and spec.source
    assert specs["sd2.1"].prediction_type == "v_prediction" and specs["sd2.1"].resolution == 768
    assert specs["sd3"].prediction_type == "flow"
    assert specs["ddpm-celebahq"].family == "ddpm"


def test_unknown_alias_lists_the_known_ones():
    with pytest.raises(
        UnknownModelError, match=r"Did you mean 'sd1\.5'.*Known aliases: tiny, sd1\.5"
    ):
        resolve("sd15")


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(UnknownModelError, match="not a diffusers pipeline folder"):
        resolve(str(tmp_path))


def test_local_folder_round_trip(tmp_path):
    from diffprobe.testing import dummy_sd_pipeline

    dummy_sd_pipeline().save_pretrained(tmp_path / "pipe")
    model = diffprobe.load(tmp_path / "pipe")
    assert model.family == "sd" and model.name == str(tmp_path / "pipe")


def test_unreachable_hub_model_fails_fast_with_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        diffprobe.load("sd3")
    message = str(info.value)
    assert "stabilityai/stable-diffusion-3-medium-diffusers" in message
    assert "hf auth login" in message and "local diffusers folder" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert time.perf_counter() - start < 30  # no long retry loop (generous bound, not a benchmark)


def test_cli_models_json():
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    aliases = [row["alias"] for row in json.loads(result.stdout)]
    assert set(REQUIRED) <= set(aliases)


@pytest.mark.slow
def test_sites_option_takes_several_values_after_one_flag(tmp_path, monkeypatch, capsys):
    """``diffprobe extract --sites a b``: the console entry point (``main()`` reading
    ``sys.argv``, in this process: a fresh one only adds seconds of imports) joins the values."""
    import sys

    from diffprobe.cli import join_variadic, main
    from diffprobe.testing import dummy_sd_pipeline

    assert join_variadic(["extract", "--sites", "a", "b", "--noise", "0.1"]) == [
        "extract", "--sites", "a b", "--noise", "0.1"]  # fmt: skip
    assert join_variadic(["--sites", "a", "--sites", "b"]) == ["--sites", "a", "--sites", "b"]
    folder = tmp_path / "pipe"
    dummy_sd_pipeline().save_pretrained(folder)
    monkeypatch.setattr(sys, "argv", [
        "diffprobe", "extract", "--model", str(folder), "--data", "shapes:2", "--sites",
        "unet.mid_block", "unet.up_blocks.1", "--noise", "0.1", "--out", str(tmp_path / "run"),
        "--quiet"])  # fmt: skip
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    assert code in (0, None), capsys.readouterr().err[-2000:]
    import diffprobe

    assert sorted(diffprobe.open_run(tmp_path / "run").sites) == [
        "unet.mid_block",
        "unet.up_blocks.1",
    ]


def run_main(capsys, *args) -> tuple[int, str]:
    """``diffprobe ARGS`` through the console entry point -> (exit code, stderr)."""
    from diffprobe.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as done:
        code = done.code
    return code, capsys.readouterr().err


def test_sites_size_not_taken_is_the_models_own_one_line_error(capsys):
    """``diffprobe sites tiny --size 72`` (once a traceback): the meta device asks the same
    size rule as the loaded model, and says the same sentence."""
    code, err = run_main(capsys, "sites", "tiny", "--size", "72")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "'tiny'" not in err and "/" not in err  # named 'tiny'
    for word in ("72", "multiple of 16 px", "64 or 80", "tiny"):
        assert word in err
    with pytest.raises(diffprobe.errors.ImageSizeError) as info:
        diffprobe.load("tiny").check_size(72)
    assert err == f"error: {info.value}\n"


@pytest.mark.parametrize(
    "args, words",
    [
        (["sites", "sd15"], ["sd15", "sd1.5"]),
        (["sites", "sd1.5", "--component", "transformer"], ["transformer", "unet"]),
        (["sites", "sd1.5", "--size", "0"], ["--size 0", "multiple of 64 px"]),
        (["sites", "sd3", "--size", "4096"], ["4096", "at most 3072 px", "pos_embed_max_size"]),
        (["sites", "{broken}"], ["config.json", "JSON"]),
        (["sites", "{incomplete}"], ["incomplete'", "no sample_size", "--size"]),
        (["sites", "{incomplete}", "--size", "64"], ["incomplete'", "down_block_types"]),
    ],
)
def test_meta_errors_are_one_line(capsys, tmp_path, args, words):
    broken, incomplete = tmp_path / "broken", tmp_path / "incomplete"
    for folder, config in [(broken, "{not json"), (incomplete, json.dumps(
            {"_class_name": "UNet2DConditionModel", "in_channels": 4}))]:  # fmt: skip
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "config.json").write_text(config)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "X"}))
    args = [a.format(broken=broken, incomplete=incomplete) for a in args]
    code, err = run_main(capsys, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err


class _Toy(diffprobe.Model):
    family = "toy-registry"
    pipeline_classes = ("ToyRegistryPipeline",)
    tuple_elements = {"ToyBlock": ("hidden_states", "extra")}


def test_family_registry_refuses_clashes_and_restores_itself():
    from diffprobe.registry import FamilyError, adapter, families, registered_adapter

    assert adapter("sd").family == "sd"
    with pytest.raises(FamilyError, match="unknown family 'sdx'.*Did you mean 'sdxl'"):
        adapter("sdx")
    with registered_adapter(_Toy):
        assert "toy-registry" in families()
        assert diffprobe.registry.tuple_elements("ToyBlock") == ("hidden_states", "extra")
        clash = type("Again", (_Toy,), {})
        with pytest.raises(FamilyError, match="already registered by _Toy"):
            diffprobe.registry.register_adapter(clash)
        pipeline = type("Other", (_Toy,), {"family": "other", "tuple_elements": {}})
        with pytest.raises(FamilyError, match="wraps ToyRegistryPipeline, which _Toy"):
            diffprobe.registry.register_adapter(pipeline)
        elements = type("Third", (diffprobe.Model,), {
            "family": "third", "tuple_elements": {"ToyBlock": ("extra", "hidden_states")}})  # fmt: skip
        with pytest.raises(FamilyError, match="names the elements of ToyBlock"):
            diffprobe.registry.register_adapter(elements)
    assert "toy-registry" not in families() and "other" not in families()
    assert diffprobe.registry.tuple_elements("ToyBlock") is None


def test_the_denoiser_config_finds_its_family():
    from diffprobe.models import meta
    from diffprobe.registry import adapter_for_denoiser

    for alias, family in [("sd1.5", "sd"), ("sdxl", "sdxl"), ("if-i", "if"), ("sd3", "sd3"),
                          ("flux-schnell", "flux"), ("ddpm-celebahq", "ddpm")]:  # fmt: skip
        denoiser = meta.components(alias)[0]
        config = meta.component_config(alias, denoiser)
        assert adapter_for_denoiser(config).family == family, alias
    # the published SD checkpoints load without their safety checker; the embedded tiny has none
    sd = diffprobe.registry.adapter("sd")
    assert sd.load_kwargs(resolve("sd1.5")) == {
        "safety_checker": None, "requires_safety_checker": False}  # fmt: skip
    assert sd.load_kwargs(resolve("tiny")) == {}
