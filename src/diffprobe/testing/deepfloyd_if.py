"""A tiny random DeepFloyd ``IFPipeline`` (stage I), offline.

UNet as in diffusers' own IF tests: (32, 64) channels, simple cross-attention blocks, 3 input and
6 output channels (noise and variance), 32 px native size; a 5-block T5 v1.1 encoder of width 32
and a character-level T5 tokenizer from :mod:`diffprobe.testing.t5`; IF's DDPM scheduler (cosine
schedule, learned-range variance, dynamic thresholding).
"""

from __future__ import annotations

import torch

from diffprobe.testing.t5 import dummy_t5_encoder, dummy_t5_tokenizer


def dummy_if_components(seed: int = 0) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    tokenizer = dummy_t5_tokenizer()
    text_encoder = dummy_t5_encoder(tokenizer, d_model=32, num_layers=5, seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        layers_per_block=1,
        block_out_channels=[32, 64],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        in_channels=3,
        out_channels=6,
        cross_attention_dim=32,
        encoder_hid_dim=32,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        beta_start=0.0001,
        beta_end=0.02,
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        prediction_type="epsilon",
        variance_type="learned_range",
    )
    return dict(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        watermarker=None,
        safety_checker=None,
        feature_extractor=None,
    )


def dummy_if_pipeline(seed: int = 0):
    """A random ``IFPipeline`` (32 px native size, no safety checker, no watermarker)."""
    from diffusers import IFPipeline

    pipe = IFPipeline(**dummy_if_components(seed), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
