"""The parameters of ``extract``, ``sites``, ``lens`` and model loading, fed what users really
type wrong: every case is refused with exit 2, one line naming the value as given and what was
expected, and nothing is created (issue 15). Most cases fail before any model is loaded; those
that need the model's schedule, size rule or sites load the embedded ``tiny`` (about 1 s)."""

from __future__ import annotations

import json

import pytest
import torch

EXTRACT = ["extract", "--model", "tiny", "--data", "shapes:4", "--out", "run"]
SITE = ["--sites", "unet.mid_block"]
NOISE = ["--noise", "0.1"]


def extract(*args: str) -> list[str]:
    """An extract command line on ``tiny``; ``args`` add to (or replace) its sites and grid."""
    extra = list(args)
    sites = [] if "--sites" in extra else SITE
    grid = [] if "--noise" in extra or "--timesteps" in extra or "--no-grid" in extra else NOISE
    extra = [a for a in extra if a != "--no-grid"]
    return [*EXTRACT, *sites, *grid, *extra]


GRID_CASES = {
    "timestep past the schedule": (extract("--timesteps", "5000"), ["5000", "0..999"]),
    "negative timestep": (extract("--timesteps", "-5"), ["-5", "--timesteps"]),
    "negative timestep among others": (extract("--timesteps", "10,-1"), ["-1", "--timesteps"]),
    "fractional timestep": (extract("--timesteps", "10.5"), ["10.5", "integer"]),
    "noise above one": (extract("--noise", "1.5"), ["1.5", "[0, 1]"]),
    "negative noise": (extract("--noise", "-0.1"), ["-0.1", "[0, 1]"]),
    "noise not a number": (extract("--noise", "abc"), ["--noise", "abc"]),
    "noise empty": (extract("--noise", ""), ["--noise", "''"]),
    "noise only commas": (extract("--noise", ",,"), ["--noise", "',,'"]),
    "noise nan": (extract("--noise", "nan"), ["--noise", "nan"]),
    "noise inf": (extract("--noise", "0.1,inf"), ["--noise", "inf"]),
    "timesteps empty": (extract("--timesteps", ""), ["--timesteps", "''"]),
    "neither noise nor timesteps": (extract("--no-grid"), ["--noise", "--timesteps", "one of"]),
    "both noise and timesteps": (
        extract("--noise", "0.1", "--timesteps", "10"),
        ["--noise", "--timesteps", "not both"],
    ),
    "duplicate noise level": (extract("--noise", "0.1,0.1"), ["0.1", "twice"]),
    "duplicate noise level written two ways": (extract("--noise", "0.1,0.10"), ["0.1", "twice"]),
    "noise levels with one key": (
        extract("--noise", "0.1,0.1000001"),
        ["0.1", "0.1000001", "p0.1"],
    ),
    "noise levels on one timestep": (extract("--noise", "0.1,0.1002"), ["0.1", "0.1002", "100"]),
    "duplicate timestep": (extract("--timesteps", "10,20,10"), ["10", "twice"]),
    "duplicate timestep written two ways": (extract("--timesteps", "10,10.0"), ["10", "twice"]),
}

SITE_CASES = {
    "duplicate site": (
        extract("--sites", "unet.mid_block", "unet.mid_block"),
        ["unet.mid_block", "twice"],
    ),
    "duplicate site in two options": (
        extract("--sites", "unet.mid_block", "--sites", "unet.mid_block"),
        ["unet.mid_block", "twice"],
    ),
    "misspelled site": (
        extract("--sites", "unet.midblock"),
        ["unet.midblock", "unet.mid_block"],
    ),
    "text-encoder site": (
        extract("--sites", "text_encoder.encoder.layers.0"),
        ["text_encoder.encoder.layers.0", "denoiser"],
    ),
    "vae site": (extract("--sites", "vae.encoder"), ["vae.encoder", "denoiser"]),
    "empty sites": (extract("--sites", ""), ["--sites", "diffprobe sites"]),
    "blank sites": (extract("--sites", "  "), ["--sites", "diffprobe sites"]),
}

OPTION_CASES = {
    "zero chunk items": (extract("--chunk-items", "0"), ["--chunk-items", "0"]),
    "negative chunk items": (extract("--chunk-items", "-1"), ["--chunk-items", "-1"]),
    "zero batch size": (extract("--batch-size", "0"), ["--batch-size", "0"]),
    "negative batch size": (extract("--batch-size", "-4"), ["--batch-size", "-4"]),
    "shard past the count": (extract("--shard", "3/2"), ["--shard", "3/2"]),
    "shard index equal to count": (extract("--shard", "2/2"), ["--shard", "2/2"]),
    "shard not numbers": (extract("--shard", "a/b"), ["--shard", "a/b"]),
    "shard of zero": (extract("--shard", "1/0"), ["--shard", "1/0"]),
    "negative shard": (extract("--shard", "-1/2"), ["--shard", "-1/2"]),
    "shard without a slash": (extract("--shard", "1"), ["--shard", "'1'"]),
    "unknown pooling": (extract("--pooling", "avg"), ["--pooling", "avg", "mean"]),
    "unknown condition": (extract("--condition", "foo"), ["--condition", "foo", "template"]),
    "template condition without template": (
        extract("--condition", "template"),
        ["--condition template", "--template"],
    ),
    "prompt condition without template": (
        extract("--condition", "prompt"),
        ["--condition prompt", "--template"],
    ),
    "template without label": (
        extract("--condition", "template", "--template", "a photo"),
        ["'a photo'", "{label}"],
    ),
    "template with another field": (
        extract("--condition", "template", "--template", "a {colour} {label}"),
        ["{colour}", "{label}"],
    ),
    "template with an unclosed brace": (
        extract("--condition", "template", "--template", "a {label"),
        ["'a {label'", "{label}"],
    ),
    "template without its condition": (
        extract("--template", "a photo of a {label}"),
        ["--template", "--condition"],
    ),
    "negative guidance scale": (extract("--guidance-scale", "-1"), ["--guidance-scale", "-1"]),
    "nan guidance scale": (extract("--guidance-scale", "nan"), ["--guidance-scale", "nan"]),
    "size not a multiple": (extract("--size", "13"), ["13", "16"]),
    "size not a multiple of 16": (extract("--size", "72"), ["72", "16", "64 or 80"]),
    "zero size": (extract("--size", "0"), ["--size", "0"]),
    "negative size": (extract("--size", "-64"), ["--size", "-64"]),
    "float64 dtype": (extract("--dtype", "fp64"), ["--dtype", "fp64", "fp32"]),
    "unknown dtype": (extract("--dtype", "banana"), ["--dtype", "banana", "fp32"]),
    "negative seed": (extract("--seed", "-1"), ["--seed", "-1"]),
    "integer store dtype": (extract("--store-dtype", "int8"), ["--store-dtype", "int8", "float16"]),
    "bfloat16 store dtype": (
        extract("--store-dtype", "bfloat16"),
        ["--store-dtype", "bfloat16", "float32"],
    ),
    "unknown store dtype": (extract("--store-dtype", "fp8"), ["--store-dtype", "fp8"]),
}

DEVICE_CASES = {
    "cuda": (extract("--device", "cuda"), ["--device", "cuda", "cpu"]),
    "cuda:3": (extract("--device", "cuda:3"), ["--device", "cuda:3", "cpu"]),
    "mps": (extract("--device", "mps"), ["--device", "mps", "cpu"]),
    "tpu": (extract("--device", "tpu"), ["--device", "tpu", "cpu"]),
    "empty device": (extract("--device", ""), ["--device", "''", "cpu"]),
    "lens on cuda": (
        ["lens", "--model", "tiny", "--prompt", "a red circle", "--device", "cuda"],
        ["--device", "cuda", "cpu"],
    ),
    "lens on a made-up device": (
        ["lens", "--model", "tiny", "--prompt", "a red circle", "--device", "gpu0"],
        ["--device", "gpu0", "cpu"],
    ),
}

MODEL_CASES = {
    "misspelled alias": (["--model", "sd1.55"], ["sd1.55", "sd1.5"]),
    "missing relative path": (["--model", "./models/mine"], ["./models/mine", "no such"]),
    "missing absolute path": (["--model", "/nonexistent/pipeline"], ["/nonexistent/pipeline"]),
    "missing home path": (["--model", "~/models/sd"], ["~/models/sd", "no such"]),
    "folder that is not a pipeline": (["--model", "../Documents"], ["../Documents", "model_index"]),
    "a file": (["--model", "../.bashrc"], ["../.bashrc", "file"]),
    "empty model": (["--model", ""], ["--model", "''"]),
    "hub id, offline": (["--model", "nobody/no-such-model"], ["nobody/no-such-model", "offline"]),
    "broken model_index.json": (["--model", "../broken"], ["../broken", "model_index.json"]),
    "model_index.json of no pipeline": (
        ["--model", "../listless"],
        ["../listless", "model_index.json", "_class_name"],
    ),
}

SITES_COMMAND_CASES = {
    "size not a multiple (sd1.5)": (["sites", "sd1.5", "--size", "13"], ["13", "8"]),
    "size not a multiple (tiny)": (["sites", "tiny", "--size", "72"], ["72", "16"]),
    "zero size": (["sites", "tiny", "--size", "0"], ["--size", "0"]),
    "negative size": (["sites", "sd1.5", "--size", "-512"], ["--size", "-512"]),
    "unknown component": (["sites", "sd1.5", "--component", "unett"], ["unett", "unet"]),
    "misspelled alias": (["sites", "sd1.55"], ["sd1.55", "sd1.5"]),
    "hub id without shipped configs": (["sites", "nobody/no-such-model"], ["nobody/no-such-model"]),
    "missing folder": (["sites", "./models/mine"], ["./models/mine"]),
    "a file": (["sites", "../.bashrc"], ["../.bashrc"]),
}

LENS = ["lens", "--model", "tiny", "--prompt", "a red circle", "--out", "lens-out"]

LENS_CASES = {
    "out is a file": (
        ["lens", "--model", "tiny", "--prompt", "a red circle", "--out", "../.bashrc"],
        ["--out", ".bashrc", "file"],
    ),
    "out under a file": (
        ["lens", "--model", "tiny", "--prompt", "a", "--out", "../.bashrc/lens"],
        ["--out", ".bashrc"],
    ),
    "layer out of range": ([*LENS, "--layers", "99"], ["99", "0..4"]),
    "layer not a number": ([*LENS, "--layers", "a"], ["--layers", "'a'"]),
    "layers empty": ([*LENS, "--layers", ""], ["--layers", "''"]),
    "negative seed": ([*LENS, "--seeds", "-1"], ["--seeds", "-1"]),
    "seed not a number": ([*LENS, "--seeds", "x"], ["--seeds", "x"]),
    "zero steps": ([*LENS, "--steps", "0"], ["--steps", "0"]),
    "zero batch size": ([*LENS, "--batch-size", "0"], ["--batch-size", "0"]),
    "unknown encoder": ([*LENS, "--encoder", "text_encoder_9"], ["text_encoder_9", "text_encoder"]),
    "size not a multiple": ([*LENS, "--size", "13"], ["13", "16"]),
    "zero size": ([*LENS, "--size", "0"], ["--size", "0"]),
    "negative guidance": ([*LENS, "--guidance", "-2"], ["--guidance", "-2"]),
    "float64 dtype": ([*LENS, "--dtype", "fp64"], ["--dtype", "fp64"]),
    "unknown pad": ([*LENS, "--pad", "zeros"], ["--pad", "zeros"]),
    "misspelled model": (["lens", "--model", "tiny2", "--prompt", "a"], ["tiny2", "tiny"]),
}


def _cases(table: dict) -> list:
    return [pytest.param(args, names, id=name) for name, (args, names) in table.items()]


@pytest.mark.parametrize(
    ("args", "names"),
    _cases(GRID_CASES) + _cases(SITE_CASES) + _cases(OPTION_CASES) + _cases(DEVICE_CASES),
)
def test_extract_refuses(refused, args, names):
    refused(args, names)


@pytest.fixture
def model_folders(sandbox):
    """Folders that look like pipelines but are not (beside ``~/Documents`` and ``~/.bashrc``)."""
    (sandbox / "broken").mkdir()
    (sandbox / "broken" / "model_index.json").write_text("{not json")
    (sandbox / "listless").mkdir()
    (sandbox / "listless" / "model_index.json").write_text(json.dumps({"unet": ["x", "y"]}))
    return sandbox


@pytest.mark.parametrize(("args", "names"), _cases(MODEL_CASES))
def test_extract_refuses_models(model_folders, refused, args, names):
    refused([*EXTRACT, *SITE, *NOISE, *args], names)


@pytest.mark.parametrize(("args", "names"), _cases(MODEL_CASES))
def test_lens_refuses_models(model_folders, refused, args, names):
    refused(["lens", "--prompt", "a red circle", *args], names)


@pytest.mark.parametrize(("args", "names"), _cases(SITES_COMMAND_CASES))
def test_sites_refuses(refused, args, names):
    refused(args, names)


@pytest.mark.parametrize(("args", "names"), _cases(LENS_CASES))
def test_lens_refuses(refused, args, names):
    refused(args, names)


def test_neither_noise_nor_timesteps_does_not_say_both(refused):
    outcome = refused(extract("--no-grid"), ["--noise"])
    assert "not both" not in outcome.err


def test_a_device_missing_here_names_the_devices_that_are_here(refused):
    outcome = refused(extract("--device", "cuda"), ["cuda"])
    assert "available here: cpu" in outcome.err or torch.cuda.is_available()


def test_refusals_are_one_line(refused):
    """``error: <message>`` on one line, nothing else on stderr (usage errors aside)."""
    for args, names in [GRID_CASES["noise above one"], OPTION_CASES["integer store dtype"],
                        DEVICE_CASES["cuda"], MODEL_CASES["misspelled alias"]]:  # fmt: skip
        full = args if args[0] in ("extract", "lens") else [*EXTRACT, *SITE, *NOISE, *args]
        outcome = refused(full, names)
        assert outcome.err.startswith("error: ") and outcome.err.count("\n") == 1, outcome.err


@pytest.mark.slow
def test_the_grid_still_accepts_what_is_valid(sandbox, cli):
    """The checks refuse only what is wrong: the edges of the schedule and a timestep grid
    are taken, and the run is written."""
    outcome = cli(*EXTRACT, *SITE, "--timesteps", "0,999", "--chunk-items", "4", "--quiet")
    assert outcome.code == 0, outcome.err
    info = json.loads((sandbox / "work" / "run" / "run.json").read_text())
    assert [n["key"] for n in info["noise"]] == ["t0", "t999"]
    outcome = cli(*EXTRACT[:-1], "run2", *SITE, "--noise", "0,1", "--store-dtype", "float16",
                  "--quiet")  # fmt: skip
    assert outcome.code == 0, outcome.err
