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
prompts, cfg=True)`` gives exactly that branch; ``encode_prompt(prompts, negative="")`` gives the
encoding of "" (what the pipeline does for an explicit empty negative prompt).

Timesteps: the pipeline's schedulers (Euler for base, Euler ancestral for Turbo) scale the latent
by ``1 / sqrt(sigma**2 + 1)`` before the UNet, which is exactly the DDPM ``x_t``; so ``add_noise``
(DDPM forward process on the scheduler's betas) gives the UNet input for the integer timestep
``t`` that the UNet receives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.models.base import Conditioning, Model, TextEncoding
from diffprobe.models.registry import register_adapter


@register_adapter
class StableDiffusionXLModel(Model):
    family = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    denoiser_name = "unet"

    def default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * int(self.pipe.vae_scale_factor)

    def size_multiple(self) -> int:
        # the pipeline itself refuses sizes that are not multiples of 8
        return math.lcm(8, int(self.pipe.vae_scale_factor))

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

    def encode_prompt(
        self,
        prompts: Sequence[str],
        negative: Sequence[str] | str | None = None,
        *,
        cfg: bool = False,
    ) -> Conditioning:
        """The pipeline's own ``encode_prompt`` -> :class:`Conditioning` (see the module doc).

        ``negative`` (a string for every item, or one per item) adds the unconditional branch,
        encoded from that text. ``cfg=True`` without ``negative`` adds the unconditional branch
        the pipeline's generation uses when no negative prompt is given (zeros for SDXL base).
        """
        prompts = list(prompts)
        if isinstance(negative, str):
            negative = [negative] * len(prompts)
        with_uncond = cfg or negative is not None
        with torch.no_grad():
            embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
                prompts,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=with_uncond,
                negative_prompt=None if negative is None else list(negative),
            )
        cond = {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled}}
        uncond = None
        if with_uncond:
            uncond = {
                "encoder_hidden_states": negative_embeds,
                "added_cond_kwargs": {"text_embeds": negative_pooled},
            }
        return Conditioning(cond, uncond, prompts)

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
