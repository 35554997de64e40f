"""Where Δh comes from: learned networks f_t(h, t), free per-timestep tensors, fixed directions.

Every source is an ``nn.Module`` whose ``forward(h, timestep, step_index)`` returns Δh with the
shape of ``h`` (items, channels, height, width), the output of the denoiser's ``mid_block``:

- :class:`DeltaBlock`: Asyrp's f_t (``models/ddpm/diffusion.py: DeltaBlock``): 1×1 conv, plus
  a linear map of the timestep embedding broadcast over space, GroupNorm, SiLU, 1×1 conv; one
  network for every t.
- :class:`TransformerDelta`: the reproduction's f_t (zilaeric/DL2-2023-group-15,
  ``TransformerSimple`` "pc" dual): a transformer encoder layer over pixel tokens
  (height·width tokens of ``channels`` features), then one over channel tokens (``channels``
  tokens of height·width features), time injected by adaptive GroupNorm (scale and shift from
  the timestep embedding), SiLU, 1×1 conv.
- :class:`FreeDelta`: Asyrp's ``--train_delta_h``: one free Δh per sampling step.
- :class:`ConstantDelta`: the same Δh at every step: a PCA component, a mean difference
  between two groups of h, or a tensor loaded from a file.

The timestep embedding is the sinusoidal embedding of the DDPM timestep (dimension 128), not
the UNet's own, so a trained f_t is a file of its own that does not depend on UNet internals.
The last layer of both networks starts at zero, so training starts from Δh = 0 (the
unedited model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffprobe.errors import DiffprobeError

__all__ = [
    "ConstantDelta",
    "DeltaBlock",
    "FreeDelta",
    "HSpaceError",
    "TransformerDelta",
    "build_delta",
    "load_delta",
    "mean_difference",
    "pca_directions",
    "save_delta",
    "timestep_embedding",
]

TIME_DIM = 128


class HSpaceError(DiffprobeError, ValueError):
    """An h-space request that cannot be served (no mid block, wrong shapes, bad texts)."""


def timestep_embedding(timestep: torch.Tensor, dim: int = TIME_DIM) -> torch.Tensor:
    """Sinusoidal embedding (items, dim) of DDPM timesteps (items,) (Ho et al., transformer)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32) / half)
    angles = timestep.float().reshape(-1, 1).cpu() * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(timestep.device)


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class DeltaBlock(nn.Module):
    """Asyrp's f_t: conv1×1(h) + W·temb → GroupNorm → SiLU → conv1×1 (zero-initialised)."""

    kind = "conv"

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.shape = (channels, height, width)
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.time = nn.Linear(TIME_DIM, channels)
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, h: torch.Tensor, timestep: torch.Tensor, step_index: int = 0) -> torch.Tensor:
        temb = timestep_embedding(timestep.expand(h.shape[0])).to(h.device, h.dtype)
        x = self.conv1(h) + self.time(nn.functional.silu(temb))[:, :, None, None]
        return self.conv2(nn.functional.silu(self.norm(x)))


class TransformerDelta(nn.Module):
    """The reproduction's best f_t: pixel-token then channel-token transformer layers,
    adaptive GroupNorm with the timestep, SiLU, conv1×1 (zero-initialised)."""

    kind = "transformer"

    def __init__(self, channels: int, height: int, width: int, heads: int = 4,
                 feedforward: int = 2) -> None:  # fmt: skip
        super().__init__()
        self.shape = (channels, height, width)
        tokens = height * width
        pixel_heads = next(h for h in (heads, 4, 2, 1) if channels % h == 0)
        channel_heads = next(h for h in (heads, 4, 2, 1) if tokens % h == 0)
        self.pixel = nn.TransformerEncoderLayer(channels, pixel_heads, feedforward * channels,
                                                dropout=0.0, batch_first=True)  # fmt: skip
        self.channel = nn.TransformerEncoderLayer(tokens, channel_heads, feedforward * tokens,
                                                  dropout=0.0, batch_first=True)  # fmt: skip
        self.norm = nn.GroupNorm(_groups(channels), channels, affine=False)
        self.time = nn.Linear(TIME_DIM, 2 * channels)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, timestep: torch.Tensor, step_index: int = 0) -> torch.Tensor:
        items, channels, height, width = h.shape
        x = self.pixel(h.flatten(2).transpose(1, 2))  # (items, pixels, channels)
        x = self.channel(x.transpose(1, 2))  # (items, channels, pixels)
        x = x.reshape(items, channels, height, width)
        temb = timestep_embedding(timestep.expand(items)).to(h.device, h.dtype)
        scale, shift = self.time(nn.functional.silu(temb)).chunk(2, dim=1)
        x = self.norm(x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.out(nn.functional.silu(x))


class FreeDelta(nn.Module):
    """A free Δh per sampling step (steps, channels, height, width), zero-initialised
    (Asyrp draws N(0, 0.2²); zero keeps the unedited model as the start)."""

    kind = "free"

    def __init__(self, channels: int, height: int, width: int, steps: int) -> None:
        super().__init__()
        self.shape = (channels, height, width)
        self.delta = nn.Parameter(torch.zeros(steps, channels, height, width))

    def forward(self, h: torch.Tensor, timestep: torch.Tensor, step_index: int = 0) -> torch.Tensor:
        if not 0 <= step_index < len(self.delta):
            raise HSpaceError(f"free Δh has {len(self.delta)} steps, asked for step {step_index}; "
                              "sample with as many steps as it was trained with")  # fmt: skip
        return self.delta[step_index].to(h.dtype).expand_as(h)


class ConstantDelta(nn.Module):
    """The same Δh (channels, height, width) — or a channel vector (channels,) — at every step."""

    kind = "constant"

    def __init__(self, direction: torch.Tensor) -> None:
        super().__init__()
        direction = torch.as_tensor(direction, dtype=torch.float32)
        if direction.dim() == 1:
            direction = direction[:, None, None]
        if direction.dim() != 3:
            raise HSpaceError(f"a Δh direction is (channels, height, width) or (channels,), got "
                              f"shape {tuple(direction.shape)}")  # fmt: skip
        self.shape = tuple(direction.shape)
        self.register_buffer("direction", direction)

    def forward(self, h: torch.Tensor, timestep: torch.Tensor, step_index: int = 0) -> torch.Tensor:
        return self.direction.to(h.dtype).expand_as(h)


KINDS = {"conv": DeltaBlock, "transformer": TransformerDelta, "free": FreeDelta}


def build_delta(kind: str, shape: tuple[int, int, int], steps: int = 1) -> nn.Module:
    """A fresh learned Δh source of ``kind`` (conv, transformer, free) for h of ``shape``."""
    if kind not in KINDS:
        raise HSpaceError(f"unknown Δh network {kind!r}; expected one of {', '.join(KINDS)}")
    channels, height, width = shape
    if kind == "free":
        return FreeDelta(channels, height, width, steps)
    return KINDS[kind](channels, height, width)


# ------------------------------------------------------------------------ training-free directions


def pca_directions(h: torch.Tensor, components: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal directions of h (items, channels, height, width): (components, C, H, W) unit
    vectors of the flattened maps and the fraction of variance each explains."""
    flat = h.reshape(len(h), -1).double()
    flat = flat - flat.mean(0, keepdim=True)
    _, singular, vectors = torch.linalg.svd(flat, full_matrices=False)
    explained = singular**2 / (singular**2).sum()
    return (vectors[:components].float().reshape(components, *h.shape[1:]),
            explained[:components].float())  # fmt: skip


def mean_difference(h_source: torch.Tensor, h_target: torch.Tensor) -> torch.Tensor:
    """mean(h_target) − mean(h_source) over items: the supervised direction (C, H, W)."""
    if h_source.shape[1:] != h_target.shape[1:]:
        raise HSpaceError(f"the two groups of h differ in shape: {tuple(h_source.shape[1:])} vs "
                          f"{tuple(h_target.shape[1:])}")  # fmt: skip
    return h_target.float().mean(0) - h_source.float().mean(0)


# ------------------------------------------------------------------------------------ files


def save_delta(path: str | Path, source: nn.Module, info: dict[str, Any]) -> Path:
    """``source`` as safetensors with its kind, h shape and ``info`` in the metadata."""
    from safetensors.torch import save

    from diffprobe.io import write_bytes

    metadata = {"kind": source.kind, "shape": json.dumps(list(source.shape)),
                "info": json.dumps(info, default=str)}  # fmt: skip
    if isinstance(source, FreeDelta):
        metadata["steps"] = str(len(source.delta))
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in source.state_dict().items()}
    return write_bytes(path, save(tensors, metadata=metadata))


def load_delta(path: str | Path, shape: tuple[int, ...] | None = None) -> tuple[nn.Module, dict]:
    """A Δh source from a file of :func:`save_delta` — or a plain safetensors file with one
    tensor ``delta_h`` (channels, height, width) or (channels,). ``shape``: the h of the model
    it will edit, (channels, height, width); a file for another shape is refused."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise HSpaceError(f"Δh file {path} does not exist; pass a file written by "
                          "`diffprobe hspace train` or a safetensors file with 'delta_h'")  # fmt: skip
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise HSpaceError(f"Δh file {path} is not a safetensors file ({err}); pass a file "
                          "written by `diffprobe hspace train`") from None  # fmt: skip
    if "kind" in metadata:
        kind = metadata["kind"]
        stored = tuple(json.loads(metadata["shape"]))
        info = json.loads(metadata.get("info", "{}"))
    elif set(tensors) == {"delta_h"}:
        kind, stored, info = "constant", tuple(tensors["delta_h"].shape), {}
        tensors = {"direction": tensors["delta_h"]}
    else:
        raise HSpaceError(f"Δh file {path} holds {sorted(tensors)}; expected one tensor "
                          "'delta_h' or a file written by `diffprobe hspace train`")  # fmt: skip
    if shape is not None:
        matches = stored == tuple(shape) or (len(stored) == 1 and stored[0] == shape[0])
        if not matches:
            raise HSpaceError(f"Δh file {path} is for h of shape {stored}, but this model's "
                              f"mid block gives {tuple(shape)}; train or export Δh for this "
                              "model and image size")  # fmt: skip
    if kind == "constant":
        source = ConstantDelta(tensors["direction"])
    elif kind in KINDS:
        full = stored if len(stored) == 3 else (stored[0], 1, 1)
        source = build_delta(kind, full, int(metadata.get("steps", 1)))
        source.load_state_dict(tensors)
    else:
        raise HSpaceError(f"Δh file {path} has unknown kind {kind!r}")
    return source.eval(), info
