"""Stable Diffusion XL (base 1.0) and SDXL-Turbo.

Pipeline: ``StableDiffusionXLPipeline`` (AutoencoderKL, two CLIP text encoders, one
UNet2DConditionModel with SDXL's added conditioning). Denoiser sites: ``unet.*``; text:
``text_encoder.*`` (CLIP ViT-L) and ``text_encoder_2.*`` (OpenCLIP ViT-bigG, with projection);
VAE: ``vae.*``.

Conditioning (:meth:`StableDiffusionXLModel.encode_prompt`, the pipeline's own ``encode_prompt``):

- ``encoder_hidden_states`` (items, 77, 768 + 1280): the *penultimate* layer of each encoder
  (``hidden_states[-2]``), concatenated along features;
- ``added_cond_kwargs["text_embeds"]`` (items, 1280): ``text_encoder_2``'s projected pooled
  output (final layer norm of the last layer at the end-of-text token, then ``text_projection``);
- ``added_cond_kwargs["time_ids"]`` (items, 6): SDXL's micro-conditioning
  ``(original h, w, crop top, left, target h, w)``. It depends on the image size, not the prompt,
  so it is left out of the conditioning and filled in per denoiser call from the size of ``x_t``
  as ``(H, W, 0, 0, H, W)`` in pixels, which is what the pipeline passes by default. Put your own
  ``time_ids`` into ``cond["added_cond_kwargs"]`` to override it.

CFG: the unconditional branch of SDXL's generation without a negative prompt is *zeros*
(``force_zeros_for_empty_prompt``, on for SDXL base), not the encoding of "". ``encode_prompt(
prompts, cfg=True)`` gives exactly that branch (as for every family: the family's own
unconditional branch); ``encode_prompt(prompts, negative="")`` gives the encoding of "" (what
the pipeline does for an explicit empty negative prompt).

Timesteps: the pipeline's schedulers (Euler for base, Euler ancestral for Turbo) scale the latent
by ``1 / sqrt(sigma**2 + 1)`` before the UNet, which is exactly the DDPM ``x_t``; so ``add_noise``
(DDPM forward process on the scheduler's betas) gives the UNet input for the integer timestep
``t`` that the UNet receives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.hooks.attention import AttentionSite
from diffprobe.models.attention_sites import cross_attention_sites
from diffprobe.models.base import Conditioning, Model, TextEncoding
from diffprobe.models.geometry import BATCH, SizeRule, meta_empty, unet_rule, vae_factor
from diffprobe.models.registry import register_adapter
from diffprobe.models.sd import SD_PIPELINE_MULTIPLE
from diffprobe.models.towers import Tower, clip_layers, clip_width, tokenizer_of
from diffprobe.models.unet import UNET_TUPLE_ELEMENTS, text_unet_inputs

TIME_IDS = 6  # SDXL's micro-conditioning: original size, crop top-left, target size


@register_adapter
class StableDiffusionXLModel(Model):
    family = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    denoiser_name = "unet"
    denoiser_classes = ("UNet2DConditionModel",)
    default_guidance_scale = 7.5
    tuple_elements = UNET_TUPLE_ELEMENTS
    default_encoder = "text_encoder_2"
    assemble_options = {"add_watermarker": False}

    def default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * int(self.pipe.vae_scale_factor)

    @classmethod
    def size_rule_for(cls, configs: Mapping[str, Mapping[str, Any]]) -> SizeRule:
        # the pipeline itself refuses sizes that are not multiples of 8
        return unet_rule(vae_factor(configs.get("vae")), configs["unet"], SD_PIPELINE_MULTIPLE)

    @classmethod
    def claims_denoiser(cls, config: Mapping[str, Any]) -> bool:
        return super().claims_denoiser(config) and config.get("addition_embed_type") == "text_time"

    @classmethod
    def meta_denoiser_inputs(
        cls, config: Mapping[str, Any], geometry: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The SD UNet inputs plus ``added_cond_kwargs``: ``text_embeds`` (the pooled width:
        ``projection_class_embeddings_input_dim`` less the 6 time features) and 6 ``time_ids``."""
        text_embeds = (
            config["projection_class_embeddings_input_dim"]
            - TIME_IDS * config["addition_time_embed_dim"]
        )
        return {
            **text_unet_inputs(config, geometry),
            "added_cond_kwargs": {
                "text_embeds": meta_empty(BATCH, int(text_embeds)),
                "time_ids": meta_empty(BATCH, TIME_IDS),
            },
        }

    @classmethod
    def attention_sites(cls, pipe: Any) -> list[AttentionSite]:
        """UNet cross-attention: every ``attn2``; text keys are the 77 token positions both CLIP encoders share (their features side by side)."""
        return cross_attention_sites(pipe.unet, "unet")

    @classmethod
    def text_towers(cls, pipe: Any) -> dict[str, Tower]:
        """Both CLIP encoders read at ``hidden_states[-2]``, concatenated along features;
        ``text_encoder_2`` alone gives the pooled vector."""
        found: dict[str, Tower] = {}
        start = 0
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, name, None)
            if encoder is None:
                continue
            layers, width = clip_layers(encoder), clip_width(encoder)
            pooled = slice(None) if name == "text_encoder_2" else None
            found[name] = Tower(name, "clip", layers, layers - 1, False, slice(None),
                                slice(start, start + width), pooled, tokenizer_of(name))  # fmt: skip
            start += width
        return found

    def generation_uses_cfg(self, guidance_scale: float) -> bool:
        # same rule as StableDiffusionXLPipeline.do_classifier_free_guidance
        return guidance_scale > 1.0 and self.pipe.unet.config.time_cond_proj_dim is None

    def encode_images(self, images: Any, size: int | None = None) -> torch.Tensor:
        """Pixels -> latents (items, 4, size/f, size/f): the VAE posterior mean, normalised the
        way the pipeline un-normalises before decoding (``latents_mean``/``latents_std`` when the
        VAE config has them, else times ``scaling_factor``). No posterior sample is drawn.

        A float16 VAE with ``force_upcast`` (SDXL's overflows in float16) runs in float32 for the
        call and is cast back, as the pipeline does around decoding."""
        pixels = self.prepare_images(images, size)
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            with torch.no_grad():
                mean = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        config = vae.config
        latents_mean = getattr(config, "latents_mean", None)
        latents_std = getattr(config, "latents_std", None)
        if latents_mean is not None and latents_std is not None:
            shape = (1, -1, 1, 1)
            offset = torch.tensor(latents_mean, device=mean.device, dtype=mean.dtype).view(shape)
            spread = torch.tensor(latents_std, device=mean.device, dtype=mean.dtype).view(shape)
            latents = (mean - offset) * config.scaling_factor / spread
        else:
            latents = mean * config.scaling_factor
        return latents.to(self.dtype)

    def _encode_prompt(
        self, prompts: list[str], negative: list[str] | None, uncond: bool
    ) -> Conditioning:
        """The pipeline's own ``encode_prompt`` -> :class:`Conditioning` (see the module doc);
        without ``negative`` the unconditional branch is the pipeline's default (zeros for
        SDXL base)."""
        with torch.no_grad():
            embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
                prompts,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=uncond,
                negative_prompt=negative,
            )
        cond = {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled}}
        unconditional = None
        if uncond:
            unconditional = {
                "encoder_hidden_states": negative_embeds,
                "added_cond_kwargs": {"text_embeds": negative_pooled},
            }
        return Conditioning(cond, unconditional, prompts)

    def prompt_embeds(self, branch: Mapping[str, Any]) -> tuple[torch.Tensor, Any]:
        return branch["encoder_hidden_states"], branch["added_cond_kwargs"]["text_embeds"]

    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        """Every layer of both encoders (tokens padded to each tokenizer's maximum length).

        ``hidden_states["text_encoder"][-2]`` and ``hidden_states["text_encoder_2"][-2]``
        concatenated along features equal ``encode_prompt(...).cond["encoder_hidden_states"]``;
        the last entry (``[-1]``) is the last layer's output *before* the final layer norm.
        """
        hidden, ids, masks = {}, {}, {}
        pairs = [("text_encoder", self.pipe.tokenizer), ("text_encoder_2", self.pipe.tokenizer_2)]
        for name, tokenizer in pairs:
            encoder = getattr(self.pipe, name)
            if encoder is None:
                continue
            tokens = tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            input_ids = tokens.input_ids.to(encoder.device)
            with torch.no_grad():
                out = encoder(input_ids, output_hidden_states=True)
            hidden[name], ids[name], masks[name] = tuple(out.hidden_states), input_ids, None
        return TextEncoding(hidden, ids, masks)

    def time_ids(self, x_t: torch.Tensor) -> torch.Tensor:
        """SDXL's default micro-conditioning for latents ``x_t`` (items, 4, h, w):
        (items, 6) rows of ``(H, W, 0, 0, H, W)`` with H, W the image size in pixels."""
        factor = int(self.pipe.vae_scale_factor)
        height, width = int(x_t.shape[-2]) * factor, int(x_t.shape[-1]) * factor
        row = torch.tensor([[height, width, 0, 0, height, width]], dtype=x_t.dtype)
        return row.to(x_t.device).repeat(x_t.shape[0], 1)

    def denoiser_kwargs(
        self, x_t: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]
    ) -> dict[str, Any]:
        added = dict(cond.get("added_cond_kwargs") or {})
        if "text_embeds" not in added:
            raise DiffprobeError(
                "SDXL conditioning needs added_cond_kwargs['text_embeds'] (the pooled "
                "text_encoder_2 output); build it with model.encode_prompt(prompts)"
            )
        added.setdefault("time_ids", self.time_ids(x_t))
        return {
            "sample": x_t,
            "timestep": timestep,
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "added_cond_kwargs": added,
            "return_dict": False,
        }
