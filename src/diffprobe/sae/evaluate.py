"""How well an SAE reconstructs a site (``diffprobe sae eval``), and the replacement
callable that splices it into a denoiser.

Definitions (docs/sae.md), over N evaluated tokens ``x`` of the activations' own space:

- FVU = sum ||x - x^||^2 / sum ||x - mean(x)||^2 (sparsify's fraction of variance
  unexplained, with the mean of the evaluated tokens; per group with the group's mean);
- L0 = mean number of nonzero codes per token (at most k);
- dead fraction = share of latents that fired on none of the N tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffprobe.sae.model import TopKSAE
from diffprobe.sae.sources import as_source, channels_of, to_tokens


@dataclass
class GroupStats:
    """Running sums of one group of tokens (float64, so millions of tokens add up exactly
    enough)."""

    tokens: int = 0
    squared_error: float = 0.0
    sum: Tensor | None = None
    sum_squares: float = 0.0
    nonzero: int = 0

    def add(self, x: Tensor, error: Tensor, nonzero: Tensor) -> None:
        x64 = x.double()
        self.tokens += len(x)
        self.squared_error += float(error.double().pow(2).sum())
        total = x64.sum(0)
        self.sum = total if self.sum is None else self.sum + total
        self.sum_squares += float(x64.pow(2).sum())
        self.nonzero += int(nonzero)

    def fvu(self) -> float:
        if self.tokens == 0 or self.sum is None:
            return float("nan")
        variance = self.sum_squares - float(self.sum.pow(2).sum()) / self.tokens
        return self.squared_error / variance if variance > 0 else float("nan")

    def row(self) -> dict:
        return {
            "tokens": self.tokens,
            "fvu": self.fvu(),
            "l0": self.nonzero / self.tokens if self.tokens else float("nan"),
        }


@dataclass
class SAEEvaluation:
    """FVU, L0 and dead fraction over ``tokens`` tokens, overall and per group (timestep or
    noise key); ``frequency`` ``(d_sae,)`` is each latent's firing rate, ``max_activation``
    its largest code (the steering scale)."""

    tokens: int
    fvu: float
    l0: float
    dead_fraction: float
    groups: dict[str, dict] = field(default_factory=dict)
    frequency: np.ndarray | None = None
    max_activation: np.ndarray | None = None
    mean_activation: np.ndarray | None = None

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "fvu": self.fvu,
            "l0": self.l0,
            "dead_fraction": self.dead_fraction,
            "groups": self.groups,
        }


@torch.no_grad()
def evaluate_sae(
    sae: TopKSAE,
    activations: Any,
    *,
    tokens: int | None = None,
    batch_size: int = 4096,
    seed: int = 0,
    progress: bool = False,
) -> SAEEvaluation:
    """Evaluate ``sae`` on an activation source (an array ``(tokens, d_in)``, a run through
    :func:`~diffprobe.sae.sources.run_source`, an iterable of batches...). ``tokens`` limits
    the tokens read (blocks are taken in a seeded random order, so every group is sampled);
    None reads them all."""
    from tqdm.auto import tqdm

    source = as_source(activations)
    total = GroupStats()
    per_group: dict[int, GroupStats] = {}
    fired = torch.zeros(sae.d_sae, dtype=torch.long)
    largest = torch.zeros(sae.d_sae)
    summed = torch.zeros(sae.d_sae, dtype=torch.float64)
    bar = tqdm(total=tokens or source.n_tokens, disable=not progress, desc="sae eval",
               unit="tok", unit_scale=True, file=sys.stderr)  # fmt: skip
    seen = 0
    for block, tags in source.blocks(0, seed, shuffle=tokens is not None):
        if tokens is not None and seen >= tokens:
            break
        if tokens is not None:
            block = block[: tokens - seen]
            tags = None if tags is None else tags[: len(block)]
        if seen == 0:
            sae.check_d_in(block.shape[1])
        for start in range(0, len(block), batch_size):
            x = block[start : start + batch_size].to(sae.device)
            out = sae(x)
            values, indices = out.codes
            error = (x - out.reconstruction).cpu()
            active = (values > 0).cpu()
            flat_idx, flat_val = indices.cpu()[active], values.cpu()[active]
            fired += torch.bincount(flat_idx, minlength=sae.d_sae)
            largest = torch.maximum(
                largest, torch.zeros(sae.d_sae).scatter_reduce_(0, flat_idx, flat_val, "amax")
            )
            summed.index_add_(0, flat_idx, flat_val.double())
            x_cpu = x.cpu()
            total.add(x_cpu, error, active.sum())
            if tags is not None:
                part = tags[start : start + batch_size]
                for g in part.unique().tolist():
                    chosen = part == g
                    per_group.setdefault(g, GroupStats()).add(
                        x_cpu[chosen], error[chosen], active[chosen].sum()
                    )
        seen += len(block)
        bar.update(len(block))
    bar.close()
    names = source.groups
    groups = {names[g] if g < len(names) else str(g): per_group[g].row() for g in sorted(per_group)}
    n = max(total.tokens, 1)
    return SAEEvaluation(
        tokens=total.tokens,
        fvu=total.fvu(),
        l0=total.nonzero / n,
        dead_fraction=float((fired == 0).float().mean()),
        groups=groups,
        frequency=(fired.double() / n).numpy(),
        max_activation=largest.numpy(),
        mean_activation=(summed / n).numpy(),
    )


def sae_splice(
    sae: TopKSAE,
    keep_error: bool = False,
    edit: Callable[[Tensor], Tensor] | None = None,
) -> Callable[[Tensor], Tensor]:
    """The replacement of a site's activation by the SAE, for the edit engine: a function
    from the activation ``(items, channels, height, width)`` or ``(items, tokens, channels)``
    (or ``(tokens, channels)``) to an activation of the same shape and dtype.

    Without ``keep_error`` it returns the reconstruction x^ (of the codes after ``edit``, a
    function from dense codes ``(tokens, d_sae)`` to edited codes). With ``keep_error`` it
    returns the edited reconstruction plus the SAE's error, computed as ``x + (x^_edited -
    x^)``: with no edit exactly the input, bit for bit."""
    from diffprobe.sae.steering import edit_codes

    def replace(activation: Tensor) -> Tensor:
        sae.check_d_in(channels_of(tuple(activation.shape)))
        tokens, back = to_tokens(activation)
        with torch.no_grad():
            out = edit_codes(sae, tokens, edit, keep_error=keep_error)
        return back(out)

    return replace
