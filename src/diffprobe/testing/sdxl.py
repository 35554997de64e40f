"""A tiny random ``StableDiffusionXLPipeline``, offline (the sizes of diffusers' own SDXL tests).

UNet (2, 4) channels, 2 layers per block, cross-attention 64 (= 32 + 32 from the two CLIP
encoders), ``text_time`` added conditioning (6 × 8 time features + 32 pooled); VAE (32, 64), so
64 px images have 32 × 32 latents; two 5-layer CLIP text encoders of width 32 (the second with a
32-wide projection); an Euler scheduler.
"""

from __future__ import annotations

import torch

from diffprobe.testing import dummy_clip_text_config, dummy_clip_tokenizer, dummy_vae


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
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
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
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**dummy_sdxl_components(seed), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
