"""DDIM inversion and Asyrp's asymmetric reverse process on any diffprobe UNet model.

The schedule is the model's own scheduler config read as a ``DDIMScheduler`` (its timesteps
for ``steps``, ``alphas_cumprod``, ``final_alpha_cumprod``, ``clip_sample``), so that with
Δh = 0 :func:`sample` is diffusers' DDIM (η = 0) bit for bit. One reverse step from t to the
previous timestep t' (ᾱ the cumulative alphas, ε the unedited noise prediction, ε̃ the
prediction with h + Δh at ``mid_block``):

    P_t = (x_t − √(1−ᾱ_t)·ε̃) / √ᾱ_t              (predicted x0, edited noise)
    σ_t = η·√((1−ᾱ_t')/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_t')
    D_t = √(1−ᾱ_t'−σ_t²)·ε                        (direction, unedited noise)
    x_t' = √ᾱ_t'·P_t + D_t + σ_t·z

Phases (Asyrp): t ≥ t_edit: edited (η = 0); t_boost < t < t_edit: plain DDIM (η = 0);
t ≤ t_boost: plain DDPM-like noise injection ("quality boosting", η = 1).

Classifier-free guidance: with ``guidance_scale`` > 1 both ε and ε̃ are guided; Δh is added
to the conditional branch only (``branch="cond"``, the default) or to both (``"both"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffprobe.hooks.editing import edit as edit_context
from diffprobe.hooks.edits import Apply
from diffprobe.interventions.hspace.deltas import HSpaceError

__all__ = [
    "HSpaceEdit",
    "Schedule",
    "asymmetric_step",
    "ddim_invert",
    "decode",
    "denoise_pair",
    "h_shape",
    "mid_block",
    "sample",
    "schedule",
]

SITE = "mid_block"


@dataclass
class Schedule:
    """DDIM timesteps (descending, as sampled) and the alphas of the model's scheduler."""

    timesteps: list[int]
    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: torch.Tensor
    train_steps: int
    clip_sample: float | None

    def alpha(self, timestep: int) -> torch.Tensor:
        return self.alphas_cumprod[timestep] if timestep >= 0 else self.final_alpha_cumprod

    def previous(self, index: int) -> int:
        """The timestep after ``timesteps[index]`` in sampling order (−1: the clean end)."""
        return self.timesteps[index + 1] if index + 1 < len(self.timesteps) else -1


def schedule(model: Any, steps: int) -> Schedule:
    """The DDIM schedule of ``model``'s scheduler config for ``steps`` steps."""
    from diffusers import DDIMScheduler

    if steps < 2:
        raise HSpaceError(f"h-space editing needs at least 2 DDIM steps, got {steps}")
    ddim = DDIMScheduler.from_config(model.pipe.scheduler.config)
    if ddim.config.prediction_type != "epsilon":
        raise HSpaceError(f"{model.name}: h-space editing needs an epsilon-prediction model, this "
                          f"one predicts {ddim.config.prediction_type}")  # fmt: skip
    ddim.set_timesteps(steps)
    timesteps = [int(t) for t in ddim.timesteps]
    # diffusers' DDIM steps to t − T/steps; the schedule below uses the same previous steps
    ratio = ddim.config.num_train_timesteps // steps
    if any(a - b != ratio for a, b in zip(timesteps, timesteps[1:], strict=False)):
        raise HSpaceError(f"{model.name}: the scheduler's timestep spacing is not uniform")
    clip = ddim.config.clip_sample_range if ddim.config.clip_sample else None
    return Schedule(timesteps, ddim.alphas_cumprod, ddim.final_alpha_cumprod,
                    ddim.config.num_train_timesteps, clip)  # fmt: skip


def mid_block(model: Any) -> nn.Module:
    """The denoiser's ``mid_block``, or a clear error for models without one."""
    denoiser = model.denoiser
    block = getattr(denoiser, "mid_block", None)
    if block is None:
        raise HSpaceError(f"{model.name or type(denoiser).__name__} has no UNet mid block "
                          f"({type(denoiser).__name__}); h-space editing needs a UNet with a "
                          "mid_block (SD 1.x/2.x, SDXL, IF, pixel DDPM)")  # fmt: skip
    return block


def h_shape(model: Any, size: int | None = None) -> tuple[int, int, int]:
    """(channels, height, width) of h at ``size`` px, read from one denoiser pass."""
    from diffprobe.hooks.capture import capture

    mid_block(model)
    size = size or model.resolution
    pixels = torch.zeros(1, 3, size, size)
    x = model.encode_images(pixels)
    cond = _conditioning(model, None, 1)
    site = f"{model.denoiser_name}.{SITE}"
    with torch.no_grad(), capture(model, [site]) as cache:
        model.denoise(x, torch.tensor([model.num_train_timesteps - 1.0]), cond)
    return tuple(int(s) for s in cache.last(site).shape[-3:])


def check_input(model: Any, x: torch.Tensor) -> None:
    """x in denoiser space: (items, in_channels, height, width), a size the UNet can halve
    down to its mid block."""
    config = model.denoiser.config
    levels = len(getattr(config, "block_out_channels", (0,)))
    multiple = 2 ** (levels - 1)
    if (
        x.dim() != 4
        or x.shape[1] != config.in_channels
        or x.shape[-1] % multiple
        or (x.shape[-2] % multiple)
    ):
        raise HSpaceError(
            f"input of shape {tuple(x.shape)} for {model.name}: expected (items, "
            f"{config.in_channels}, height, width) in denoiser space with height and width "
            f"multiples of {multiple}; encode images with model.encode_images first"
        )


def _conditioning(model: Any, prompts: Sequence[str] | None, items: int, cfg: bool = False):
    prompts = [""] * items if prompts is None else list(prompts)
    if len(prompts) == 1 and items > 1:
        prompts = prompts * items
    if model.family == "ddpm":
        return model.encode_prompt(prompts)
    return model.encode_prompt(prompts, cfg=cfg)


def decode(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Denoiser space -> pixels (items, 3, H, W) in about [-1, 1]; differentiable."""
    if model.family == "ddpm" or model.family == "if":
        return x
    vae = model.pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(x / vae.config.scaling_factor + shift).sample


@dataclass
class HSpaceEdit:
    """Δh = strength · (train_steps / test_steps) · Σ_i coefficient_i · source_i(h, t),
    added to ``mid_block``'s output at timesteps t ≥ ``t_edit``.

    ``sources``: modules of :mod:`~diffprobe.interventions.hspace.deltas`; ``coefficients``:
    one per source (default 1); ``train_steps``: the number of sampling steps the learned
    sources were trained with (Asyrp's ``n_train_step``), None for fixed directions (no
    rescaling); ``branch``: ``"cond"`` (default) or ``"both"`` CFG branches.
    """

    sources: Sequence[nn.Module]
    coefficients: Sequence[float] | None = None
    strength: float = 1.0
    t_edit: int = 0
    train_steps: int | None = None
    branch: str = "cond"
    step_index: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.branch not in ("cond", "both"):
            raise HSpaceError(f"branch must be 'cond' or 'both', got {self.branch!r}")
        if self.coefficients is not None and len(self.coefficients) != len(self.sources):
            raise HSpaceError(f"{len(self.coefficients)} coefficients for {len(self.sources)} "
                              "Δh sources; give one per source")  # fmt: skip

    def delta(self, h: torch.Tensor, timestep: torch.Tensor, test_steps: int) -> torch.Tensor:
        for source in self.sources:
            expected = tuple(getattr(source, "shape", ()))
            channel_vector = len(expected) == 3 and expected[1:] == (1, 1)
            if (
                expected
                and tuple(h.shape[1:]) != expected
                and not (channel_vector and h.shape[1] == expected[0])
            ):
                raise HSpaceError(
                    f"the input gives h of shape {tuple(h.shape[1:])} at the mid block, but the "
                    f"Δh was made for {expected}: invert and sample images of the size the Δh "
                    "was trained at (the model's native size)"
                )
        coefficients = self.coefficients or [1.0] * len(self.sources)
        scale = self.strength * (self.train_steps / test_steps if self.train_steps else 1.0)
        total = torch.zeros_like(h)
        for source, coefficient in zip(self.sources, coefficients, strict=True):
            total = total + coefficient * source(h, timestep, self.step_index)
        return scale * total

    def hook(self, model: Any, test_steps: int) -> Apply:
        """The typed edit that adds Δh at ``<denoiser>.mid_block``."""
        mid_block(model)

        def add_delta(h: torch.Tensor, state: Any) -> torch.Tensor:
            timestep = torch.as_tensor(state.timestep, device=h.device).reshape(-1)[:1]
            return h + self.delta(h, timestep, test_steps)

        branch = None if self.branch == "both" else "cond"
        return Apply(f"{model.denoiser_name}.{SITE}", add_delta, branch=branch)


def denoise_pair(model: Any, x_t: torch.Tensor, timestep: int, cond: Any,
                 guidance_scale: float | None, hspace: HSpaceEdit | None, test_steps: int,
                 grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(ε, ε̃): the unedited prediction (never with gradient) and the edited one."""
    t = torch.full((x_t.shape[0],), float(timestep), device=x_t.device)
    with torch.no_grad():
        eps = model.denoise(x_t, t, cond, guidance_scale)
    if hspace is None or timestep < hspace.t_edit:
        return eps, eps
    with torch.set_grad_enabled(grad), edit_context(model, hspace.hook(model, test_steps)):
        eps_edit = model.denoise(x_t, t, cond, guidance_scale)
    return eps, eps_edit


def predicted_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor,
                 clip: float | None) -> torch.Tensor:  # fmt: skip
    """P_t = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t, clipped as the scheduler clips (``clip_sample``)."""
    beta = 1 - alpha
    x0 = (x_t - beta ** (0.5) * eps) / alpha ** (0.5)
    return x0.clamp(-clip, clip) if clip is not None else x0


def asymmetric_step(x_t: torch.Tensor, eps: torch.Tensor, eps_edit: torch.Tensor,
                    alpha: torch.Tensor, alpha_prev: torch.Tensor, *, eta: float = 0.0,
                    noise: torch.Tensor | None = None,
                    clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One reverse step; returns (x_{t'}, P_t). Same arithmetic as diffusers'
    ``DDIMScheduler.step`` (so ε̃ = ε, η = 0 gives its result bit for bit)."""
    x0 = predicted_x0(x_t, eps_edit, alpha, clip)
    beta, beta_prev = 1 - alpha, 1 - alpha_prev
    variance = (beta_prev / beta) * (1 - alpha / alpha_prev)
    sigma = eta * variance ** (0.5)
    direction = (1 - alpha_prev - sigma**2) ** (0.5) * eps
    previous = alpha_prev ** (0.5) * x0 + direction
    if eta > 0:
        if noise is None:
            raise HSpaceError("η > 0 needs noise")
        previous = previous + sigma * noise
    return previous, x0


def sample(model: Any, x_T: torch.Tensor, *, steps: int = 40,
           hspace: HSpaceEdit | None = None, t_boost: int = -1, eta_boost: float = 1.0,
           prompts: Sequence[str] | None = None, guidance_scale: float | None = None,
           seed: int = 0, progress: bool = False, clip_sample: bool = True,
           on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:  # fmt: skip
    """Run the reverse process from ``x_T`` (items, ...) with Δh where ``hspace`` says;
    returns x_0 in denoiser space. Noise of the boost phase is drawn per step from a CPU
    generator seeded by ``(seed, step)``. ``clip_sample``: clip P_t as the scheduler does
    (diffusers' DDIM); pass False for chains of DDIM-inverted images (Asyrp does not clip):
    inversion does not clip, and clipping the early, wild P_t of an inverted chain sends it
    elsewhere (tiny-ddpm, 20 steps: 6.4 dB reconstruction PSNR clipped, 28.6 dB not)."""
    plan = schedule(model, steps)
    check_input(model, x_T)
    cond = _conditioning(model, prompts, len(x_T), cfg=_uses_cfg(guidance_scale))
    x = x_T
    for index, timestep in enumerate(tqdm(plan.timesteps, desc="h-space", disable=not progress)):
        if hspace is not None:
            hspace.step_index = index
        eps, eps_edit = denoise_pair(model, x, timestep, cond, guidance_scale, hspace, steps)
        boost = timestep <= t_boost
        noise = None
        if boost and eta_boost > 0:
            generator = torch.Generator().manual_seed(seed * 100_003 + index)
            noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        alpha, alpha_prev = plan.alpha(timestep), plan.alpha(plan.previous(index))
        x, x0 = asymmetric_step(x, eps, eps_edit, alpha, alpha_prev,
                                eta=eta_boost if boost else 0.0, noise=noise,
                                clip=plan.clip_sample if clip_sample else None)  # fmt: skip
        if on_step is not None:
            on_step(timestep, x0)
    return x


def _uses_cfg(guidance_scale: float | None) -> bool:
    return guidance_scale is not None and guidance_scale > 1.0


@torch.no_grad()
def ddim_invert(model: Any, x0: torch.Tensor, *, steps: int = 40,
                prompts: Sequence[str] | None = None, guidance_scale: float | None = None,
                progress: bool = False) -> torch.Tensor:  # fmt: skip
    """DDIM inversion (η = 0 run backwards) of clean inputs x0 (items, ...) in denoiser space
    to x_T at the schedule's first timestep; ε at each step is evaluated at the previous,
    less noisy point (the usual approximation, exact as steps → ∞)."""
    plan = schedule(model, steps)
    check_input(model, x0)
    cond = _conditioning(model, prompts, len(x0), cfg=_uses_cfg(guidance_scale))
    ascending = plan.timesteps[::-1]
    x = x0
    previous = -1
    for timestep in tqdm(ascending, desc="invert", disable=not progress):
        evaluated = max(previous, ascending[0])
        t = torch.full((x.shape[0],), float(evaluated), device=x.device)
        eps = model.denoise(x, t, cond, guidance_scale)
        alpha_prev, alpha = plan.alpha(previous), plan.alpha(timestep)
        x0_hat = (x - (1 - alpha_prev) ** 0.5 * eps) / alpha_prev**0.5
        x = alpha**0.5 * x0_hat + (1 - alpha) ** 0.5 * eps
        previous = timestep
    return x
