"""The three SAE layouts: checkpoints built by hand with each project's tensor names and config
keys load into one TopKSAE whose encode/decode equal a direct computation from the raw tensors
with that project's semantics (b_dec before the encoder, normalisation); bad files fail with one
clear line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from diffprobe.sae import SAEError, SAEFormatError, TopKSAE, load_sae, save_sae

D_IN, D_SAE, K = 8, 32, 3


def _raw(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(D_SAE, D_IN, generator=g)
    return {
        "encoder": torch.randn(D_SAE, D_IN, generator=g),  # (latents, d_in)
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "W_dec": W_dec / W_dec.norm(dim=1, keepdim=True),
        "b_dec": torch.randn(D_IN, generator=g),  # nonzero: its use before encoding is tested
    }


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(5, 7, D_IN, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def _topk_relu(hidden: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = hidden.topk(k, dim=-1)
    return torch.zeros_like(hidden).scatter_(-1, indices, values.relu())


def _assert_matches(sae: TopKSAE, x, codes, reconstruction) -> None:
    torch.testing.assert_close(sae.encode(x), codes, rtol=1e-5, atol=1e-5)
    out = sae(x)
    torch.testing.assert_close(out.reconstruction, reconstruction, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(codes, reference=x), reconstruction, rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    torch.testing.assert_close(sae.decode_sparse(sae.encode_sparse(x), reference=x),
                               reconstruction, rtol=1e-5, atol=1e-5)  # fmt: skip


# ----------------------------------------------------------------------------------- SAELens


def _write_saelens(folder, raw, **cfg_extra):
    folder.mkdir(parents=True)
    cfg = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": K, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"model_name": "runwayml/stable-diffusion-v1-5",
                        "hook_name": "unet.mid_block"}, **cfg_extra}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({"W_enc": raw["encoder"].T.contiguous(), "W_dec": raw["W_dec"],
               "b_enc": raw["b_enc"], "b_dec": raw["b_dec"]},
              folder / "sae_weights.safetensors")  # fmt: skip


def _saelens_direct(raw, x, *, apply_b_dec=True, layer_norm=False, rescale=False):
    """SAELens TopKSAE.encode/decode (sae_lens/saes/topk_sae.py, saes/sae.py)."""
    mu = std = None
    if layer_norm:
        mu = x.mean(-1, keepdim=True)
        centred = x - mu
        std = centred.std(-1, keepdim=True)
        x = centred / (std + 1e-5)
    sae_in = x - raw["b_dec"] * apply_b_dec
    hidden = sae_in @ raw["encoder"].T + raw["b_enc"]
    norms = raw["W_dec"].norm(dim=-1)
    if rescale:
        hidden = hidden * norms
    acts = _topk_relu(hidden, K)
    out = (acts / norms if rescale else acts) @ raw["W_dec"] + raw["b_dec"]
    if layer_norm:
        out = out * std + mu
    return acts, out


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_saelens_layout_matches_its_maths(tmp_path, apply_b_dec, normalize):
    raw = _raw()
    _write_saelens(tmp_path / "sae", raw, apply_b_dec_to_input=apply_b_dec,
                   normalize_activations=normalize)  # fmt: skip
    sae = load_sae(tmp_path / "sae")
    assert sae.source["layout"] == "saelens"
    assert sae.metadata["site"] == "unet.mid_block"
    x = _inputs()
    codes, recon = _saelens_direct(raw, x, apply_b_dec=apply_b_dec,
                                   layer_norm=normalize == "layer_norm")  # fmt: skip
    _assert_matches(sae, x, codes, recon)


def test_saelens_decoder_norm_rescaling_is_folded_exactly(tmp_path):
    raw = _raw()
    raw["W_dec"] = raw["W_dec"] * torch.linspace(0.5, 2.0, D_SAE)[:, None]  # not unit norm
    _write_saelens(tmp_path / "sae", raw, rescale_acts_by_decoder_norm=True)
    sae = load_sae(tmp_path / "sae")
    x = _inputs()
    codes, recon = _saelens_direct(raw, x, rescale=True)
    _assert_matches(sae, x, codes, recon)


def test_save_then_load_round_trips_weights_and_metadata(tmp_path):
    sae = TopKSAE(D_IN, D_SAE, K, normalization="layer_norm", seed=3,
                  metadata={"model_name": "tiny", "site": "unet.up_blocks.1", "branch": "cond",
                            "timesteps": [999, 500], "scheduler": "PNDMScheduler",
                            "site_semantics": "output"})  # fmt: skip
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    sae.feature_stats["mean"] = torch.rand(D_SAE)
    save_sae(sae, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["normalize_activations"] == "layer_norm"
    assert cfg["metadata"]["hook_name"] == "unet.up_blocks.1"
    assert cfg["metadata"]["timesteps"] == [999, 500]
    back = load_sae(tmp_path / "out")
    for name, param in sae.named_parameters():
        assert torch.equal(param, getattr(back, name)), name
    assert torch.equal(back.feature_stats["mean"], sae.feature_stats["mean"])
    x = _inputs()
    assert torch.equal(back(x).reconstruction, sae(x).reconstruction)
    assert oct((tmp_path / "out" / "sae_weights.safetensors").stat().st_mode & 0o777) == "0o644"


# --------------------------------------------------------------------------- sparsify/SAeUron


def _write_sparsify(folder, raw, **cfg_extra):
    folder.mkdir(parents=True)
    cfg = {"expansion_factor": D_SAE // D_IN, "normalize_decoder": True, "num_latents": 0,
           "k": K, "multi_topk": False, "batch_topk": True, "sample_topk": False,
           "input_unit_norm": False, "d_in": D_IN, **cfg_extra}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({"encoder.weight": raw["encoder"], "encoder.bias": raw["b_enc"],
               "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]},
              folder / "sae.safetensors")  # fmt: skip


def _saeuron_direct(raw, x, input_unit_norm):
    """SAeUron Sae.forward with per-token TopK (SAE/sae.py: preprocess_input, pre_acts,
    select_topk, decode, postprocess_output)."""
    mean = std = None
    if input_unit_norm:
        mean = x.mean(-1, keepdim=True)
        x = x - mean
        std = x.std(-1, keepdim=True)
        x = x / (std + 1e-5)
    pre = torch.relu((x - raw["b_dec"]) @ raw["encoder"].T + raw["b_enc"])
    acts = _topk_relu(pre, K)
    out = acts @ raw["W_dec"] + raw["b_dec"]
    if input_unit_norm:
        out = out * std + mean
    return acts, out


@pytest.mark.parametrize("input_unit_norm", [False, True])
def test_sparsify_saeuron_layout_matches_its_maths(tmp_path, input_unit_norm):
    raw = _raw()
    # SAeUron's hub layout: one folder per hookpoint
    _write_sparsify(tmp_path / "hub" / "unet.up_blocks.1.attentions.1", raw,
                    input_unit_norm=input_unit_norm)  # fmt: skip
    sae = load_sae(tmp_path / "hub")  # the only hookpoint is found
    assert sae.source["layout"] == "sparsify"
    assert sae.metadata["site"] == "unet.up_blocks.1.attentions.1"
    assert sae.normalization == ("layer_norm" if input_unit_norm else "none")
    # batch_topk is a training mode: inference is per token, and b_dec is always subtracted
    # (normalize_decoder True: SAELens's converter would set apply_b_dec_to_input False)
    assert sae.apply_b_dec_to_input
    x = _inputs()
    _assert_matches(sae, x, *_saeuron_direct(raw, x, input_unit_norm))


def test_sparsify_folder_of_several_hookpoints_needs_one(tmp_path):
    for name in ("unet.up_blocks.1.attentions.1", "unet.up_blocks.1.attentions.2"):
        _write_sparsify(tmp_path / "hub" / name, _raw())
    with pytest.raises(SAEFormatError, match="holds 2 SAEs.*hookpoint"):
        load_sae(tmp_path / "hub")
    sae = load_sae(tmp_path / "hub", hookpoint="unet.up_blocks.1.attentions.2")
    assert sae.metadata["site"] == "unet.up_blocks.1.attentions.2"
    with pytest.raises(SAEFormatError, match="no hookpoint folder 'unet.mid'"):
        load_sae(tmp_path / "hub", hookpoint="unet.mid")


# ------------------------------------------------------------------------- openai/sdxl-unbox


def _write_openai(folder, raw, nested=True):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"n_dirs_local": D_SAE, "d_model": D_IN, "k": K, "auxk": 16,
         "dead_steps_threshold": 256}))  # fmt: skip
    state = {"pre_bias": raw["b_dec"], "latent_bias": raw["b_enc"],
             "encoder.weight": raw["encoder"], "decoder.weight": raw["W_dec"].T.contiguous(),
             "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long)}  # fmt: skip
    torch.save({"state_dict": state} if nested else state, folder / "state_dict.pth")
    torch.save(torch.rand(D_SAE), folder / "mean.pt")
    torch.save(torch.rand(D_SAE), folder / "std.pt")


def _openai_direct(raw, x):
    """sdxl-unbox SparseAutoencoder.encode / decode_sparse (SAE/sae.py)."""
    pre = (x - raw["b_dec"]) @ raw["encoder"].T + raw["b_enc"]
    latents = _topk_relu(pre, K)
    return latents, latents @ raw["W_dec"] + raw["b_dec"]


@pytest.mark.parametrize("nested", [True, False])
def test_openai_sdxl_unbox_layout_matches_its_maths(tmp_path, nested):
    raw = _raw()
    folder = tmp_path / "unet.down_blocks.2.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001"
    _write_openai(folder / "final", raw, nested=nested)
    sae = load_sae(folder / "final" / "state_dict.pth")  # a file in the folder works too
    assert sae.source["layout"] == "openai"
    assert sae.metadata == {"site": "unet.down_blocks.2.attentions.1",
                            "hook_name": "unet.down_blocks.2.attentions.1",
                            "site_semantics": "delta"}  # fmt: skip
    assert torch.equal(sae.feature_stats["mean"], torch.load(folder / "final" / "mean.pt"))
    x = _inputs()
    _assert_matches(sae, x, *_openai_direct(raw, x))


def test_layout_override_and_detection_disagree_clearly(tmp_path):
    _write_openai(tmp_path / "o", _raw())
    with pytest.raises(
        SAEFormatError, match=r"not in the sparsify layout: .* \(it holds the openai"
    ):
        load_sae(tmp_path / "o", layout="sparsify")
    with pytest.raises(SAEFormatError, match="unknown SAE layout 'saelen'; did you mean 'saelens'"):
        load_sae(tmp_path / "o", layout="saelen")


# ---------------------------------------------------------------------------------- bad input


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_unknown_layout_is_one_line(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(SAEFormatError) as err:
        load_sae(tmp_path / "x")
    assert "holds no SAE in a layout diffprobe reads" in _one_line(err)


def test_corrupt_safetensors_is_one_line(tmp_path):
    _write_saelens(tmp_path / "sae", _raw())
    path = tmp_path / "sae" / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(SAEFormatError) as err:
        load_sae(tmp_path / "sae")
    assert "is not a readable safetensors file" in _one_line(err)
    assert str(path) in _one_line(err)


def test_k_larger_than_d_sae_is_one_line(tmp_path):
    _write_saelens(tmp_path / "sae", _raw(), k=D_SAE + 1)
    with pytest.raises(SAEFormatError) as err:
        load_sae(tmp_path / "sae")
    assert f"k {D_SAE + 1} must be between 1 and d_sae {D_SAE}" in _one_line(err)
    with pytest.raises(SAEError, match="k 40 is larger than d_sae 32"):
        TopKSAE(D_IN, D_SAE, 40)


def test_d_in_that_does_not_match_the_site_is_one_line(tmp_path):
    _write_sparsify(tmp_path / "unet.mid_block", _raw())
    sae = load_sae(tmp_path / "unet.mid_block")
    sae.check_d_in(D_IN, "unet.mid_block")  # the right width passes
    with pytest.raises(SAEError) as err:
        sae.check_d_in(1280, "unet.up_blocks.1.attentions.1")
    text = _one_line(err)
    assert "reads d_in 8 channels, but site 'unet.up_blocks.1.attentions.1' has 1280" in text
    assert "trained on 'unet.mid_block'" in text


def test_weights_that_disagree_with_the_config_are_one_line(tmp_path):
    raw = _raw()
    _write_saelens(tmp_path / "sae", raw, d_sae=D_SAE * 2)
    with pytest.raises(SAEFormatError) as err:
        load_sae(tmp_path / "sae")
    assert "tensor 'W_enc' has shape [8, 32], but the config gives [8, 64]" in _one_line(err)


_RAN: list[str] = []


def _record_run() -> dict:
    _RAN.append("unpickled")
    return {}


class _Payload:
    """Unpickling this calls _record_run: a stand-in for code hidden in a .pth file."""

    def __reduce__(self):
        return (_record_run, ())


def test_pickled_objects_in_state_dict_are_refused_not_run(tmp_path):
    _write_openai(tmp_path / "o", _raw())
    torch.save({"state_dict": _Payload()}, tmp_path / "o" / "state_dict.pth")
    with pytest.raises(SAEFormatError) as err:
        load_sae(tmp_path / "o")
    assert "weights_only" in _one_line(err)
    assert _RAN == []


def test_other_architectures_are_refused(tmp_path):
    _write_saelens(tmp_path / "sae", _raw(), architecture="jumprelu")
    with pytest.raises(SAEFormatError, match="architecture 'jumprelu'; diffprobe reads TopK"):
        load_sae(tmp_path / "sae")
    _write_sparsify(tmp_path / "t", _raw(), transcode=True)
    with pytest.raises(SAEFormatError, match="transcoder"):
        load_sae(tmp_path / "t")
