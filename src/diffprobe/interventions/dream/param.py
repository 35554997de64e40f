"""The dreamt parameter: the denoiser's clean input z (a VAE latent, or pixels for pixel
models such as DDPM and IF), and back from it to images.

A dream of seed ``s`` starts from ``item_noise(shape, s, [0])`` (N(0, 1), the documented
per-item noise), or from a saved prior latent (the features issue's ``steer --prior``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffprobe.interventions.dream.objectives import DreamError
from diffprobe.models.geometry import vae_factor
from diffprobe.models.noise import item_noise


def input_shape(model: Any, size: int | None = None) -> tuple[int, int, int]:
    """(channels, height, width) of the denoiser's input for images of ``size`` px (default:
    the model's native size)."""
    size = model.resolution if size is None else int(size)
    model.check_size(size)
    vae = getattr(model.pipe, "vae", None)
    factor = vae_factor(dict(vae.config)) if vae is not None else 1
    channels = int(model.denoiser.config.in_channels)
    return channels, size // factor, size // factor


def noise_init(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """(items, *shape) float32: item i is ``item_noise(shape, seeds[i], [0])``."""
    return torch.cat([item_noise(tuple(shape), int(s), [0]) for s in seeds])


def load_prior(path: str | Path, shape: Sequence[int], key: str | None = None) -> torch.Tensor:
    """Prior latents (items, *shape) float32 from a safetensors file: the tensor ``key``, or
    the file's only tensor (a tensor of ``shape`` alone is one item)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise DreamError(f"--prior {path}: no such file; give a .safetensors file of latents")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = " ".join(str(err).split())
        raise DreamError(f"--prior {path} is not a readable safetensors file ({reason})") from None
    if key is None:
        if len(tensors) != 1:
            raise DreamError(
                f"--prior {path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:4])}); "
                "name one (e.g. 'latents')"
            )
        key = next(iter(tensors))
    if key not in tensors:
        raise DreamError(
            f"--prior {path} has no tensor {key!r}; it has {', '.join(sorted(tensors))}"
        )
    latents = tensors[key].float()
    if tuple(latents.shape) == tuple(shape):
        latents = latents[None]
    if latents.dim() != len(shape) + 1 or tuple(latents.shape[1:]) != tuple(shape):
        raise DreamError(
            f"--prior {path}: tensor {key!r} has shape {tuple(latents.shape)}, but this model's "
            f"dreams have shape (items, {', '.join(map(str, shape))})"
        )
    return latents


def has_vae(model: Any) -> bool:
    return getattr(model.pipe, "vae", None) is not None


@torch.no_grad()
def decode(model: Any, z: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """uint8 images (items, height, width, 3) of dreamt inputs z (items, channels, h, w): the
    VAE decode of latents (scaled back by the VAE's scaling and shift factors), or the pixels
    themselves for pixel models."""
    out = []
    for start in range(0, len(z), batch_size):
        chunk = z[start : start + batch_size].to(model.device)
        if has_vae(model):
            vae = model.pipe.vae
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents = chunk / vae.config.scaling_factor + shift
            pixels = vae.decode(latents.to(vae.dtype)).sample
        else:
            pixels = chunk
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round()
        out.append(pixels.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)
