"""Cache, for the weighting study of benchmarks/attribution_tiny_weighting.py, the maps of
every UNet cross-attention site of `tiny` under several token-weightings.

For N shapes-world captions (train split, seed 0) `tiny` generates one image each (seed i, its
default guidance 7.5, STEPS DDIM steps) under diffprobe.stages.attribution.attribute_prompt
(exactly as benchmarks/attribution_tiny_generate.py, same images). Beside the library's
capture, a forward pre-hook on each ``attn2`` recomputes the conditional half's attention
from the module's own projections (q = to_q(h), k = to_k(c), v = to_v(c), per head
softmax(q kᵀ/√d)), and keeps per text position t and image token i (all 16 positions):

- ``raw``: mean over heads of P_h[i, t] (must equal the library's map: checked);
- ``value_norm``: ‖Σ_h P_h[i, t] W_o,h v_h,t‖, the norm of token t's contribution to pixel
  i's output (Kobayashi et al. 2020, "Attention is not only a weight"; to_out's bias, shared
  by all tokens, left out);
- ``value_norm_heads``: Σ_h P_h[i, t] ‖W_o,h v_h,t‖ (the per-head version, summed);
- ``output_dot``: the image token's attention output (heads concatenated, before to_out)
  dotted with token t's value vector, Σ_h o_h,i · v_h,t (ConceptAttention's output-space
  score with the value as the token's representation; a UNet's text tokens have no outputs);
- ``output_dot_projected``: the same after to_out's weight, (W_o o_i) · (Σ_h W_o,h v_h,t).

Each site's maps are resized bilinearly to the finest grid (16 x 16), as the library does.
Also the text encoder's self-attention (every layer, mean over heads) of each prompt, for a
rollout through the causal encoder. Output: float16/float32 npz with meta JSON (no pickle).

    PYTHONPATH=src python benchmarks/attribution_tiny_weighting_generate.py --items 256 \
        --steps 10 --out benchmarks/out/attribution_tiny_weighting.npz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import diffprobe
from diffprobe.analysis import attribution as maths
from diffprobe.data import shapes
from diffprobe.stages.attribution import attribute_prompt

KINDS = ("raw", "value_norm", "value_norm_heads", "output_dot", "output_dot_projected")


def site_maps(module: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> dict:
    """Every weighting of one call of a cross-attention module, for batch row -1 (the
    conditional half under CFG): name -> (image tokens, text tokens) float64."""
    heads = module.heads
    h, c = hidden[-1].double(), context[-1].double()
    q, k, v = (
        torch.nn.functional.linear(
            x, layer.weight.double(), None if layer.bias is None else layer.bias.double()
        )
        for x, layer in ((h, module.to_q), (c, module.to_k), (c, module.to_v))
    )
    d = q.shape[-1] // heads
    q, k, v = (x.reshape(x.shape[0], heads, d).transpose(0, 1) for x in (q, k, v))
    probs = (q @ k.transpose(-1, -2) / d**0.5).softmax(-1)  # (heads, image, text)
    w_out = module.to_out[0].weight.double()  # (channels, heads * d)
    w_heads = w_out.reshape(w_out.shape[0], heads, d).permute(1, 0, 2)  # (heads, C, d)
    f = torch.einsum("hcd,htd->htc", w_heads, v)  # (heads, text, C): W_o,h v_h,t
    contribution = torch.einsum("hit,htc->itc", probs, f)  # (image, text, C)
    out_heads = probs @ v  # (heads, image, d)
    projected = torch.einsum("hcd,hid->ic", w_heads, out_heads)  # (image, C)
    return {
        "raw": probs.mean(0),
        "value_norm": contribution.norm(dim=-1),
        "value_norm_heads": torch.einsum("hit,ht->it", probs, f.norm(dim=-1)),
        "output_dot": torch.einsum("hid,htd->it", out_heads, v),
        "output_dot_projected": projected @ f.sum(0).T,
    }


def encoder_attention(model, prompt: str) -> np.ndarray:
    """(layers, 16, 16) self-attention of the text encoder on the prompt, mean over heads,
    from each layer's own q/k projections (causal mask)."""
    tokenizer, encoder = model.pipe.tokenizer, model.pipe.text_encoder
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    kept = []

    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)[0].double()
        heads = module.num_heads
        q = torch.nn.functional.linear(
            x, module.q_proj.weight.double(), module.q_proj.bias.double()
        )
        k = torch.nn.functional.linear(
            x, module.k_proj.weight.double(), module.k_proj.bias.double()
        )
        d = q.shape[-1] // heads
        q, k = (t.reshape(t.shape[0], heads, d).transpose(0, 1) for t in (q, k))
        logits = q @ k.transpose(-1, -2) / d**0.5
        causal = torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
        kept.append(logits.masked_fill(~causal, float("-inf")).softmax(-1).mean(0))

    handles = [
        layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
        for layer in encoder.encoder.layers
    ]
    try:
        with torch.no_grad():
            encoder(ids)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(kept).numpy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/out/attribution_tiny_weighting.npz")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = diffprobe.load("tiny")
    sample = shapes.sample(args.items, seed=0, split="train")
    sites = [s.site for s in type(model).attention_sites(model.pipe)]
    modules = {s: model.pipe.unet.get_submodule(s.removeprefix("unet.")) for s in sites}
    tokens_max = model.pipe.tokenizer.model_max_length
    store = {kind: None for kind in KINDS}
    images, pieces, specials, encoder_maps, parity = [], [], [], [], []
    started = time.perf_counter()
    for i in range(args.items):
        calls: dict[str, list[dict]] = {s: [] for s in sites}

        def make_hook(site, calls=calls):
            def hook(module, args_, kwargs):
                hidden = kwargs.get("hidden_states", args_[0] if args_ else None)
                context = kwargs["encoder_hidden_states"]
                with torch.no_grad():
                    calls[site].append(site_maps(module, hidden, context))

            return hook

        handles = [
            modules[s].register_forward_pre_hook(make_hook(s), with_kwargs=True) for s in sites
        ]
        try:
            result = attribute_prompt(model, sample.captions[i], seed=i, steps=args.steps)
        finally:
            for handle in handles:
                handle.remove()
        names = result.sites
        for kind in KINDS:
            per_site = []
            for s in names:
                stacked = torch.stack([c[kind] for c in calls[s]])  # (steps, image, text)
                grid = maths.token_grid(stacked.shape[1], *result.size)
                per_site.append(maths.to_grid(stacked.float(), grid))  # (steps, text, r, c)
            common, _ = maths.to_common_grid(per_site)  # (layers, steps, text, r, c)
            array = common.permute(2, 0, 1, 3, 4).numpy()
            if store[kind] is None:
                dtype = np.float16 if kind != "output_dot_projected" else np.float32
                store[kind] = np.zeros((args.items, *array.shape), dtype=dtype)
            store[kind][i] = array
        # the recomputation equals the library's capture (conditional half, mean over heads)
        positions = [t.position for t in result.tokens]
        parity.append(float(np.abs(store["raw"][i][positions] - result.maps).max()))
        images.append(result.image)
        pieces.append([t.piece for t in result.tokens])
        specials.append([t.special for t in result.tokens])
        encoder_maps.append(encoder_attention(model, sample.captions[i]))
        print(
            f"{i + 1}/{args.items} {sample.captions[i]!r} parity {parity[-1]:.1e}",
            file=sys.stderr,
            flush=True,
        )
    meta = {
        "items": args.items,
        "steps": args.steps,
        "guidance_scale": model.default_guidance_scale,
        "seconds": time.perf_counter() - started,
        "sites": names,
        "noise_levels": [float(p) for p in result.noise_levels],
        "captions": list(sample.captions),
        "pieces": pieces,
        "special": specials,
        "text_positions": tokens_max,
        "max_raw_parity_error": max(parity),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        **store,
        images=np.stack(images),
        encoder_attention=np.stack(encoder_maps).astype(np.float32),
        **{f"factor_{k}": np.asarray(v) for k, v in sample.factors.items()},
        meta=np.array(json.dumps(meta)),
    )


if __name__ == "__main__":
    main()
