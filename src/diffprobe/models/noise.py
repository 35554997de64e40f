"""Per-item seeded noise (see docs/noise.md): results do not depend on batch size, shard count
or order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffprobe.errors import DiffprobeError


class SeedError(DiffprobeError, ValueError):
    """A negative seed or item index."""


def item_seed(seed: int, item: int) -> int:
    """The generator seed of item ``item`` under run seed ``seed`` (documented, stable).

    A 32-bit hash of ``(seed, item)`` by numpy's ``SeedSequence``: torch's CPU generator uses
    only the low 32 bits of its seed, so ``seed * 2**32 + item`` would ignore ``seed``.
    """
    if seed < 0 or item < 0:
        raise SeedError(f"seed {seed} (--seed) and item index {item} must be integers >= 0")
    return int(np.random.SeedSequence([seed, item]).generate_state(1)[0])


def item_noise(
    shape: Sequence[int], seed: int, items: Sequence[int], device=None, dtype=None
) -> torch.Tensor:
    """Noise of shape (len(items), *shape), item i from its own generator (see module doc)."""
    out = torch.empty((len(items), *shape), dtype=torch.float32)
    for row, item in enumerate(items):
        generator = torch.Generator("cpu").manual_seed(item_seed(seed, int(item)))
        out[row] = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)
