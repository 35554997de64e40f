"""SAEs on generation (diffprobe.sae.generation) on the dummy SD pipeline: the streamed vectors
are the captured values of the conditional branch at every timestep (output, input, output -
input), an SAE spliced in with its error kept gives the plain images bit for bit, steering
adds exactly strength x the decoder row, and feature activity equals a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffprobe.hooks.capture import capture
from diffprobe.sae import SAEError, TopKSAE, load_sae, train_sae
from diffprobe.sae.generation import (
    feature_activity,
    generation_batches,
    generation_source,
    masked_ablation_codes,
    sae_edit,
    splice_test,
    steer_feature,
    steering_strengths,
)

SITE = "unet.up_blocks.0.attentions.0"  # keeps its shape: output - input is defined
PROMPTS = ["a red circle", "a blue star", "a green square"]
GEN = dict(steps=2, guidance_scale=5.0)

pytestmark = pytest.mark.slow  # every test generates with the dummy SD pipeline


def _sae(d_in: int, seed: int = 0, semantics: str = "output") -> TopKSAE:
    sae = TopKSAE(d_in, 4 * d_in, 4, seed=seed, metadata={"site_semantics": semantics})
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return sae


def test_streamed_vectors_are_the_captured_conditional_values_of_every_timestep(sd_model):
    with capture(sd_model, [SITE, f"{SITE}:input"]) as cache:
        sd_model.generate(PROMPTS[:2], seed=0, **GEN)
    out, inp = cache.view(SITE), cache.view(f"{SITE}:input")
    for semantics, expected in (("output", out.branch("cond")), ("input", inp.branch("cond")),
                                ("delta", out.branch("cond") - inp.branch("cond"))):  # fmt: skip
        batches = list(generation_batches(sd_model, SITE, PROMPTS[:2], semantics=semantics,
                                          batch_items=2, **GEN))  # fmt: skip
        assert [t for _, t in batches] == list(out.timesteps)
        for call, (value, _) in enumerate(batches):
            torch.testing.assert_close(value, expected[call], rtol=0, atol=0)
    both = list(generation_batches(sd_model, SITE, PROMPTS[:2], branch="both", **GEN))
    assert both[0][0].shape[0] == 4  # both CFG halves
    plain = list(generation_batches(sd_model, SITE, PROMPTS[:2], steps=2, guidance_scale=1.0))
    assert plain[0][0].shape[0] == 2  # no CFG: the one branch, whatever branch= says


def test_generation_source_counts_and_metadata_and_training_records_them(sd_model, tmp_path):
    source = generation_source(sd_model, SITE, PROMPTS, batch_items=2, **GEN)
    tokens = sum(len(block) for block, _ in source.blocks(0, 0))
    assert tokens == source.n_tokens and source.d_in == 64
    meta = source.metadata
    assert meta["site"] == SITE and meta["branch"] == "cond" and meta["site_semantics"] == "output"
    assert meta["timesteps"] == [t for _, t in generation_batches(sd_model, SITE, PROMPTS[:1],
                                                                  **GEN)]  # fmt: skip
    assert meta["scheduler"] == "DDIMScheduler"
    sae = train_sae(source, tmp_path / "sae", expansion=2, k=4, batch_size=256, device="cpu",
                    progress=False)  # fmt: skip
    loaded = load_sae(tmp_path / "sae")
    assert loaded.metadata["site"] == SITE and loaded.metadata["timesteps"] == meta["timesteps"]
    assert torch.equal(loaded.W_dec, sae.W_dec)


def test_keep_in_memory_replays_the_first_pass(sd_model, monkeypatch):
    source = generation_source(sd_model, SITE, PROMPTS[:2], keep_in_memory=True, **GEN)
    first = [b.clone() for b, _ in source.blocks(0, 0)]
    monkeypatch.setattr(sd_model, "generate", lambda *a, **k: pytest.fail("generated again"))
    second = [b for b, _ in source.blocks(1, 0)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("semantics", ["output", "input", "delta"])
def test_spliced_with_error_kept_is_the_plain_generation_bit_for_bit(sd_model, semantics):
    sae = _sae(64, semantics=semantics)
    result = splice_test(sd_model, sae, SITE, PROMPTS[:2], **GEN)
    assert result["error_kept_identical"] and result["error_kept_max_abs"] == 0
    assert result["pixel_mse"] > 0  # the reconstruction alone changes the images


def test_spliced_reconstruction_is_the_sae_reconstruction_of_the_site(sd_model):
    sae = _sae(64)
    with sae_edit(sd_model, sae, SITE, keep_error=False):
        with capture(sd_model, SITE) as edited:  # registered after the edit: sees its result
            with capture(sd_model, f"{SITE}:input"):
                sd_model.generate(PROMPTS[:1], seed=0, **GEN)
    with capture(sd_model, SITE) as cache:
        sd_model.generate(PROMPTS[:1], seed=0, **GEN)
    # the first call's input is the same in both runs, so its output is comparable
    first = cache.view(SITE).branch("cond")[0]
    tokens = first.permute(0, 2, 3, 1).reshape(-1, 64)
    expected = sae(tokens).reconstruction.reshape(1, 16, 16, 64).permute(0, 3, 1, 2)
    torch.testing.assert_close(edited.view(SITE).branch("cond")[0], expected)


def test_steering_adds_strength_times_the_decoder_row_at_the_given_timesteps(sd_model):
    sae = _sae(64)
    timesteps = [t for _, t in generation_batches(sd_model, SITE, PROMPTS[:1], **GEN)]
    strengths = {timesteps[0]: 3.0}  # the second timestep is left alone
    with steer_feature(sd_model, sae, SITE, 5, strengths):
        with capture(sd_model, SITE) as steered:
            sd_model.generate(PROMPTS[:1], seed=0, **GEN)
    with capture(sd_model, SITE) as plain:
        sd_model.generate(PROMPTS[:1], seed=0, **GEN)
    delta = steered.view(SITE).values[0] - plain.view(SITE).values[0]  # (branches, 1, C, H, W)
    expected = (3.0 * sae.W_dec[5]).reshape(1, 1, 64, 1, 1).expand_as(delta)
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=0)
    assert steering_strengths(np.array([0.5, 0.0]), timesteps, 500) == {
        timesteps[0]: 250.0, timesteps[1]: 0.0}  # fmt: skip
    with pytest.raises(SAEError, match="one per timestep"):
        steering_strengths(np.array([1.0]), timesteps)


def test_masked_ablation_edit_scales_only_codes_above_threshold():
    codes = torch.tensor([[0.0, 2.0, 0.5], [1.0, 0.2, 3.0]])
    out = masked_ablation_codes([1, 2], scale=-2.0, threshold=[1.0, 1.0])(codes.clone())
    assert torch.equal(out, torch.tensor([[0.0, -4.0, 0.5], [1.0, 0.2, -6.0]]))


def test_feature_activity_equals_a_direct_computation(sd_model):
    sae = _sae(64)
    batches = list(generation_batches(sd_model, SITE, PROMPTS, batch_items=2, **GEN))
    activity = feature_activity(sae, batches)
    assert activity["codes"].shape == (3, 2, 256) and activity["channels"].shape == (3, 2, 64)
    # item 2 is in the second chunk; timestep index 1 is the chunk's second batch
    value = batches[3][0][0]
    tokens = value.permute(1, 2, 0).reshape(-1, 64)
    dense = sae.encode(tokens)
    np.testing.assert_allclose(activity["codes"][2, 1], dense.mean(0).detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(activity["channels"][2, 1], tokens.mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(activity["max_activation"], activity["codes"].max(0))


def test_delta_on_a_block_that_changes_shape_is_one_clear_error(sd_model):
    with pytest.raises(SAEError, match="differ in shape"):
        next(generation_batches(sd_model, "unet.up_blocks.0", PROMPTS[:1], semantics="delta",
                                **GEN))  # fmt: skip
    with pytest.raises(SAEError, match="site.semantics"):
        generation_source(sd_model, SITE, PROMPTS, semantics="difference")


def test_sae_transform_in_the_features_capture_stores_mean_codes(sd_model, tmp_path):
    from diffprobe.extract.generation import ActivityPlan, generate_batch, reducer
    from diffprobe.features import open_activity
    from diffprobe.sae.generation import capture_sae_activity, sae_transform

    sae = _sae(64)
    plan = ActivityPlan(sites=[SITE], seeds=[0], **GEN)
    _, latents, _ = generate_batch(sd_model, PROMPTS[:2], [0, 0], plan,
                                   {SITE: reducer(("mean",), sae_transform(sae))}, ["cond"])  # fmt: skip
    _, raw, _ = generate_batch(sd_model, PROMPTS[:2], [0, 0], plan, {SITE: lambda v: v}, ["cond"])
    maps = raw[SITE, "cond"]  # (items, timesteps, C, H, W)
    tokens = maps.flatten(3).transpose(2, 3)  # (items, timesteps, H*W, C)
    expected = sae.encode(tokens).mean(2)
    torch.testing.assert_close(latents[SITE, "cond"][:, :, 0], expected, atol=1e-5, rtol=1e-5)
    run = open_activity(capture_sae_activity(sd_model, PROMPTS[:2], plan, tmp_path / "act",
                                             {SITE: sae}, progress=False))  # fmt: skip
    assert run.get(SITE).shape == (2, 2, 256)


def test_steering_through_the_features_api_equals_steer_feature(sd_model):
    from diffprobe.features import steer
    from diffprobe.interventions.sae_steer import sae_feature_steer

    sae = _sae(64)
    timesteps = [t for _, t in generation_batches(sd_model, SITE, PROMPTS[:1], **GEN)]
    max_activation = np.array([0.004, 0.002])
    spec = sae_feature_steer(sae, SITE, 7, max_activation, timesteps)  # scale 500
    ours = steer(sd_model, PROMPTS[:1], spec, seed=0, **GEN)
    with steer_feature(sd_model, sae, SITE, 7,
                       steering_strengths(max_activation, timesteps, 500)):  # fmt: skip
        theirs = sd_model.generate(PROMPTS[:1], seed=0, **GEN)
    plain = sd_model.generate(PROMPTS[:1], seed=0, **GEN)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert np.abs(ours - plain).max() > 1e-3
