"""Transforms of the dreamt input before each denoiser pass, and filters of its gradient.

Transforms (lucid's transformation robustness, on the latent): each is a frozen dataclass
called as ``transform(x, draw) -> x`` on ``x`` (items, channels, height, width), drawing its
randomness per item from ``draw`` (one CPU generator per item, so an item's dream does not depend
on the other items of its batch). A render takes a *sequence* of transforms and never changes
it (it works on its own tuple).

- :class:`Jitter`: ``torch.roll`` by whole pixels, uniform in ``[-pixels, pixels]`` per axis;
- :class:`Affine`: one bilinear resample (``affine_grid`` + ``grid_sample``, zeros outside)
  rotating by an angle uniform in ``±degrees`` (counter-clockwise as displayed for positive
  angles) and zooming in by a factor uniform in ``scale``; :func:`rotate` and :func:`scale`
  are its one-sided forms;
- :class:`Renoise`: the forward process at ``t`` with fresh noise every step,
  ``sqrt(ᾱ_t) x + sqrt(1 - ᾱ_t) ε`` (the scheduler's ``add_noise``), so a dream maximises the
  expected activation over the noise of timestep t ("see through the schedule noise").

Gradient filters, applied to z's gradient between backward and the optimiser step, called as
``filter(gradient, step, steps) -> gradient``:

- :class:`Spectral`: multiply each (item, channel) plane's 2-D spectrum by ``1 / (|f| + 1)``
  (``|f|``: radial frequency on the integer grid), back to space, then rescale each item to its
  original standard deviation: low frequencies lead, the step size stays;
- :class:`GaussianBlur`: a ``kernel``-tap Gaussian (reflect padding) whose σ moves linearly from
  ``sigma[0]`` at the first step to ``sigma[1]`` at the last; no blur where σ <= 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffprobe.interventions.dream.objectives import DreamError

# (x, noise, timestep) -> x_t: the model's forward process
AddNoise = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass
class Draw:
    """The randomness and the pass of one step: ``generators`` one CPU generator per item,
    ``timestep`` the denoiser pass's timestep, ``add_noise`` the model's forward process."""

    generators: Sequence[torch.Generator]
    timestep: float = 0.0
    add_noise: AddNoise | None = None

    def uniform(self, low: float, high: float) -> torch.Tensor:
        """(items,) float64, item i uniform in [low, high] from its own generator."""
        draws = [torch.rand((), generator=g, dtype=torch.float64) for g in self.generators]
        return low + (high - low) * torch.stack(draws)

    def integers(self, low: int, high: int) -> torch.Tensor:
        """(items,) int64, item i uniform in {low, ..., high}."""
        return torch.stack([torch.randint(low, high + 1, (), generator=g) for g in self.generators])

    def normal(self, shape: Sequence[int]) -> torch.Tensor:
        """(items, *shape) float32 standard normal noise, item i from its own generator."""
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])


@dataclass(frozen=True)
class Jitter:
    """Roll every item by (dy, dx), each uniform in {-pixels, ..., pixels}."""

    pixels: int = 1

    def __call__(self, x: torch.Tensor, draw: Draw) -> torch.Tensor:
        if self.pixels <= 0:
            return x
        dy, dx = draw.integers(-self.pixels, self.pixels), draw.integers(-self.pixels, self.pixels)
        rolled = [torch.roll(x[i], (int(dy[i]), int(dx[i])), dims=(-2, -1)) for i in range(len(x))]
        return torch.stack(rolled)


def affine(x: torch.Tensor, degrees: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rotate item i of ``x`` (items, channels, height, width) by ``degrees[i]`` about the
    centre (counter-clockwise as displayed) and zoom in by ``scales[i]``, bilinear, zeros
    outside; ``degrees`` and ``scales`` are (items,)."""
    angle = torch.as_tensor(degrees, dtype=torch.float64) * (math.pi / 180)
    scales = torch.as_tensor(scales, dtype=torch.float64)
    cos, sin = torch.cos(angle) / scales, torch.sin(angle) / scales
    height, width = x.shape[-2:]
    # theta maps output to input coordinates in [-1, 1]; a non-square map needs the aspect
    aspect = width / height
    theta = torch.zeros(len(x), 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin / aspect
    theta[:, 1, 0], theta[:, 1, 1] = sin * aspect, cos
    grid = F.affine_grid(theta.to(x.device, torch.float32), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=False)  # fmt: skip


@dataclass(frozen=True)
class Affine:
    """Rotate by an angle uniform in ±``degrees`` and zoom in by a factor uniform in
    ``scale`` = (low, high), in one bilinear resample (the thesis' ``TF.affine``)."""

    degrees: float = 5.0
    scale: tuple[float, float] = (1.0, 1.1)

    def __post_init__(self) -> None:
        low, high = self.scale
        if not (0 < low <= high):
            raise DreamError(f"scale range {self.scale}: expected 0 < low <= high")

    def __call__(self, x: torch.Tensor, draw: Draw) -> torch.Tensor:
        if self.degrees == 0 and self.scale == (1.0, 1.0):
            return x
        return affine(x, draw.uniform(-self.degrees, self.degrees), draw.uniform(*self.scale))


def rotate(degrees: float = 5.0) -> Affine:
    """Rotation only: an angle uniform in ±``degrees``."""
    return Affine(degrees, (1.0, 1.0))


def scale(high: float = 1.1, low: float = 1.0) -> Affine:
    """Zoom only: a factor uniform in [``low``, ``high``]."""
    return Affine(0.0, (low, high))


@dataclass(frozen=True)
class Renoise:
    """Noise x to ``timestep`` (None: the pass's own timestep) with fresh noise each step."""

    timestep: float | None = None

    def __call__(self, x: torch.Tensor, draw: Draw) -> torch.Tensor:
        if draw.add_noise is None:
            raise DreamError("Renoise needs the model's forward process (draw.add_noise)")
        t = draw.timestep if self.timestep is None else self.timestep
        noise = draw.normal(x.shape[1:]).to(device=x.device, dtype=torch.float32)
        return draw.add_noise(x, noise, float(t))


def default_transforms(renoise: bool = True) -> tuple:
    """The thesis' defaults: jitter 1, rotate ±5°, scale [1, 1.1], then renoise to t."""
    chain: tuple = (Jitter(1), Affine(5.0, (1.0, 1.1)))
    return (*chain, Renoise()) if renoise else chain


# ----------------------------------------------------------------------------- gradient filters


def radial_frequency(height: int, width: int, device=None) -> torch.Tensor:
    """|f| (height, width) on the integer frequency grid in FFT order (``ifftshift`` of the
    centred grid): sqrt(fy^2 + fx^2) with fy in {0, 1, ..., -1} cycles per image."""
    fy = torch.fft.fftfreq(height, device=device) * height
    fx = torch.fft.fftfreq(width, device=device) * width
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


@dataclass(frozen=True)
class Spectral:
    """1 / (|f| + 1) in the Fourier domain per (item, channel) plane, std kept per item."""

    def __call__(self, gradient: torch.Tensor, step: int, steps: int) -> torch.Tensor:
        height, width = gradient.shape[-2:]
        weights = 1.0 / (radial_frequency(height, width, gradient.device) + 1.0)
        work = gradient if gradient.dtype == torch.float64 else gradient.float()
        filtered = torch.fft.ifft2(torch.fft.fft2(work) * weights).real
        before = work.flatten(1).std(1)
        after = filtered.flatten(1).std(1)
        ratio = torch.where(after > 0, before / after.clamp_min(1e-30), torch.zeros_like(after))
        return (filtered * ratio.view(-1, *([1] * (gradient.dim() - 1)))).to(gradient.dtype)


def gaussian_kernel(kernel: int, sigma: float) -> torch.Tensor:
    """(kernel,) float64 normalised taps exp(-x^2 / 2σ^2) at x = -(kernel-1)/2 ... (kernel-1)/2."""
    x = torch.linspace(-(kernel - 1) / 2, (kernel - 1) / 2, kernel, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


@dataclass(frozen=True)
class GaussianBlur:
    """Blur with σ linear from ``sigma[0]`` (first step) to ``sigma[1]`` (last step)."""

    kernel: int = 9
    sigma: tuple[float, float] = (0.5, 0.0)

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise DreamError(f"blur kernel {self.kernel}: expected an odd number of taps >= 1")

    def sigma_at(self, step: int, steps: int) -> float:
        start, end = self.sigma
        return start + (end - start) * step / max(steps - 1, 1)

    def __call__(self, gradient: torch.Tensor, step: int, steps: int) -> torch.Tensor:
        sigma = self.sigma_at(step, steps)
        if sigma <= 0:
            return gradient
        taps = gaussian_kernel(self.kernel, sigma).to(gradient.device, gradient.dtype)
        planes = gradient.flatten(0, 1)[:, None]  # (items * channels, 1, height, width)
        pad = self.kernel // 2
        planes = F.conv2d(F.pad(planes, (0, 0, pad, pad), mode="reflect"), taps.view(1, 1, -1, 1))
        planes = F.conv2d(F.pad(planes, (pad, pad, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1))
        return planes.view_as(gradient)


def default_filters(sigma: float = 0.5) -> tuple:
    """The thesis' defaults: spectral preconditioning, then a 9-tap blur with σ 0.5 -> 0."""
    return (Spectral(), GaussianBlur(9, (sigma, 0.0))) if sigma > 0 else (Spectral(),)
