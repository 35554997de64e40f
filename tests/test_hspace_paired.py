"""``--objective paired``: a Δh source trained on colour twins (interventions/hspace/paired.py),
on a 16 px random DDPM: the loss is the one documented (recomputed by an independent path),
it decreases, the saved f_t loads and edits, the recon term only sees the kept pixels."""

from __future__ import annotations

import json

import pytest
import torch

from diffprobe.interventions import hspace as H
from diffprobe.interventions.hspace.paired import _kept_l1, train_paired
from diffprobe.interventions.hspace.training import TrainConfig
from diffprobe.loading import from_pipeline
from diffprobe.testing.ddpm import dummy_ddpm_pipeline

SIZE = 16


@pytest.fixture(scope="module")
def ddpm():
    from diffusers import UNet2DModel

    pipe = dummy_ddpm_pipeline(0)
    torch.manual_seed(0)
    pipe.unet = UNet2DModel(sample_size=SIZE, block_out_channels=(16, 32), layers_per_block=1,
                            norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "UpBlock2D")).eval()  # fmt: skip
    for parameter in pipe.unet.parameters():
        parameter.requires_grad_(False)
    return from_pipeline(pipe, None, "dummy-ddpm")


def _pairs(ddpm, steps, items=2):
    from diffprobe.stages.hspace import invert, keep_mask, paired_data

    red, blue = paired_data("red", "blue", items)
    x0, x_T = invert(ddpm, red.images, steps, False)
    _, twin_T = invert(ddpm, blue.images, steps, False)
    return x_T, twin_T, keep_mask(ddpm, red.masks, x0)


def _config(**kw):
    base = dict(steps=4, epochs=1, batch_size=8, optimizer="adamw", learning_rate=1e-2,
                lambda_recon=1.0, t_edit=0, objective="paired")  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_first_loss_equals_the_plain_chains_distance(ddpm, loss):
    """f_t starts at Δh = 0, so the first loss is d(plain output, twin's plain output) with a
    zero recon term; recomputed here with ``H.sample`` (the library's sampler, unclipped)."""
    steps = 4
    x_T, twin_T, keep = _pairs(ddpm, steps)
    delta = H.build_delta("conv", H.h_shape(ddpm), steps)
    result = train_paired(ddpm, delta, x_T, twin_T, keep, _config(paired_loss=loss),
                          progress=False)  # fmt: skip
    with torch.no_grad():
        out = H.sample(ddpm, x_T, steps=steps, clip_sample=False)
        twin = H.sample(ddpm, twin_T, steps=steps, clip_sample=False)
    diff = out - twin
    expected = (diff**2).mean() if loss == "mse" else diff.abs().mean()
    assert expected > 1e-4  # red and blue chains differ: the check can fail
    first = result["history"][0]
    assert first["twin"] == pytest.approx(float(expected), rel=1e-5)
    assert first["recon"] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(("kind", "at"), [("conv", "final"), ("free", "final"), ("conv", "pt")])
def test_paired_loss_decreases(ddpm, kind, at):
    steps = 4
    x_T, twin_T, keep = _pairs(ddpm, steps)
    torch.manual_seed(0)
    delta = H.build_delta(kind, H.h_shape(ddpm), steps)
    result = train_paired(ddpm, delta, x_T, twin_T, keep,
                          _config(epochs=25 if at == "final" else 6, paired_at=at,
                                  learning_rate=3e-2), progress=False)  # fmt: skip
    history = [row["twin"] for row in result["history"]]
    if at == "pt":  # one row per timestep: compare the same timestep in the first and last pass
        assert len(history) == 6 * steps
        first, last = history[:steps], history[-steps:]
        assert sum(last) < 0.9 * sum(first), (first, last)
    else:
        assert len(history) == 25
        assert history[-1] < 0.9 * history[0], history


def test_recon_term_sees_only_kept_pixels():
    a = torch.zeros(1, 3, 4, 4)
    b = a.clone()
    keep = torch.ones(1, 1, 4, 4)
    keep[..., 1:3, 1:3] = 0  # the "shape"
    b[..., 1:3, 1:3] = 5.0  # a change inside the shape costs nothing
    assert float(_kept_l1(a, b, keep)) == 0.0
    b[..., 0, 0] = 1.0  # one kept pixel changed by 1 on 3 channels: 3 / (3 · 12 kept)
    assert float(_kept_l1(a, b, keep)) == pytest.approx(1 / 12)


def test_train_paired_writes_a_delta_that_loads_and_edits(ddpm, tmp_path):
    from diffprobe.stages.hspace import edit_images, invert, source_images, train

    steps = 3
    out = train(ddpm, tmp_path / "p", source="red", target="blue", kind="conv", items=2,
                config=_config(steps=steps, epochs=3, learning_rate=5e-2),
                progress=False)  # fmt: skip
    delta, info = H.load_delta(out / "delta.safetensors", H.h_shape(ddpm))
    assert info["objective"] == "paired" and info["t_edit"] == 0 and info["t_boost"] == -1
    record = json.loads((out / "train.json").read_text())
    assert record["optimizer_steps"] == 3 and record["clip"] is None
    _, x_T = invert(ddpm, source_images("red", 2, start=20_000).images, steps, False)
    kw = dict(steps=steps, t_edit=0, t_boost=-1, train_steps=steps)
    plain = edit_images(ddpm, x_T, [delta], strength=0.0, **kw)
    edited = edit_images(ddpm, x_T, [delta], strength=1.0, **kw)
    assert (edited - plain).abs().max() > 1e-4  # the trained f_t is not zero and edits


def test_paired_objective_without_twins_is_refused():
    from diffprobe.stages.hspace import paired_data

    with pytest.raises(H.HSpaceError, match="not a shapes-world colour") as info:
        paired_data("red", "a smiling face", 2)
    assert "\n" not in str(info.value) and "--objective clip" in str(info.value)
