"""Pixel-space unconditional DDPM / DDIM (UNet2DModel), as used by Asyrp's h-space editing.

Pipelines: ``DDPMPipeline`` and ``DDIMPipeline`` (one ``UNet2DModel``, one scheduler). Denoiser
sites: ``unet.*`` (the bottleneck "h-space" is ``unet.mid_block``). There is no text encoder and
no VAE: the denoiser works on pixels in [-1, 1].

Unconditional: :meth:`DDPMModel.encode_prompt` returns an empty :class:`Conditioning` (no
keywords, no unconditional branch) that only remembers how many items there are, and
:meth:`DDPMModel.generate` uses its prompts only for their *count*: ``generate(["", "", ""])``
and ``generate(3)`` both draw three images. There is no classifier-free guidance.

Timesteps are the integer timesteps of the training schedule (``num_train_timesteps``, 1000 for
the published models); ``add_noise`` is the DDPM forward process on the scheduler's betas, which
DDIM shares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.hooks.engine import forbid_stop_early
from diffprobe.models.base import Conditioning, Model, TextEncoding
from diffprobe.models.registry import register_adapter
from diffprobe.models.unet import UNET_TUPLE_ELEMENTS, unet_inputs


@register_adapter
class DDPMModel(Model):
    family = "ddpm"
    pipeline_classes = ("DDPMPipeline", "DDIMPipeline")
    denoiser_name = "unet"
    denoiser_classes = ("UNet2DModel",)
    default_guidance_scale = None  # unconditional: no guidance at all
    tuple_elements = UNET_TUPLE_ELEMENTS

    def default_resolution(self) -> int:
        sample_size = self.pipe.unet.config.sample_size
        if isinstance(sample_size, int):
            return sample_size
        height, width = sample_size
        if height != width:
            raise DiffprobeError(
                f"{type(self.pipe).__name__} generates {height}×{width} images; diffprobe's image "
                "sizes are square"
            )
        return int(height)

    @classmethod
    def meta_denoiser_inputs(
        cls, config: Mapping[str, Any], geometry: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Pixels (3, size, size), a timestep, class labels when the config has them."""
        return unet_inputs(config, geometry)

    def generation_uses_cfg(self, guidance_scale: float) -> bool:
        return False

    def encode_images(self, images: Any, size: int | None = None) -> torch.Tensor:
        """Pixels -> denoiser inputs (items, 3, size, size): the pixels themselves in [-1, 1]."""
        return self.prepare_images(images, size)

    def _encode_prompt(
        self, prompts: list[str], negative: list[str] | None, uncond: bool
    ) -> Conditioning:
        """An empty conditioning for ``len(prompts)`` items (the model is unconditional)."""
        if uncond:
            raise DiffprobeError(
                f"{self.name or self.family} is unconditional: it has no negative prompt and no CFG"
            )
        return Conditioning({}, None, prompts)

    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        """Nothing to encode: an unconditional model has no text encoder."""
        return TextEncoding({}, {}, {})

    def denoiser_kwargs(
        self, x_t: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]
    ) -> dict[str, Any]:
        return {"sample": x_t, "timestep": timestep, "return_dict": False}

    def generate(
        self,
        prompts: int | str | Sequence[str] = 1,
        *,
        steps: int = 50,
        guidance_scale: float | None = None,
        seed: int = 0,
        size: int | None = None,
        output_type: str = "np",
        **pipeline_kwargs: Any,
    ) -> Any:
        """The native pipeline's ``__call__`` for as many images as there are prompts (or
        ``prompts`` images when it is an int), seeded by ``seed``; returns (items, H, W, 3)
        floats in [0, 1] for ``output_type="np"``. Images come at the UNet's ``sample_size``;
        ``size`` may only restate it. DDIM's ``eta`` and other pipeline options pass through."""
        if guidance_scale is not None and guidance_scale > 1.0:
            raise DiffprobeError(
                f"{self.name or self.family} is unconditional: guidance_scale={guidance_scale} "
                "has no effect here; leave it out"
            )
        if isinstance(prompts, int):
            count = prompts
        else:
            count = 1 if isinstance(prompts, str) else len(prompts)
        if count < 1:
            raise DiffprobeError(f"generate needs at least one image, got {count}")
        if size is not None and size != self.default_resolution():
            raise DiffprobeError(
                f"{type(self.pipe).__name__} generates at the UNet's sample size "
                f"{self.default_resolution()} px, not {size} px"
            )
        forbid_stop_early(self.module_components.values(), "model.generate(...)")
        generator = torch.Generator("cpu").manual_seed(seed)
        with self.cfg(False):
            result = self.pipe(
                batch_size=count,
                generator=generator,
                num_inference_steps=steps,
                output_type=output_type,
                **pipeline_kwargs,
            )
        return result.images
