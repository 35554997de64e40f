"""DeepFloyd IF, stage I (64 px).

Pipeline: ``IFPipeline`` (T5 encoder, one UNet2DConditionModel in pixel space, DDPM scheduler
with learned variance). Denoiser sites: ``unet.*``; text: ``text_encoder.*`` (T5 encoder:
``text_encoder.encoder.block.N``, ``text_encoder.encoder.final_layer_norm``). There is no VAE:
the denoiser works on pixels in [-1, 1], so ``encode_images`` only resizes and rescales.

The UNet predicts noise *and* variance: 2 × 3 output channels. :meth:`IFModel.denoise` returns
the noise prediction (the first ``in_channels`` channels), with CFG applied to it as the pipeline
does; the variance channels are what the scheduler uses for its step, and are dropped.

Prompts: the pipeline lower-cases and strips every prompt (``clean_caption=False``), or with
``clean_caption=True`` (the default of ``IFPipeline.__call__``) rewrites captions with bs4 and ftfy
when those are installed. diffprobe uses ``clean_caption=False`` everywhere, in ``encode_prompt``,
``encode_text`` and ``generate`` alike, so that generation sees exactly the text that is encoded;
pass ``clean_caption=True`` to ``generate`` to get the pipeline's default.

CFG: ``guidance_scale > 1`` (the pipeline's rule); its unconditional branch is the T5 encoding of
"" (``encode_prompt(prompts, negative="")``). Timesteps are the integer DDPM timesteps of the
training schedule; ``add_noise`` is the scheduler's own forward process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffprobe.hooks.attention import AttentionSite
from diffprobe.models.attention_sites import added_kv_sites
from diffprobe.models.base import Conditioning, Model, TextEncoding
from diffprobe.models.registry import register_adapter
from diffprobe.models.towers import Tower, last_layer_tower
from diffprobe.models.unet import UNET_TUPLE_ELEMENTS, text_unet_inputs

# IFPipeline.encode_prompt pads and truncates to 77 T5 tokens (IF was trained with that length)
IF_MAX_TOKENS = 77


@register_adapter
class IFModel(Model):
    family = "if"
    pipeline_classes = ("IFPipeline",)
    denoiser_name = "unet"
    denoiser_classes = ("UNet2DConditionModel",)
    default_guidance_scale = 7.0
    tuple_elements = UNET_TUPLE_ELEMENTS
    default_encoder = "text_encoder"
    assemble_options = {"requires_safety_checker": False}

    @classmethod
    def claims_denoiser(cls, config: Mapping[str, Any]) -> bool:
        # IF's UNet projects T5 states (encoder_hid_dim) and adds them ("text")
        return super().claims_denoiser(config) and config.get("addition_embed_type") == "text"

    @classmethod
    def meta_denoiser_inputs(
        cls, config: Mapping[str, Any], geometry: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Pixels (3, size, size), a timestep, 77 T5 states ``encoder_hid_dim`` wide."""
        return text_unet_inputs(config, geometry)

    @classmethod
    def t5_tokens(cls, denoiser_config: Mapping[str, Any] | None) -> int:
        return IF_MAX_TOKENS

    @classmethod
    def attention_sites(cls, pipe: Any) -> list[AttentionSite]:
        """Attention with added text keys and values, ``[text, image]`` keys; text keys are the T5 tokens."""
        return added_kv_sites(pipe.unet, "unet")

    @classmethod
    def text_towers(cls, pipe: Any) -> dict[str, Tower]:
        """One T5 encoder whose last hidden state is ``prompt_embeds``."""
        return {"text_encoder": last_layer_tower("text_encoder", pipe.text_encoder, "t5")}

    def generation_uses_cfg(self, guidance_scale: float) -> bool:
        # same rule as IFPipeline.__call__ (do_classifier_free_guidance = guidance_scale > 1.0)
        return guidance_scale > 1.0

    def encode_images(self, images: Any, size: int | None = None) -> torch.Tensor:
        """Pixels -> denoiser inputs (items, 3, size, size): the pixels themselves in [-1, 1]."""
        return self.prepare_images(images, size)

    def _preprocess(self, prompts: Sequence[str]) -> list[str]:
        # the pipeline's own text normalisation, so encode_text sees what encode_prompt sees
        return self.pipe._text_preprocessing(list(prompts), clean_caption=False)

    def _encode_prompt(
        self, prompts: list[str], negative: list[str] | None, uncond: bool
    ) -> Conditioning:
        """The pipeline's own ``encode_prompt``: T5 last hidden state (items, 77, width); the
        pipeline's unconditional default is the encoding of ""."""
        with torch.no_grad():
            cond, unconditional = self.pipe.encode_prompt(
                prompts,
                do_classifier_free_guidance=uncond,
                num_images_per_prompt=1,
                device=self.device,
                negative_prompt=negative,
                clean_caption=False,
            )
        return Conditioning(
            {"encoder_hidden_states": cond},
            {"encoder_hidden_states": unconditional} if uncond else None,
            prompts,
        )

    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        """Every T5 layer: ``hidden_states["text_encoder"]`` is (embeddings, block 1, ...,
        block L); the last entry is after the final layer norm and equals
        ``encode_prompt(...).cond["encoder_hidden_states"]``. Padding tokens are masked in
        attention (``attention_mask``), as in the pipeline, but still have hidden states."""
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        tokens = tokenizer(
            self._preprocess(prompts),
            padding="max_length",
            max_length=self.t5_tokens(None),
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(encoder.device)
        mask = tokens.attention_mask.to(encoder.device)
        with torch.no_grad():
            out = encoder(ids, attention_mask=mask, output_hidden_states=True)
        return TextEncoding(
            {"text_encoder": tuple(out.hidden_states)},
            {"text_encoder": ids},
            {"text_encoder": mask},
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

    def _prediction(self, output: Any) -> torch.Tensor:
        """The noise prediction: the first ``in_channels`` of the (noise, variance) output."""
        prediction = output[0] if isinstance(output, tuple) else output.sample
        return prediction[:, : self.pipe.unet.config.in_channels]

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        steps: int = 25,
        guidance_scale: float | None = None,
        seed: int | Sequence[int] = 0,
        size: int | None = None,
        output_type: str = "np",
        **pipeline_kwargs: Any,
    ) -> Any:
        """``IFPipeline.__call__`` with ``clean_caption=False`` unless given (see module doc);
        returns (items, H, W, 3) floats in [0, 1] for ``output_type="np"``."""
        pipeline_kwargs.setdefault("clean_caption", False)
        return super().generate(
            prompts,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            size=size,
            output_type=output_type,
            **pipeline_kwargs,
        )
