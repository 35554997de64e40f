"""Helpers shared by the training recipes of the embedded models (``tiny``, and the ones to
come): image conversions, PSNR, learning-rate schedule, checkpoints' RNG state, EMA."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean PSNR in dB over items of uint8 images (items, height, width, channels)."""
    error = (reference.astype(np.float64) - reconstruction.astype(np.float64)) ** 2
    mse = np.maximum(error.reshape(len(error), -1).mean(axis=1), 1e-10)
    return float(np.mean(10 * np.log10(255.0**2 / mse)))


def to_unit(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (items, 64, 64, 3) -> float (items, 3, 64, 64) in [-1, 1] on ``device``."""
    tensor = torch.as_tensor(images).to(device)
    return tensor.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def from_unit(images: torch.Tensor) -> np.ndarray:
    """float (items, 3, 64, 64) in [-1, 1] -> uint8 (items, 64, 64, 3)."""
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def batch_indices(generator: torch.Generator, items: int, batch_size: int) -> torch.Tensor:
    return torch.randperm(items, generator=generator)[:batch_size]


def learning_rate_factor(step: int, steps: int, warmup: int, final_fraction: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: checkpoints hold only tensors and plain containers, never pickled objects.
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {f"{name}.{key}": value.detach().clone()
                       for name, module in modules.items()
                       for key, value in module.named_parameters()}  # fmt: skip

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, module in modules.items():
            for key, value in module.named_parameters():
                self.shadow[f"{name}.{key}"].lerp_(value.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, modules: dict[str, torch.nn.Module]) -> None:
        for name, module in modules.items():
            for key, value in module.named_parameters():
                value.copy_(self.shadow[f"{name}.{key}"])


def scratch_directory():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="diffprobe-tiny-")
