"""Weighting ``rollout``: attention rollout by hand, the text encoder's rollout against an
independent recomputation from its own q/k projections, rollout word maps against an
independent sum, and the refusals (a mixed-encoder family, an unknown weighting)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe.analysis import attribution as maths
from diffprobe.errors import DiffprobeError
from diffprobe.stages.attribution import (
    AttributionError,
    attribute_prompt,
    encoder_rollout,
    prompt_tokens,
)
from diffprobe.testing.cases import dummy_cases

PROMPT = "a large red circle in the top left"


@pytest.fixture(scope="module")
def tiny():
    return diffprobe.load("tiny")


def test_attention_rollout_by_hand():
    # one layer in which every position reads only token 0: R = 0.5 * (all from 0) + 0.5 * I
    copy = np.zeros((1, 3, 3))
    copy[0, :, 0] = 1.0
    expected = np.array([[1.0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5]])
    np.testing.assert_allclose(maths.attention_rollout(copy), expected)
    # two layers compose in order (R = Ã2 Ã1), rows sum to 1
    rng = np.random.default_rng(0)
    layers = rng.random((2, 4, 4))
    layers /= layers.sum(-1, keepdims=True)
    mixed = [0.5 * a + 0.5 * np.eye(4) for a in layers]
    np.testing.assert_allclose(maths.attention_rollout(layers), mixed[1] @ mixed[0])
    np.testing.assert_allclose(maths.attention_rollout(layers).sum(-1), 1.0)
    with pytest.raises(DiffprobeError, match=r"\(layers, tokens, tokens\)"):
        maths.attention_rollout(np.zeros((3, 4)))


def test_rollout_maps_collect_the_positions_that_read_a_token():
    # position 1 carries token 0 (its row of R puts weight on 0): token 0's map gains it
    maps = np.zeros((2, 2, 2))
    maps[0, 0, 0] = 1.0  # position 0 lights up pixel (0, 0)
    maps[1, 1, 1] = 1.0  # position 1 lights up pixel (1, 1)
    rollout = np.array([[1.0, 0.0], [0.25, 0.75]])
    out = maths.rollout_maps(maps, rollout)
    np.testing.assert_allclose(out[0], [[1.0, 0.0], [0.0, 0.25]])
    np.testing.assert_allclose(out[1], [[0.0, 0.0], [0.0, 0.75]])
    with pytest.raises(DiffprobeError, match="rollout over 3 positions"):
        maths.rollout_maps(maps, np.eye(3))
    with pytest.raises(DiffprobeError, match="weighting 'norms'"):
        maths.check_weighting("norms")


def test_word_share_divides_by_the_words_only():
    maps = np.array([[[4.0, 0.0]], [[1.0, 3.0]], [[3.0, 1.0]], [[2.0, 2.0]]])  # (4, 1, 2)
    words = [False, True, True, False]  # start, two words, end
    share = maths.word_share(maps, words)
    np.testing.assert_allclose(share[1], [[0.25, 0.75]])
    np.testing.assert_allclose(share[2], [[0.75, 0.25]])
    np.testing.assert_allclose(share[0], [[1.0, 0.0]])  # start: divided by the words' sum too
    np.testing.assert_allclose(share[1] + share[2], 1.0)
    with pytest.raises(DiffprobeError, match="at least one word"):
        maths.word_share(maps, [True, False, False, False, True])


def _independent_rollout(model, prompt: str) -> np.ndarray:
    """softmax(q kᵀ/√d + causal mask) from each CLIP layer's own projections, mean over
    heads, 0.5 A + 0.5 I renormalised, multiplied layer by layer (a loop, float64)."""
    tokenizer, encoder = model.pipe.tokenizer, model.pipe.text_encoder
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids  # fmt: skip
    inputs = []
    handles = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, args, kwargs: inputs.append((m, kwargs.get("hidden_states", args[0] if args else None))),
            with_kwargs=True,
        )
        for layer in encoder.encoder.layers
    ]  # fmt: skip
    try:
        with torch.no_grad():
            encoder(ids)
    finally:
        for handle in handles:
            handle.remove()
    size = ids.shape[1]
    rollout = np.eye(size)
    for module, hidden in inputs:
        x = hidden[0].detach().double()
        q = x @ module.q_proj.weight.detach().double().T + module.q_proj.bias.detach().double()
        k = x @ module.k_proj.weight.detach().double().T + module.k_proj.bias.detach().double()
        heads = module.num_heads
        d = q.shape[-1] // heads
        probs = np.zeros((size, size))
        for h in range(heads):
            logits = (q[:, h * d : (h + 1) * d] @ k[:, h * d : (h + 1) * d].T / d**0.5).numpy()
            logits[np.triu_indices(size, 1)] = -np.inf
            e = np.exp(logits - logits.max(-1, keepdims=True))
            probs += e / e.sum(-1, keepdims=True) / heads
        step = 0.5 * probs + 0.5 * np.eye(size)
        rollout = (step / step.sum(-1, keepdims=True)) @ rollout
    count = len(prompt_tokens(model, prompt))
    return rollout[:count, :count]


def test_encoder_rollout_equals_an_independent_recomputation(tiny):
    got = encoder_rollout(tiny, PROMPT)
    assert got.shape == (10, 10)  # start, 8 words, end
    np.testing.assert_allclose(got, _independent_rollout(tiny, PROMPT), atol=1e-6)
    assert np.allclose(np.triu(got, 1), 0.0)  # CLIP is causal: no position reads a later one
    # the encoder's attention implementation is restored
    assert tiny.pipe.text_encoder.config._attn_implementation == "sdpa"


def test_rollout_word_maps_equal_an_independent_sum(tiny):
    result = attribute_prompt(tiny, PROMPT, steps=2, weighting="rollout")
    assert result.rollout.shape == (len(result.tokens),) * 2
    np.testing.assert_allclose(result.rollout, _independent_rollout(tiny, PROMPT), atol=1e-6)
    plain = result.token_maps()
    rolled = result.token_maps(weighting="rollout")
    circle = result.positions("circle", tiny)[0]
    by_hand = sum(result.rollout[j, circle] * plain[j] for j in range(len(result.tokens)))
    np.testing.assert_allclose(rolled[circle], by_hand, rtol=1e-5, atol=1e-8)
    # causal: no later prompt position reads the end token, so its map is its own, scaled
    end = len(result.tokens) - 1
    np.testing.assert_allclose(rolled[end], result.rollout[end, end] * plain[end], rtol=1e-5)
    # and the shape word's map gains the later positions': it differs from its own, scaled
    assert not np.allclose(rolled[circle], result.rollout[circle, circle] * plain[circle])
    assert result.word_map("circle", tiny, weighting="rollout").shape == (64, 64)
    # rollout-words: each pixel's share of the rollout maps over the word tokens (a loop)
    shared = result.token_maps(weighting="rollout-words")
    words = [i for i, t in enumerate(result.tokens) if not t.special]
    assert words == list(range(1, len(result.tokens) - 1))
    total = sum(rolled[i] for i in words)
    for i in range(len(result.tokens)):
        np.testing.assert_allclose(shared[i], rolled[i] / total, rtol=1e-5)
    # a result made without the rollout says how to get it
    with pytest.raises(AttributionError, match="attribute with weighting='rollout'"):
        attribute_prompt(tiny, PROMPT, steps=1).token_maps(weighting="rollout")


def test_rollout_is_refused_where_positions_mix_encoders():
    case = next(c for c in dummy_cases("sdxl") if c.name == "sdxl")
    model = diffprobe.from_pipeline(case.build(0), name="dummy-sdxl")
    with pytest.raises(AttributionError, match="one text encoder.*text_encoder, text_encoder_2"):
        attribute_prompt(model, "a red circle", steps=1, weighting="rollout")


@pytest.mark.slow
def test_cli_weighting_rollout(tmp_path, capsys):
    from diffprobe.cli import main

    out = tmp_path / "attr"
    code = main(["attribution", "--model", "tiny", "--prompt", PROMPT, "--words", "circle",
                 "--steps", "2", "--weighting", "rollout", "--out", str(out), "--quiet"])  # fmt: skip
    assert code in (0, None)
    summary = json.loads((out / "attribution.json").read_text())
    assert summary["weighting"] == "rollout" and "rollout" in summary["choices"]["weighting"]
    assert (out / "000" / "circle.heat_map.png").is_file()
    with pytest.raises(SystemExit) as stopped:
        main(["attribution", "--model", "tiny", "--prompt", PROMPT, "--weighting", "norms",
              "--out", str(tmp_path / "bad"), "--quiet"])  # fmt: skip
    assert stopped.value.code == 2
    assert "weighting 'norms'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- value space


def test_cross_value_scores_equal_an_independent_recomputation():
    """(W_o o_i) · (W_o v_t) at every SD cross-attention site, first call, guidance off
    (the whole batch), against softmax(q kᵀ/√d) v written out per head from the module's own
    to_q/to_k/to_v/to_out weights."""
    from diffprobe.hooks.attention import capture_attention

    case = next(c for c in dummy_cases("sd") if c.name == "sd")
    torch.manual_seed(0)
    model = diffprobe.from_pipeline(case.build(0), name="dummy-sd")
    sites = type(model).attention_sites(model.pipe)
    inputs = {}

    def keep(module, args, kwargs, site):
        inputs.setdefault(site, (module, args, kwargs))

    handles = [
        model.module(s.site).register_forward_pre_hook(
            lambda m, a, k, s=s: keep(m, a, k, s.site), with_kwargs=True
        )
        for s in sites
    ]
    try:
        with torch.no_grad(), capture_attention(model, sites, outputs=True) as records:
            model.generate("a red circle", steps=1, guidance_scale=1.0, size=case.resolution)
    finally:
        for handle in handles:
            handle.remove()
    for site in sites:
        first = next(r for r in records if r.site == site.site)
        module, args, kwargs = inputs[site.site]
        hidden = (kwargs.get("hidden_states", args[0] if args else None)).double()
        context = kwargs["encoder_hidden_states"].double()
        heads, weight = module.heads, module.to_out[0].weight.double()
        q = hidden @ module.to_q.weight.double().T
        k = context @ module.to_k.weight.double().T
        v = context @ module.to_v.weight.double().T
        d = q.shape[-1] // heads
        out = torch.zeros_like(q)
        for h in range(heads):
            part = slice(h * d, (h + 1) * d)
            probs = (q[..., part] @ k[..., part].transpose(1, 2) / d**0.5).softmax(-1)
            out[..., part] = probs @ v[..., part]
        expected = (out @ weight.T) @ (v @ weight.T).transpose(1, 2)
        assert first.outputs is not None and first.outputs.shape == expected.shape
        torch.testing.assert_close(first.outputs.double(), expected, atol=1e-4, rtol=1e-3)


def test_output_rollout_words_use_the_value_scores(tiny):
    result = attribute_prompt(tiny, PROMPT, steps=2, weighting="output-rollout-words")
    assert result.outputs is not None and result.output_sites == result.sites
    scores = result.outputs[:, result.select()[0]].mean(axis=(1, 2))  # default layers
    rolled = np.einsum("jt,j...->t...", result.rollout, scores)
    rolled = np.clip(rolled, 0, None)
    words = [not t.special for t in result.tokens]
    expected = rolled / rolled[words].sum(0)
    np.testing.assert_allclose(
        result.token_maps(weighting="output-rollout-words"), expected, rtol=1e-5, atol=1e-9
    )
    # the probabilities' weighting on the same result differs (another map)
    assert not np.allclose(result.token_maps(weighting="rollout-words"), expected)
    with pytest.raises(AttributionError, match="value-space scores at every site"):
        attribute_prompt(tiny, PROMPT, steps=1).token_maps(weighting="output-rollout-words")


def test_output_weighting_is_refused_without_cross_attention():
    case = next(c for c in dummy_cases("flux") if c.name == "flux")
    model = diffprobe.from_pipeline(case.build(0), name="dummy-flux")
    with pytest.raises(AttributionError, match="value-space scores of cross-attention"):
        attribute_prompt(model, "a red circle", steps=1, weighting="output-rollout-words")
