"""``diffprobe hspace`` fed bad input: identical texts, unknown colours, a Δh file of the wrong
shape or of the wrong format, a model without a mid block, an inverted input of the wrong size:
one line each, exit 2, nothing left behind."""

from __future__ import annotations

import pytest
import torch

from diffprobe.interventions import hspace as H

TRAIN = ["hspace", "train", "--model", "tiny", "--out", "out"]


def test_identical_source_and_target(refused):
    refused([*TRAIN, "--source", "red", "--target", "red"], ["'red'", "same"])


def test_colour_the_world_lacks(refused):
    refused([*TRAIN, "--source", "teal", "--target", "blue"], ["teal", "red"])


def test_unknown_kind(refused):
    refused([*TRAIN, "--source", "red", "--target", "blue", "--kind", "mlp"], ["mlp", "conv"])


def test_strengths_not_numbers(refused, tmp_path):
    delta = tmp_path / "d.safetensors"
    H.save_delta(delta, H.ConstantDelta(torch.zeros(128, 4, 4)), {})
    refused(["hspace", "eval", "--model", "tiny", "--source", "red", "--target", "blue",
             "--delta", str(delta), "--strengths", "one,two", "--out", "out"],
            ["--strengths", "one,two"])  # fmt: skip


@pytest.mark.slow
def test_delta_file_of_the_wrong_shape(refused, tmp_path):
    delta = tmp_path / "wrong.safetensors"
    H.save_delta(delta, H.ConstantDelta(torch.zeros(7, 3, 3)), {})
    refused(["hspace", "eval", "--model", "tiny", "--source", "red", "--target", "blue",
             "--delta", str(delta), "--out", "out"], [str(delta), "(7, 3, 3)", "mid block"])  # fmt: skip


def test_delta_file_not_safetensors(refused, tmp_path):
    delta = tmp_path / "delta.pt"
    delta.write_bytes(b"\x80\x04not a safetensors file")
    refused(["hspace", "eval", "--model", "tiny", "--source", "red", "--target", "blue",
             "--delta", str(delta), "--out", "out"], [str(delta), "safetensors"])  # fmt: skip


@pytest.mark.slow
def test_model_without_mid_block(refused, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None)  # fmt: skip
    folder = tmp_path / "no-mid"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    refused(["hspace", "direction", "--model", str(folder), "--source", "red", "--target",
             "blue", "--out", "out"], ["no UNet mid block", "mid_block"])  # fmt: skip


def test_inverted_input_of_the_wrong_size():
    from diffusers import DDPMScheduler, UNet2DModel

    from diffprobe.loading import from_pipeline
    from diffprobe.testing.ddpm import dummy_ddpm_pipeline

    pipe = dummy_ddpm_pipeline(0)
    pipe.unet = UNet2DModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
                            norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "UpBlock2D"))  # fmt: skip
    pipe.scheduler = DDPMScheduler()
    model = from_pipeline(pipe, None, "small")
    with pytest.raises(H.HSpaceError, match=r"\(1, 3, 15, 15\).*multiples of 2"):
        H.ddim_invert(model, torch.zeros(1, 3, 15, 15), steps=2)
    edit = H.HSpaceEdit([H.ConstantDelta(torch.zeros(32, 8, 8))])  # Δh made at 16 px
    with pytest.raises(H.HSpaceError, match=r"h of shape \(32, 12, 12\).*made for \(32, 8, 8\)"):
        H.sample(model, torch.zeros(1, 3, 24, 24), steps=2, hspace=edit)


def test_paired_objective_without_twins(refused):
    refused([*TRAIN, "--source", "red", "--target", "smiling", "--objective", "paired"],
            ["--target", "'smiling'", "shapes-world colour", "--objective clip"])  # fmt: skip


def test_unknown_objective(refused):
    refused([*TRAIN, "--source", "red", "--target", "blue", "--objective", "lpips"],
            ["--objective", "'lpips'", "clip or paired"])  # fmt: skip
