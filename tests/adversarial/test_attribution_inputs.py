"""Bad input to ``diffprobe attribution`` and ``attribution-eval``: exit 2, one line naming the
input and what was expected (a missing word lists the prompt's tokens), nothing created."""

from __future__ import annotations

import pytest

ATTRIBUTE = ["attribution", "--model", "tiny", "--prompt", "a red circle", "--out", "maps"]

CASES = {
    "word not in the prompt": (
        [*ATTRIBUTE, "--words", "star"],
        ["'star'", "a</w> red</w> circle</w>", "--words"],
    ),
    "phrase not in the prompt": ([*ATTRIBUTE, "--words", "top left"], ["'top left'", "tokens"]),
    "threshold above one": ([*ATTRIBUTE, "--threshold", "1.5"], ["1.5", "between 0 and 1"]),
    "threshold zero": ([*ATTRIBUTE, "--threshold", "0"], ["threshold 0", "between 0 and 1"]),
    "threshold one": ([*ATTRIBUTE, "--threshold", "1"], ["threshold 1", "between 0 and 1"]),
    "threshold nan": ([*ATTRIBUTE, "--threshold", "nan"], ["nan", "between 0 and 1"]),
    "bad size": ([*ATTRIBUTE, "--size", "64by96"], ["64by96", "64x96"]),
    "bad layer group": ([*ATTRIBUTE, "--layers", "middle"], ["--layers", "middle", "down"]),
    "bad timestep range": ([*ATTRIBUTE, "--timesteps", "late,final"], ["--timesteps", "early"]),
    "zero steps": ([*ATTRIBUTE, "--steps", "0"], ["--steps 0", "at least 1"]),
    "bad masks": ([*ATTRIBUTE, "--masks", "sam"], ["--masks", "'sam'", "reader"]),
    "eval threshold outside": (
        ["attribution-eval", ".", "--threshold", "-0.2"],
        ["-0.2", "between 0 and 1"],
    ),
    "eval folder missing": (["attribution-eval", "nowhere"], ["nowhere", "not a folder"]),
    "eval folder without masks": (["attribution-eval", "."], ["gt.png", "heat_map"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_attribution_input_is_refused(refused, name):
    args, names = CASES[name]
    refused(args, names)


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    """A pixel-space DDPM (UNet2DModel, no text) saved as a local diffusers folder."""
    from diffprobe.testing.cases import dummy_cases

    folder = tmp_path_factory.mktemp("ddpm") / "ddpm"
    dummy_cases("ddpm")[0].build(0).save_pretrained(folder)
    return folder


def test_model_without_cross_attention_is_refused(refused, ddpm_folder):
    args = ["attribution", "--model", str(ddpm_folder), "--prompt", "a red circle", "--out", "m"]
    refused(args, ["ddpm", "no attention from image to text tokens"])
