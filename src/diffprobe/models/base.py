"""The adapter interface: one small surface over every diffusers family.

A :class:`Model` wraps a native diffusers pipeline (``model.pipe``) without changing it. Each
family (one file per family in this package) implements five things:

- ``encode_images(images)``: pixels -> denoiser inputs (VAE latents, or pixels for IF/DDPM);
- ``encode_prompt(prompts)``: prompts -> :class:`Conditioning`, through the pipeline's own
  ``encode_prompt``; ``encode_text(prompts)`` gives every text-encoder layer;
- ``add_noise(x0, noise_level=... | timestep=..., seed=..., items=...)``: the documented
  forward process with per-item seeded noise;
- ``denoise(x_t, timestep, cond, guidance_scale=...)``: one denoiser call, with CFG if asked;
- ``generate(prompts, ...)``: the native pipeline's ``__call__``.

Gradients: ``denoise`` leaves autograd to the caller (extraction runs it under
``torch.inference_mode``; a deep dream or a learned edit back-propagates through it, also when a
``capture(..., stop_early=True, detach=False)`` ends it early). ``generate`` goes through the
native pipeline, whose ``__call__`` is decorated with ``torch.no_grad``: no gradients there.

Noise (see docs/noise.md): item ``i`` of a call with ``seed`` draws its noise from
``torch.Generator("cpu").manual_seed(item_seed(seed, i))`` with
``item_seed(seed, i) = int(numpy.random.SeedSequence([seed, i]).generate_state(1)[0])`` (a
32-bit hash of the pair: torch's CPU generator reads only the low 32 bits of a seed), as float32 of the per-item shape, then moved to the
model's device and dtype. A noise level ``p`` in [0, 1] is a fraction of the training schedule:
``t = min(round(p * T), T - 1)`` for DDPM-type schedules of ``T`` steps (then
``x_t = DDPMScheduler.add_noise(x_0, noise, t)``), and ``sigma = p`` for rectified-flow models
(``x_t = (1 - sigma) x_0 + sigma noise``). Results therefore do not depend on batch size,
shard count or order.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from diffprobe.errors import DiffprobeError, ImageSizeError
from diffprobe.hooks.engine import (
    BRANCHES,
    Cache,
    SiteFilter,
    capture,
    catch_stop,
    forbid_stop_early,
)
from diffprobe.hooks.sites import all_site_names, module_components, resolve_site
from diffprobe.registry import ModelSpec


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


class Model:
    """A diffusers pipeline behind diffprobe's adapter interface. Subclass per family."""

    family: ClassVar[str] = ""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    denoiser_name: ClassVar[str] = "unet"
    # keyword under which the pipeline passes the timestep to the denoiser
    flow_matching: ClassVar[bool] = False

    def __init__(self, pipe: Any, spec: ModelSpec | None = None, name: str | None = None):
        self.pipe = pipe
        self.spec = spec
        self.name = name or (spec.alias if spec and spec.alias else None)
        self.branch_layout: tuple[str, ...] | None = None
        # True inside cfg(): the layout was decided by the model, not left for the hook engine
        # to read from the native pipeline
        self.branch_layout_set = False
        self._noise_schedule: tuple[Any, Any] | None = None  # (scheduler config, DDPMScheduler)

    # -- components and sites ---------------------------------------------------------------

    @property
    def module_components(self) -> dict[str, nn.Module]:
        return module_components(self.pipe.components)

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.pipe.to(device=device, dtype=dtype)
        return self

    def module(self, site: str) -> nn.Module:
        """The native module at ``site`` (e.g. ``"unet.mid_block"``)."""
        return resolve_site(self.module_components, site, self.name)[1]

    def site_names(self, component: str | None = None) -> list[str]:
        comps = self.module_components
        if component is not None:
            comps = {component: comps[component]}
        return all_site_names(comps)

    @contextlib.contextmanager
    def cfg(self, enabled: bool) -> Iterator[None]:
        """Tell the hook engine whether denoiser batches are CFG-doubled inside the block."""
        previous = self.branch_layout, self.branch_layout_set
        self.branch_layout = BRANCHES if enabled else None
        self.branch_layout_set = True
        try:
            yield
        finally:
            self.branch_layout, self.branch_layout_set = previous

    # -- geometry ------------------------------------------------------------------------------

    @property
    def resolution(self) -> int:
        if self.spec is not None and self.spec.resolution:
            return self.spec.resolution
        return self.default_resolution()

    def default_resolution(self) -> int:
        raise NotImplementedError

    def size_multiple(self) -> int:
        """Image sizes must be multiples of this."""
        raise NotImplementedError

    def unet_multiple(self) -> int:
        """For a UNet denoiser, the size every down-sampling halves evenly: VAE factor ×
        2**(down blocks - 1), the rule ``diffprobe sites`` documents shapes by
        (``models.meta.latent_geometry``); 1 for other denoisers. (A UNet pads and interpolates
        at other sizes, so its features there are not the documented shapes.)"""
        blocks = getattr(getattr(self.denoiser, "config", None), "down_block_types", None)
        if not blocks:
            return 1
        factor = int(self.pipe.vae_scale_factor) if getattr(self.pipe, "vae", None) else 1
        return factor * 2 ** (len(blocks) - 1)

    def check_size(self, size: int) -> None:
        """Raise :class:`ImageSizeError` unless ``size`` px can be taken (``--size``)."""
        multiple = math.lcm(self.size_multiple(), self.unet_multiple())
        name = self.name or self.family
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ImageSizeError(
                f"--size {size!r}: the image size must be a positive number of pixels, a "
                f"multiple of {multiple} for {name} (native size {self.resolution})"
            )
        if size % multiple:
            lower, upper = size // multiple * multiple, (size // multiple + 1) * multiple
            choices = f"{lower} or {upper}" if lower else f"{upper}"
            raise ImageSizeError(
                f"image size {size} px (--size {size}) cannot be taken by {name}: it must be a "
                f"positive multiple of {multiple} (native size {self.resolution}); try {choices}"
            )

    # -- the five operations ---------------------------------------------------------------------

    def prepare_images(self, images: Any, size: int | None = None) -> torch.Tensor:
        """uint8 (items, H, W, 3) arrays, PIL images or float tensors in [-1, 1] ->
        float tensor (items, 3, size, size) in [-1, 1] on the model's device."""
        size = size or self.resolution
        self.check_size(size)
        if isinstance(images, torch.Tensor):
            pixels = images.float()
            if pixels.dim() == 3:
                pixels = pixels[None]
        else:
            if not isinstance(images, np.ndarray):
                images = np.stack([np.asarray(img.convert("RGB")) for img in images])
            if images.ndim == 3:
                images = images[None]
            if images.dtype != np.uint8:
                raise DiffprobeError(
                    f"images must be uint8 (items, H, W, 3), got {images.dtype} {images.shape}"
                )
            pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if pixels.shape[-2:] != (size, size):
            pixels = torch.nn.functional.interpolate(
                pixels, size=(size, size), mode="bicubic", align_corners=False, antialias=True
            ).clamp(-1, 1)
        return pixels.to(device=self.device, dtype=self.dtype)

    def encode_images(self, images: Any, size: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def encode_prompt(
        self, prompts: Sequence[str], negative: Sequence[str] | str | None = None
    ) -> Conditioning:
        raise NotImplementedError

    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        raise NotImplementedError

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    def noise_level_of(self, timestep: float) -> float:
        """The noise level of a denoiser call given ``timestep`` (t / T, the inverse of
        :meth:`timestep_for` up to its rounding); hook windows and records use it."""
        return float(timestep) / self.num_train_timesteps

    def timestep_for(self, noise_level: float) -> float:
        """The denoiser timestep of noise level ``p`` (see the module docstring)."""
        if not 0.0 <= noise_level <= 1.0:
            raise DiffprobeError(f"noise level must lie in [0, 1], got {noise_level}")
        steps = self.num_train_timesteps
        if self.flow_matching:
            return noise_level * steps
        return float(min(round(noise_level * steps), steps - 1))

    def add_noise(
        self,
        x0: torch.Tensor,
        *,
        noise_level: float | None = None,
        timestep: float | None = None,
        seed: int = 0,
        items: Sequence[int] | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise clean inputs ``x0`` (items, ...) -> (x_t, timestep tensor (items,)).

        ``noise``: the items' noise if already drawn, ``item_noise(x0.shape[1:], seed, items)``
        (the same for every noise level, so a grid draws it once per item); ``seed`` and
        ``items`` are then not used."""
        if (noise_level is None) == (timestep is None):
            raise DiffprobeError("give exactly one of noise_level and timestep")
        t = self.timestep_for(noise_level) if noise_level is not None else float(timestep)
        if not self.flow_matching:
            t = float(round(t))  # DDPM-type schedules are defined on integer timesteps
        if noise is None:
            items = list(range(x0.shape[0])) if items is None else list(items)
            noise = item_noise(x0.shape[1:], seed, items, device=x0.device, dtype=torch.float32)
        elif noise.shape != x0.shape:
            raise DiffprobeError(f"noise of shape {tuple(noise.shape)} for x0 {tuple(x0.shape)}")
        noise = noise.to(device=x0.device, dtype=torch.float32)
        if self.flow_matching:
            sigma = t / self.num_train_timesteps
            noisy = (1.0 - sigma) * x0.float() + sigma * noise
        else:
            t_index = torch.full((x0.shape[0],), int(t), dtype=torch.long)
            noisy = self._ddpm_schedule().add_noise(x0.float(), noise, t_index.to(x0.device))
        timesteps = torch.full((x0.shape[0],), t, device=x0.device)
        return noisy.to(x0.dtype), timesteps

    def _ddpm_schedule(self):
        """A DDPMScheduler with the pipeline scheduler's betas, built once per scheduler config
        (building one costs about 0.5 ms: per pass, 1 % of a small model's grid)."""
        config = self.pipe.scheduler.config
        if self._noise_schedule is None or self._noise_schedule[0] is not config:
            from diffusers import DDPMScheduler

            self._noise_schedule = (config, DDPMScheduler.from_config(config))
        return self._noise_schedule[1]

    def denoiser_kwargs(
        self, x_t: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]
    ) -> dict[str, Any]:
        raise NotImplementedError

    def denoise(
        self,
        x_t: torch.Tensor,
        timestep: torch.Tensor | float,
        cond: Conditioning,
        guidance_scale: float | None = None,
    ) -> torch.Tensor | None:
        """One denoiser call on x_t (items, ...); with ``guidance_scale`` > 1 the batch is run as
        [uncond, cond] and combined. Returns the model prediction (items, ...), or None when a
        ``capture(..., stop_early=True)`` stopped it after its deepest site.

        Autograd is the caller's: gradients flow from the prediction or from values captured
        with ``detach=False`` back to ``x_t`` and the conditioning."""
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.full((x_t.shape[0],), float(timestep), device=x_t.device)
        use_cfg = guidance_scale is not None and guidance_scale > 1.0
        if use_cfg and cond.uncond is None:
            raise DiffprobeError("CFG needs an unconditional embedding: encode_prompt(negative='')")
        prediction = None
        with self.cfg(use_cfg), catch_stop(self.denoiser) as stop:
            if use_cfg:
                kwargs = self.denoiser_kwargs(
                    torch.cat([x_t, x_t]),
                    torch.cat([timestep, timestep]),
                    _concat(cond.uncond, cond.cond),
                )
                uncond, conditional = self._prediction(self.denoiser(**kwargs)).chunk(2)
                prediction = uncond + guidance_scale * (conditional - uncond)
            else:
                kwargs = self.denoiser_kwargs(x_t, timestep, cond.cond)
                prediction = self._prediction(self.denoiser(**kwargs))
        return None if stop.stopped else prediction

    @staticmethod
    def _prediction(output: Any) -> torch.Tensor:
        return output[0] if isinstance(output, tuple) else output.sample

    def generation_uses_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
        size: int | None = None,
        output_type: str = "np",
        **pipeline_kwargs: Any,
    ) -> Any:
        """The native pipeline's generation, seeded by ``seed``; returns (items, H, W, 3) floats
        in [0, 1] for ``output_type="np"``. The pipeline runs under its own ``torch.no_grad``:
        for gradients call :meth:`denoise`. Refused inside ``capture(..., stop_early=True)``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        size = size or self.resolution
        self.check_size(size)
        forbid_stop_early(self.module_components.values(), "model.generate(...)")
        generator = torch.Generator("cpu").manual_seed(seed)
        with self.cfg(self.generation_uses_cfg(guidance_scale)):
            result = self.pipe(
                prompt=prompts,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generator,
                height=size,
                width=size,
                output_type=output_type,
                **pipeline_kwargs,
            )
        return result.images

    def run_with_cache(
        self,
        prompts: Any,
        sites: SiteFilter,
        *,
        reduce: Any = None,
        to: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **generate_kwargs: Any,
    ) -> tuple[Any, Cache]:
        """``generate(prompts, **generate_kwargs)`` with a capture of ``sites`` (names, globs
        such as ``"unet.*_block*"`` or a callable ``name -> bool``): ``(images, cache)``.
        ``reduce``, ``to`` and ``dtype`` are :func:`~diffprobe.hooks.capture.capture`'s."""
        with capture(self, sites, reduce=reduce, to=to, dtype=dtype) as cache:
            images = self.generate(prompts, **generate_kwargs)
        return images, cache

    def describe(self) -> dict[str, Any]:
        counts = {
            name: sum(p.numel() for p in module.parameters())
            for name, module in self.module_components.items()
        }
        return {
            "name": self.name,
            "family": self.family,
            "pipeline": type(self.pipe).__name__,
            "resolution": self.resolution,
            "parameters": counts,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }

    def __repr__(self) -> str:
        return f"<diffprobe {self.family} model {self.name or ''} ({type(self.pipe).__name__})>"
