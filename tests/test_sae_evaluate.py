"""Evaluation equals a direct computation; the splice callable reconstructs each layout and,
keeping the error, returns the input bit for bit; masked ablation and steering do what SAeUron
and the thesis write."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffprobe.sae import (
    ArraySource,
    SAEError,
    TopKSAE,
    decoder_direction,
    evaluate_sae,
    masked_ablation,
    sae_splice,
    sae_steer,
)


def _sae(normalization: str = "none") -> TopKSAE:
    sae = TopKSAE(6, 24, 3, normalization=normalization, seed=4)
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(5))
        sae.b_enc.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(6))
    return sae


def _direct_codes(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    hidden = (sae.normalize(x)[0] - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = hidden.topk(sae.k, dim=-1)
    return torch.zeros_like(hidden).scatter_(-1, indices, values.relu())


def test_evaluation_equals_a_direct_computation_overall_and_per_group():
    sae = _sae()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6)).astype(np.float32) * 2
    labels = np.array(["t999", "t500"])[rng.integers(0, 2, 500)]
    source = ArraySource(x, groups=["t500", "t999"], group_index=(labels == "t999").astype(int))
    result = evaluate_sae(sae, source, batch_size=64)
    tensor = torch.from_numpy(x)
    with torch.no_grad():
        recon = sae(tensor).reconstruction
        codes = _direct_codes(sae, tensor)

    def fvu(chosen):
        part = tensor[chosen]
        return float((part - recon[chosen]).pow(2).sum() / (part - part.mean(0)).pow(2).sum())

    everything = torch.ones(500, dtype=torch.bool)
    assert result.tokens == 500
    assert result.fvu == pytest.approx(fvu(everything), rel=1e-5)
    assert result.l0 == pytest.approx(float((codes > 0).sum(1).float().mean()))
    assert result.dead_fraction == pytest.approx(float(((codes > 0).sum(0) == 0).float().mean()))
    np.testing.assert_allclose(result.max_activation, codes.max(0).values.numpy(), rtol=1e-6)
    for name in ("t500", "t999"):
        chosen = torch.from_numpy(labels == name)
        assert result.groups[name]["tokens"] == int(chosen.sum())
        assert result.groups[name]["fvu"] == pytest.approx(fvu(chosen), rel=1e-5)
    partial = evaluate_sae(sae, source, tokens=123, batch_size=64)
    assert partial.tokens == 123


@pytest.mark.parametrize("normalization", ["none", "layer_norm"])
def test_splice_reconstructs_maps_and_sequences_and_keeps_the_error_exactly(normalization):
    sae = _sae(normalization)
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(2, 6, 3, 5, generator=g)  # (items, channels, height, width)
    sequence = torch.randn(2, 15, 6, generator=g)  # (items, tokens, channels)
    splice = sae_splice(sae)
    with torch.no_grad():
        per_token = sae(maps.permute(0, 2, 3, 1)).reconstruction.permute(0, 3, 1, 2)
        torch.testing.assert_close(splice(maps), per_token)
        torch.testing.assert_close(splice(sequence), sae(sequence).reconstruction)
    half = maps.half()
    assert splice(half).dtype == torch.float16
    keep = sae_splice(sae, keep_error=True)
    for activation in (maps, sequence, half):
        assert torch.equal(keep(activation), activation)
    # an edit of the codes, error kept: the edited reconstruction plus the same error
    drop_all = sae_splice(sae, keep_error=True, edit=lambda codes: codes * 0)
    with torch.no_grad():
        tokens = sequence.reshape(-1, 6)
        recon = sae(tokens).reconstruction
        empty = sae.decode(torch.zeros(len(tokens), sae.d_sae), reference=tokens)
    torch.testing.assert_close(drop_all(sequence).reshape(-1, 6), empty + (tokens - recon))
    with pytest.raises(SAEError, match="reads d_in 6 channels, but the activations have 4"):
        splice(torch.randn(1, 4, 2, 2))


def test_masked_ablation_is_saeurons_edit():
    sae = _sae()
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        codes = _direct_codes(sae, x)
    features = [int(i) for i in (codes > 0).sum(0).argsort(descending=True)[:2]]
    threshold = codes[:, features].mean(0)  # SAeUron: the features' mean activation
    scale = torch.tensor([-3.0, -5.0])
    edited = codes.clone()
    for j, f in enumerate(features):
        mask = codes[:, f] > threshold[j]
        edited[mask, f] = codes[mask, f] * scale[j]
    assert not torch.equal(edited, codes)
    with torch.no_grad():
        recon = codes @ sae.W_dec + sae.b_dec
        expected = (edited @ sae.W_dec + sae.b_dec) + (x - recon)
        got = masked_ablation(sae, x, features, scale, threshold)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        dropped = masked_ablation(sae, x, features, scale, threshold, keep_error=False)
        torch.testing.assert_close(dropped, edited @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-5)
        # maps in, maps out
        maps = x[:36].reshape(1, 6, 6, 6).permute(0, 3, 1, 2).contiguous()
        assert masked_ablation(sae, maps, features, -1.0).shape == maps.shape
    with pytest.raises(SAEError, match="3 scale values for 2 features"):
        masked_ablation(sae, x, features, [1.0, 2.0, 3.0])
    with pytest.raises(SAEError, match="feature 24 does not exist: the SAE has latents 0 to 23"):
        masked_ablation(sae, x, [24], -1.0)


def test_steering_adds_the_unit_decoder_row_at_every_token():
    sae = _sae()
    direction = decoder_direction(sae, 7)
    assert direction.shape == (6,) and float(direction.norm()) == pytest.approx(1.0)
    assert torch.equal(direction, sae.W_dec[7].detach())
    maps = torch.randn(2, 6, 3, 3)
    steered = sae_steer(sae, 7, strength=2.5)(maps)
    torch.testing.assert_close(
        steered - maps, (2.5 * direction)[None, :, None, None].expand_as(maps)
    )
    with pytest.raises(SAEError, match="feature -1 does not exist"):
        decoder_direction(sae, -1)
