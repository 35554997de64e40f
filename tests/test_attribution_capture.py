"""Attention probabilities captured by diffprobe equal softmax(QKᵀ/√d) recomputed by hand from
each attention module's own projections, on tiny random components of every family; the CFG
branch is the conditional half under CFG and the whole batch without it."""

from __future__ import annotations

import pytest
import torch

import diffprobe
from diffprobe.hooks.attention import AttentionSite, capture_attention
from diffprobe.testing.cases import dummy_cases

FAMILY_CASES = {c.name: c for c in dummy_cases() if c.name in ("sd", "sdxl", "sd3", "flux", "if")}


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads*d) -> (B, N, heads, d)."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1)


def _rope(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """FLUX's rotary embedding on (B, N, heads, d), written out: pairs (a, b) rotate by the
    angle whose cos/sin are given per position and channel."""
    cos, sin = (f[None, :, None, :].float() for f in freqs)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x.float() * cos + rotated * sin


def _softmax_text(q, k, image, text) -> torch.Tensor:
    """q (B, Nq, heads, d), k (B, Nk, heads, d) -> image queries' probabilities over all keys,
    text columns, mean over heads: (B, N image, N text)."""
    d = q.shape[-1]
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / d**0.5
    return logits.softmax(-1)[:, :, image][..., text].mean(1)


def _norm(module, name: str, x: torch.Tensor) -> torch.Tensor:
    norm = getattr(module, name, None)
    return x if norm is None else norm(x)


def recompute(site: AttentionSite, module, args, kwargs, text_length) -> torch.Tensor:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    heads = module.heads
    if site.kind == "cross":
        q, k = _heads(module.to_q(hidden), heads), _heads(module.to_k(context), heads)
        return _softmax_text(q, k, slice(None), slice(None))
    if site.kind == "added_kv":
        flat = hidden.reshape(hidden.shape[0], hidden.shape[1], -1).transpose(1, 2)
        if module.group_norm is not None:
            flat = module.group_norm(flat.transpose(1, 2)).transpose(1, 2)
        if module.norm_cross is not None:
            context = module.norm_encoder_hidden_states(context)
        q = _heads(module.to_q(flat), heads)
        k = torch.cat(
            [_heads(module.add_k_proj(context), heads), _heads(module.to_k(flat), heads)], 1
        )
        return _softmax_text(q, k, slice(None), slice(0, context.shape[1]))
    if site.kind == "joint":
        q = _norm(module, "norm_q", _heads(module.to_q(hidden), heads))
        k = _norm(module, "norm_k", _heads(module.to_k(hidden), heads))
        cq = _norm(module, "norm_added_q", _heads(module.add_q_proj(context), heads))
        ck = _norm(module, "norm_added_k", _heads(module.add_k_proj(context), heads))
        n_img, n_txt = hidden.shape[1], context.shape[1]
        if site.text_first:  # FLUX: [text, image], then RoPE over the whole sequence
            q, k = torch.cat([cq, q], 1), torch.cat([ck, k], 1)
            freqs = kwargs.get("image_rotary_emb")
            if freqs is not None:
                q, k = _rope(q, freqs), _rope(k, freqs)
            return _softmax_text(q, k, slice(n_txt, None), slice(0, n_txt))
        q, k = torch.cat([q, cq], 1), torch.cat([k, ck], 1)
        return _softmax_text(q, k, slice(0, n_img), slice(n_img, None))
    # single-stream: one [text, image] sequence
    q = _norm(module, "norm_q", _heads(module.to_q(hidden), heads))
    k = _norm(module, "norm_k", _heads(module.to_k(hidden), heads))
    freqs = kwargs.get("image_rotary_emb")
    if freqs is not None:
        q, k = _rope(q, freqs), _rope(k, freqs)
    return _softmax_text(q, k, slice(text_length, None), slice(0, text_length))


@pytest.mark.parametrize("name", sorted(FAMILY_CASES))
def test_probabilities_equal_an_independent_recomputation(name):
    case = FAMILY_CASES[name]
    torch.manual_seed(0)
    model = diffprobe.from_pipeline(case.build(0), name=f"dummy-{name}")
    sites = type(model).attention_sites(model.pipe)
    assert sites, f"{name} lists no attention sites"
    kinds = {s.kind for s in sites}
    expected_kinds = {"sd": {"cross"}, "sdxl": {"cross"}, "sd3": {"joint"},
                      "flux": {"joint", "single"}, "if": {"added_kv"}}[name]  # fmt: skip
    assert kinds == expected_kinds
    inputs: dict[str, tuple] = {}
    text_length = {}
    handles = []
    denoiser = model.denoiser

    def on_denoiser(module, args, kwargs):
        text_length.setdefault("n", kwargs["encoder_hidden_states"].shape[1])

    handles.append(denoiser.register_forward_pre_hook(on_denoiser, with_kwargs=True))
    for site in sites:
        module = model.module(site.site)

        def keep(module, args, kwargs, site=site):
            inputs.setdefault(site.site, (module, args, kwargs))

        handles.append(module.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad(), capture_attention(model, sites) as records:
            model.generate("a red circle", steps=1, guidance_scale=1.0, size=case.resolution)
        with torch.no_grad():
            for site in sites:
                first = next(r for r in records if r.site == site.site)
                assert first.branch == "none"
                module, args, kwargs = inputs[site.site]
                expected = recompute(site, module, args, kwargs, text_length["n"])
                assert first.probs.shape == expected.shape, site.site
                torch.testing.assert_close(
                    first.probs.double(), expected, atol=2e-5, rtol=1e-4, msg=site.site
                )
                # a distribution over all keys: text columns never sum above 1
                assert float(first.probs.sum(-1).max()) <= 1 + 1e-5
    finally:
        for handle in handles:
            handle.remove()
    # the wrapper is gone after the block
    assert torch.nn.functional.scaled_dot_product_attention.__module__ != __name__
    assert "diffprobe" not in torch.nn.functional.scaled_dot_product_attention.__module__


@pytest.mark.slow
def test_cfg_keeps_the_conditional_half_and_no_cfg_the_whole_batch(sd_model):
    """Under CFG the capture's "cond" record is the second half of the doubled batch; with
    guidance 1 (no CFG, e.g. Turbo) the batch is one branch, and DAAM's rule (drop the first
    half as "unconditional") would throw away the first prompt's real maps."""
    model = sd_model
    site = type(model).attention_sites(model.pipe)[0]
    prompts = ["a red circle", "a blue star"]
    with torch.no_grad(), capture_attention(model, [site]) as cfg_records:
        model.generate(prompts, steps=1, guidance_scale=5.0)
    branches = {r.branch for r in cfg_records}
    assert branches == {"uncond", "cond"}
    cond = next(r for r in cfg_records if r.branch == "cond").probs
    with torch.no_grad(), capture_attention(model, [site]) as plain:
        model.generate(prompts, steps=1, guidance_scale=1.0)
    (record,) = plain
    assert record.branch == "none" and record.probs.shape[0] == 2
    # the first denoiser call sees the same latents with and without CFG: the conditional half
    # under CFG equals the whole no-CFG batch
    torch.testing.assert_close(cond, record.probs, atol=1e-5, rtol=1e-4)
    # DAAM's drop-first-half on the no-CFG batch keeps one of two prompts: prompt 0 is lost
    daam = record.probs[record.probs.shape[0] // 2 :]
    assert daam.shape[0] == 1
    assert not torch.allclose(daam[0], record.probs[0], atol=1e-4)
    # the kept branches option gives the conditional maps in both cases
    with torch.no_grad(), capture_attention(model, [site], branches=("cond", "none")) as kept:
        model.generate(prompts, steps=1, guidance_scale=5.0)
    assert [r.branch for r in kept] == ["cond"]
