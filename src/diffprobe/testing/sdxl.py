"""A tiny random ``StableDiffusionXLPipeline``, offline (the sizes of diffusers' own SDXL tests).

UNet (2, 4) channels, 2 layers per block, cross-attention 64 (= 32 + 32 from the two CLIP
encoders), ``text_time`` added conditioning (6 × 8 time features + 32 pooled); VAE (32, 64), so
64 px images have 32 × 32 latents; two 5-layer CLIP text encoders of width 32 (the second with a
32-wide projection); an Euler scheduler. Registered for the ``sdxl`` adapter as the dummy case
``"sdxl"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffprobe import registry
from diffprobe.testing.cases import DummyCase, register_dummies
from diffprobe.testing.clip import dummy_clip_text_config, dummy_clip_tokenizer
from diffprobe.testing.sd import dummy_vae

# SDXL's published Euler settings, shared by the dummy and full-size pipelines
SDXL_SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    steps_offset=1,
    beta_schedule="scaled_linear",
    timestep_spacing="leading",
)


def dummy_sdxl_components(seed: int = 0) -> dict:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULE)
    vae = dummy_vae(seed=seed)
    tokenizer, tokenizer_2 = dummy_clip_tokenizer(), dummy_clip_tokenizer()
    config = dummy_clip_text_config(tokenizer, projection=32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config).eval()
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    return dict(
        unet=unet.eval(),
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        image_encoder=None,
        feature_extractor=None,
    )


def dummy_sdxl_pipeline(seed: int = 0):
    """A random ``StableDiffusionXLPipeline`` (64 px native size, no watermarker)."""
    pipe = registry.adapter("sdxl").assemble(dummy_sdxl_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_unet(pipe: Any, x_t: torch.Tensor, t: torch.Tensor, branch: Mapping[str, Any]):
    """The UNet with SDXL's default micro-conditioning (H, W, 0, 0, H, W) in pixels."""
    factor = int(pipe.vae_scale_factor)
    height, width = int(x_t.shape[-2]) * factor, int(x_t.shape[-1]) * factor
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=x_t.dtype)
    added = {
        "text_embeds": branch["added_cond_kwargs"]["text_embeds"],
        "time_ids": time_ids.repeat(x_t.shape[0], 1),
    }
    return pipe.unet(
        x_t, t, encoder_hidden_states=branch["encoder_hidden_states"], added_cond_kwargs=added
    ).sample


def _full_size_scheduler(alias: str):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SDXL_SCHEDULE)


SDXL_CASE = DummyCase(
    name="sdxl",
    family="sdxl",
    build=lambda seed: dummy_sdxl_pipeline(seed),
    call_denoiser=_call_unet,
    sites=(
        "unet:input",
        "unet.down_blocks.1",
        "unet.down_blocks.1.attentions.0",
        "unet.down_blocks.0.resnets.1",
        "unet.mid_block",
        "unet.up_blocks.0.attentions.1",
        "unet.up_blocks.1:input",
        "text_encoder.encoder.layers.2",
        "text_encoder_2.text_model.encoder.layers.4",
    ),
    hooked={
        "unet.down_blocks.1": 0,
        "unet.down_blocks.1.attentions.0": 0,
        "unet.up_blocks.0.resnets.2": 0,
    },
    stop_sites=("unet.down_blocks.1.attentions.0", "unet.mid_block"),
    later_site="unet.conv_out",
    resolution=64,
    size_multiple=8,
    default_guidance_scale=7.5,
    # SDXL-Turbo samples with guidance 0: no CFG
    no_cfg_kwargs={"guidance_scale": 0.0},
)

register_dummies("sdxl", SDXL_CASE, scheduler=_full_size_scheduler)
