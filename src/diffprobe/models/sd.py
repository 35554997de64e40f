"""Stable Diffusion 1.x, 2.x (epsilon and v-prediction), SD-Turbo, and diffprobe's ``tiny``.

Pipeline: ``StableDiffusionPipeline`` (AutoencoderKL, one CLIP text encoder,
UNet2DConditionModel). Denoiser sites: ``unet.*``; text: ``text_encoder.*``; VAE: ``vae.*``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffprobe.hooks.attention import AttentionSite
from diffprobe.models.attention_sites import cross_attention_sites
from diffprobe.models.base import Conditioning, Model, TextEncoding
from diffprobe.models.geometry import SizeRule, unet_rule, vae_factor
from diffprobe.models.registry import register_adapter
from diffprobe.models.towers import Tower, last_layer_tower
from diffprobe.models.unet import UNET_TUPLE_ELEMENTS, text_unet_inputs

# StableDiffusionPipeline.check_inputs (and SDXL's) demand multiples of 8 whatever the VAE
SD_PIPELINE_MULTIPLE = 8


@register_adapter
class StableDiffusionModel(Model):
    family = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    denoiser_name = "unet"
    denoiser_classes = ("UNet2DConditionModel",)
    default_guidance_scale = 7.5
    tuple_elements = UNET_TUPLE_ELEMENTS
    default_encoder = "text_encoder"
    assemble_options = {"requires_safety_checker": False}

    @classmethod
    def size_rule_for(cls, configs: Mapping[str, Mapping[str, Any]]) -> SizeRule:
        return unet_rule(vae_factor(configs.get("vae")), configs["unet"], SD_PIPELINE_MULTIPLE)

    @classmethod
    def claims_denoiser(cls, config: Mapping[str, Any]) -> bool:
        # SDXL ("text_time") and IF ("text") add conditioning to the same UNet class
        return super().claims_denoiser(config) and config.get("addition_embed_type") is None

    @classmethod
    def meta_denoiser_inputs(
        cls, config: Mapping[str, Any], geometry: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``sample`` (latent channels, size/f, size/f), a timestep, ``encoder_hidden_states``
        of 77 CLIP tokens (``cross_attention_dim`` wide)."""
        return text_unet_inputs(config, geometry)

    @classmethod
    def attention_sites(cls, pipe: Any) -> list[AttentionSite]:
        """UNet cross-attention: every ``attn2``; text keys are the CLIP tokens."""
        return cross_attention_sites(pipe.unet, "unet")

    @classmethod
    def text_towers(cls, pipe: Any) -> dict[str, Tower]:
        """One CLIP encoder whose final-normed last layer is ``prompt_embeds``."""
        return {"text_encoder": last_layer_tower("text_encoder", pipe.text_encoder, "clip")}

    @classmethod
    def load_kwargs(cls, spec: Any) -> dict[str, Any]:
        # the published SD checkpoints ship a safety checker that diffprobe never runs;
        # diffprobe's own tiny has none to leave out
        if spec.alias in (None, "tiny"):
            return {}
        return {"safety_checker": None, "requires_safety_checker": False}

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

    def _encode_prompt(
        self, prompts: list[str], negative: list[str] | None, uncond: bool
    ) -> Conditioning:
        """The pipeline's own ``encode_prompt`` (its unconditional default: the encoding of "")."""
        with torch.no_grad():
            cond, unconditional = self.pipe.encode_prompt(
                prompts, self.device, 1, uncond, negative_prompt=negative
            )
        return Conditioning(
            {"encoder_hidden_states": cond},
            {"encoder_hidden_states": unconditional} if uncond else None,
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
