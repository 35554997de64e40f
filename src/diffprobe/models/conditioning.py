"""What a family's ``encode_prompt`` and ``encode_text`` return: the denoiser's keyword arguments
per CFG branch, and every text-encoder layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffprobe.errors import DiffprobeError


@dataclass
class Conditioning:
    """Denoiser keyword arguments for the conditional branch and, for CFG, the unconditional.

    ``cond`` and ``uncond`` map denoiser keyword names (``encoder_hidden_states``,
    ``pooled_projections``, ``added_cond_kwargs`` ...) to tensors with items on axis 0.
    """

    cond: dict[str, Any]
    uncond: dict[str, Any] | None = None
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: slice | Sequence[int] | torch.Tensor) -> Conditioning:
        """The conditioning of a subset of items."""
        return Conditioning(
            _select(self.cond, index),
            None if self.uncond is None else _select(self.uncond, index),
            [self.prompts[i] for i in _as_indices(index, len(self.prompts))],
        )


def negative_prompts(
    prompts: Sequence[str], negative: Sequence[str] | str | None
) -> list[str] | None:
    """One negative prompt per prompt (a single string is repeated), or None for no CFG."""
    if negative is None:
        return None
    if isinstance(negative, str):
        return [negative] * len(prompts)
    negative = list(negative)
    if len(negative) != len(prompts):
        raise DiffprobeError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
    return negative


def _as_indices(index: slice | Sequence[int] | torch.Tensor, length: int) -> list[int]:
    if isinstance(index, slice):
        return list(range(length))[index]
    return [int(i) for i in index]


def _select(tree: Any, index: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _select(v, index) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor) and tree.dim() > 0:
        return tree[index] if isinstance(index, slice) else tree[torch.as_tensor(index)]
    return tree


def _concat(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: _concat(a[k], b[k]) for k in a}
    if isinstance(a, torch.Tensor) and a.dim() > 0:
        return torch.cat([a, b])
    return a


@dataclass
class TextEncoding:
    """Every layer of every text encoder for a batch of prompts.

    ``hidden_states[encoder]`` is a tuple (embeddings output, layer 1, ..., layer L), each
    (items, tokens, width), as returned with ``output_hidden_states=True``.
    """

    hidden_states: dict[str, tuple[torch.Tensor, ...]]
    input_ids: dict[str, torch.Tensor]
    attention_mask: dict[str, torch.Tensor | None]
