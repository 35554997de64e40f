"""Which attention modules of a denoiser attend from image tokens to text tokens.

Each adapter's :meth:`~diffprobe.models.Model.attention_sites` calls one of these on its
denoiser; the family facts (which modules, which kind, the token order) are stated there.
"""

from __future__ import annotations

import re

from torch import nn

from diffprobe.hooks.attention import AttentionSite


def cross_attention_sites(denoiser: nn.Module, component: str) -> list[AttentionSite]:
    """UNet cross-attention: every ``attn2`` that attends to ``encoder_hidden_states``."""
    return [
        AttentionSite(f"{component}.{name}", "cross")
        for name, module in denoiser.named_modules()
        if name.endswith("attn2") and getattr(module, "is_cross_attention", False)
    ]


def added_kv_sites(denoiser: nn.Module, component: str) -> list[AttentionSite]:
    """UNets whose attention concatenates projected text keys before the image keys (IF)."""
    return [
        AttentionSite(f"{component}.{name}", "added_kv", text_first=True)
        for name, module in denoiser.named_modules()
        if getattr(module, "added_kv_proj_dim", None) and hasattr(module, "processor")
    ]


def pattern_sites(
    denoiser: nn.Module, component: str, pattern: str, kind: str, text_first: bool
) -> list[AttentionSite]:
    """Modules whose dotted name matches ``pattern`` (a full-match regular expression)."""
    compiled = re.compile(pattern)
    return [
        AttentionSite(f"{component}.{name}", kind, text_first)
        for name, _module in denoiser.named_modules()
        if compiled.fullmatch(name)
    ]
