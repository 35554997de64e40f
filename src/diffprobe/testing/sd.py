"""A tiny random ``StableDiffusionPipeline``, offline (the sizes of diffusers' own SD tests).

UNet (32, 64) channels, 2 layers per block, cross-attention 32; VAE (32, 64), so 64 px images
have 32 × 32 latents; a 5-layer CLIP text encoder of width 32; DDIM with SD's published
schedule. Registered for the ``sd`` adapter as the dummy case ``"sd"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffprobe import registry
from diffprobe.testing.cases import DummyCase, register_dummies
from diffprobe.testing.clip import dummy_clip_text_config, dummy_clip_tokenizer

# Stable Diffusion's published DDIM settings, shared by the dummy and full-size pipelines
SD_SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def dummy_vae(latent_channels: int = 4, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=32,
    )


def dummy_sd_components(seed: int = 0) -> dict:
    """Components of a random StableDiffusionPipeline (64 px images, 32 px latents... as in
    diffusers' tests: UNet (32, 64) blocks, cross-attention 32)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    scheduler = DDIMScheduler(**SD_SCHEDULE)
    vae = dummy_vae(seed=seed)
    tokenizer = dummy_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(dummy_clip_text_config(tokenizer)).eval()
    return dict(
        unet=unet.eval(),
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
    )


def dummy_sd_pipeline(seed: int = 0):
    """A random ``StableDiffusionPipeline`` (64 px native size, no safety checker)."""
    pipe = registry.adapter("sd").assemble(dummy_sd_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_unet(pipe: Any, x_t: torch.Tensor, t: torch.Tensor, branch: Mapping[str, Any]):
    return pipe.unet(x_t, t, encoder_hidden_states=branch["encoder_hidden_states"]).sample


def _full_size_scheduler(alias: str):
    from diffusers import DDIMScheduler

    prediction = registry.resolve(alias).prediction_type  # SD 2.1 (768) is v-prediction
    return DDIMScheduler(**SD_SCHEDULE, prediction_type=prediction)


SD_CASE = DummyCase(
    name="sd",
    family="sd",
    build=lambda seed: dummy_sd_pipeline(seed),
    call_denoiser=_call_unet,
    sites=(
        "unet:input",
        "unet.down_blocks.1",
        "unet.down_blocks.1.attentions.0",
        "unet.down_blocks.0.resnets.1",
        "unet.mid_block",
        "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2",
        "unet.up_blocks.1:input",
        "text_encoder.encoder.layers.3",
        "vae.decoder.mid_block",
    ),
    hooked={
        "unet.down_blocks.1": 0,
        "unet.down_blocks.1.attentions.0": 0,
        "unet.mid_block": 0,
        "unet.up_blocks.0.resnets.2": 0,
    },
    stop_sites=("unet.down_blocks.1.attentions.0", "unet.mid_block"),
    later_site="unet.conv_out",
    resolution=64,
    size_multiple=8,
    default_guidance_scale=7.5,
)

register_dummies("sd", SD_CASE, scheduler=_full_size_scheduler)
