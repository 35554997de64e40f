"""Stable Diffusion 1.x, 2.x (epsilon and v-prediction), SD-Turbo, and diffprobe's ``tiny``.

Pipeline: ``StableDiffusionPipeline`` (AutoencoderKL, one CLIP text encoder,
UNet2DConditionModel). Denoiser sites: ``unet.*``; text: ``text_encoder.*``; VAE: ``vae.*``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from diffprobe.models.base import Conditioning, Model, TextEncoding, negative_prompts
from diffprobe.models.registry import register_adapter


@register_adapter
class StableDiffusionModel(Model):
    family = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    denoiser_name = "unet"

    def default_resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.pipe.vae_scale_factor

    def size_multiple(self) -> int:
        # StableDiffusionPipeline.check_inputs demands multiples of 8 whatever the VAE
        return math.lcm(8, int(self.pipe.vae_scale_factor))

    def generation_uses_cfg(self, guidance_scale: float) -> bool:
        # same rule as StableDiffusionPipeline.do_classifier_free_guidance
        return guidance_scale > 1.0 and self.pipe.unet.config.time_cond_proj_dim is None

    def encode_images(self, images: Any, size: int | None = None) -> torch.Tensor:
        """Pixels -> latents (items, 4, size/f, size/f): the VAE posterior mean times the
        scaling factor (deterministic; no posterior sample)."""
        pixels = self.prepare_images(images, size)
        vae = self.pipe.vae
        with torch.no_grad():
            mean = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((mean - shift) * vae.config.scaling_factor).to(self.dtype)

    def encode_prompt(
        self, prompts: Sequence[str], negative: Sequence[str] | str | None = None
    ) -> Conditioning:
        """The pipeline's own ``encode_prompt``; ``negative`` (e.g. "") adds the uncond branch."""
        prompts = list(prompts)
        negative = negative_prompts(prompts, negative)
        with torch.no_grad():
            cond, uncond = self.pipe.encode_prompt(
                prompts,
                self.device,
                1,
                negative is not None,
                negative_prompt=negative,
            )
        return Conditioning(
            {"encoder_hidden_states": cond},
            None if negative is None else {"encoder_hidden_states": uncond},
            prompts,
        )

    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        tokens = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(encoder.device)
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        return TextEncoding(
            {"text_encoder": tuple(out.hidden_states)},
            {"text_encoder": ids},
            {"text_encoder": None},
        )

    def denoiser_kwargs(
        self, x_t: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "sample": x_t,
            "timestep": timestep,
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "return_dict": False,
        }
