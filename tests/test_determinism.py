"""Batch invariance: with diffprobe.determinism.batch_invariant, an item gives the same bits
alone or in a batch, through the real tiny VAE and UNet and through the extraction engine."""

import json

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe.data.sources import open_source
from diffprobe.determinism import batch_invariant
from diffprobe.extract import ExtractionPlan, extract
from diffprobe.extract.store import open_run


@pytest.fixture(scope="module")
def tiny():
    return diffprobe.load("tiny").pipe


def _vae_and_unet(pipe, images, t, embeds):
    latents = pipe.vae.encode(images).latent_dist.mean
    return latents, pipe.unet(latents, t, embeds).sample


@pytest.mark.slow
def test_tiny_vae_and_unet_give_the_same_bits_alone_and_in_a_batch(tiny):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 64, 64, generator=generator) * 2 - 1
    t = torch.tensor([999, 800, 600, 500, 300, 100, 20, 1])
    ids = tiny.tokenizer(
        ["a small red circle in the top left"] * 4 + [""] * 4,
        padding="max_length",
        max_length=16,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        embeds = tiny.text_encoder(ids)[0]

        def alone_and_together():
            together = _vae_and_unet(tiny, images, t, embeds)
            alone = [_vae_and_unet(tiny, images[i : i + 1], t[i : i + 1], embeds[i : i + 1])
                     for i in range(len(images))]  # fmt: skip
            return together, [torch.cat([a[k] for a in alone]) for k in range(2)]

        plain_together, plain_alone = alone_and_together()
        with batch_invariant():
            together, alone = alone_and_together()
    for k, name in enumerate(("vae latents", "unet output")):
        assert torch.equal(together[k], alone[k]), name
        # the mode changes only rounding: the plain computation agrees to float precision
        torch.testing.assert_close(plain_together[k], together[k], rtol=1e-4, atol=1e-5)
    if all(torch.equal(a, b) for a, b in zip(plain_together, plain_alone, strict=True)):
        pytest.skip("this machine's kernels are batch-invariant already; the mode was not needed")


def test_mode_is_off_outside_the_block_and_on_other_threads():
    from concurrent.futures import ThreadPoolExecutor

    from torch.overrides import _get_current_function_mode_stack

    with batch_invariant():
        assert len(_get_current_function_mode_stack()) == 1
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(lambda: len(_get_current_function_mode_stack())).result() == 0
    assert len(_get_current_function_mode_stack()) == 0
    with batch_invariant(enabled=False):
        assert len(_get_current_function_mode_stack()) == 0


@pytest.mark.slow
def test_extraction_with_batch_invariant_is_bit_identical_across_batch_sizes(tmp_path):
    model = diffprobe.load("tiny")
    plan = ExtractionPlan(sites=["unet.down_blocks.1", "unet.mid_block", "unet.up_blocks.2"],
                          noise_levels=[0.1, 0.5], pooling="none", chunk_items=12, seed=3,
                          batch_invariant=True)  # fmt: skip
    for batch in (1, 12):
        extract(model, open_source("shapes:12"), plan, tmp_path / f"b{batch}", batch_size=batch,
                progress=False)  # fmt: skip
    one, twelve = open_run(tmp_path / "b1"), open_run(tmp_path / "b12")
    assert one.keys() == twelve.keys() and len(one.keys()) == 6
    for key in one.keys():
        assert np.array_equal(one.get(*key), twelve.get(*key)), key
    assert json.loads((tmp_path / "b1" / "run.json").read_text())["batch_invariant"] is True


def test_module_example_runs():
    import doctest

    import diffprobe.determinism

    result = doctest.testmod(diffprobe.determinism)
    assert result.attempted > 0 and result.failed == 0
