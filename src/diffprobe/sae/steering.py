"""Steering with SAE features, on the SAE alone (the edit engine applies the results at a
site; docs/sae.md).

- :func:`decoder_direction`: latent ``f``'s decoder row, the direction the thesis adds
  (``strength x W_dec[f]`` at every token, strength = scale x the feature's max activation);
- :func:`masked_ablation`: SAeUron's unlearning edit: encode, scale selected features on the
  tokens where they exceed a threshold (their mean activation), decode, add the error back;
- :func:`edit_codes`: any edit of the dense codes, with or without the SAE's error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from diffprobe.sae.model import SAEError, TopKSAE
from diffprobe.sae.sources import channels_of, to_tokens


def _features(sae: TopKSAE, features: int | Sequence[int] | Tensor) -> Tensor:
    chosen = torch.as_tensor(features, dtype=torch.long).reshape(-1)
    bad = chosen[(chosen < 0) | (chosen >= sae.d_sae)]
    if len(bad):
        raise SAEError(
            f"feature {int(bad[0])} does not exist: the SAE has latents 0 to {sae.d_sae - 1}"
        )
    return chosen


def decoder_direction(sae: TopKSAE, feature: int) -> Tensor:
    """The unit-norm decoder row of latent ``feature``, ``(d_in,)``, in the SAE's input space
    (for a ``layer_norm`` SAE a raw-space step of s is about s x the token's std)."""
    return sae.W_dec[int(_features(sae, feature)[0])].detach().clone()


def edit_codes(
    sae: TopKSAE,
    tokens: Tensor,
    edit: Callable[[Tensor], Tensor] | None = None,
    *,
    keep_error: bool = True,
) -> Tensor:
    """Token activations ``(tokens, d_in)`` -> the reconstruction from the codes after
    ``edit`` (a function from dense codes ``(tokens, d_sae)`` to edited codes), plus the SAE's
    error when ``keep_error``, computed as ``x + (x^_edited - x^)`` so that no edit gives the
    input exactly. Same dtype and device as ``tokens``."""
    x = tokens.to(sae.device)
    normalized, norm = sae.normalize(x)
    hidden = sae.hidden(normalized)
    if edit is None:
        if keep_error:
            return tokens.clone()
        recon = sae.denormalize(sae.decode_sparse(sae.select_topk(hidden)), norm)
        return recon.to(device=tokens.device, dtype=tokens.dtype)
    codes = sae.densify(sae.select_topk(hidden))
    edited = edit(codes.clone())
    if tuple(edited.shape) != tuple(codes.shape):
        raise SAEError(
            f"the edit returned codes of shape {tuple(edited.shape)}; it must keep "
            f"{tuple(codes.shape)} (tokens, d_sae)"
        )
    recon_edited = sae.denormalize(edited.to(sae.dtype) @ sae.W_dec + sae.b_dec, norm)
    if not keep_error:
        return recon_edited.to(device=tokens.device, dtype=tokens.dtype)
    recon = sae.denormalize(codes @ sae.W_dec + sae.b_dec, norm)
    out = x.to(recon.dtype) + (recon_edited - recon)
    return out.to(device=tokens.device, dtype=tokens.dtype)


def masked_ablation(
    sae: TopKSAE,
    activations: Tensor,
    features: int | Sequence[int] | Tensor,
    scale: float | Sequence[float] | Tensor,
    threshold: float | Sequence[float] | Tensor = 0.0,
    *,
    keep_error: bool = True,
) -> Tensor:
    """SAeUron's masked ablation as a pure function. ``activations`` are a site's
    ``(items, channels, height, width)`` maps, ``(items, tokens, channels)`` or ``(tokens,
    channels)``; on every token where the code of a selected feature exceeds its
    ``threshold`` (SAeUron: the feature's mean activation over all concepts), that code is
    multiplied by its ``scale`` (SAeUron: multiplier x the feature's mean activation on the
    target concept, multiplier -1 ... -30). ``scale`` and ``threshold`` are one value or one
    per feature. Returns activations of the same shape, with the SAE's error kept (the
    default) or dropped."""
    chosen = _features(sae, features)
    sae.check_d_in(channels_of(tuple(activations.shape)))
    scales = torch.as_tensor(scale, dtype=sae.dtype, device=sae.device).reshape(-1)
    limits = torch.as_tensor(threshold, dtype=sae.dtype, device=sae.device).reshape(-1)
    for name, values in (("scale", scales), ("threshold", limits)):
        if len(values) not in (1, len(chosen)):
            raise SAEError(
                f"{len(values)} {name} values for {len(chosen)} features; give one or one per "
                "feature"
            )
    index = chosen.to(sae.device)

    def ablate(codes: Tensor) -> Tensor:
        selected = codes[:, index]
        codes[:, index] = torch.where(selected > limits, selected * scales, selected)
        return codes

    tokens, back = to_tokens(activations)
    with torch.no_grad():
        return back(edit_codes(sae, tokens, ablate, keep_error=keep_error))


def sae_steer(sae: TopKSAE, feature: int, strength: float) -> Callable[[Tensor], Tensor]:
    """A replacement callable adding ``strength x`` latent ``feature``'s decoder row to every
    token of an ``(items, channels, height, width)`` or ``(items, tokens, channels)``
    activation (the thesis's SAE steering; strength = scale x the feature's max activation,
    scale 500 there)."""
    direction = decoder_direction(sae, feature)

    def steer(activation: Tensor) -> Tensor:
        sae.check_d_in(channels_of(tuple(activation.shape)))
        tokens, back = to_tokens(activation)
        step = (strength * direction).to(device=activation.device, dtype=activation.dtype)
        return back(tokens + step)

    return steer
