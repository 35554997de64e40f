"""A tiny random DeepFloyd ``IFPipeline`` (stage I), offline.

UNet as in diffusers' own IF tests: (32, 64) channels, simple cross-attention blocks, 3 input and
6 output channels (noise and variance), 32 px native size; a 5-block T5 v1.1 encoder of width 32
and a character-level T5 tokenizer from :mod:`diffprobe.testing.t5`; IF's DDPM scheduler (cosine
schedule, learned-range variance, dynamic thresholding). Registered for the ``if`` adapter as the
dummy case ``"if"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffprobe import registry
from diffprobe.testing.cases import DummyCase, register_dummies
from diffprobe.testing.t5 import dummy_t5_encoder, dummy_t5_tokenizer

# IF stage I's published DDPM settings, shared by the dummy and full-size pipelines
IF_SCHEDULE = dict(
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
    scheduler = DDPMScheduler(**IF_SCHEDULE)
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
    pipe = registry.adapter("if").assemble(dummy_if_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_unet(pipe: Any, x_t: torch.Tensor, t: torch.Tensor, branch: Mapping[str, Any]):
    """The noise half of the UNet's (noise, variance) output."""
    out = pipe.unet(x_t, t, encoder_hidden_states=branch["encoder_hidden_states"]).sample
    return out[:, : pipe.unet.config.in_channels]


def _full_size_scheduler(alias: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**IF_SCHEDULE)


IF_CASE = DummyCase(
    name="if",
    family="if",
    build=lambda seed: dummy_if_pipeline(seed),
    call_denoiser=_call_unet,
    sites=(
        "unet:input",
        "unet.down_blocks.1",
        "unet.down_blocks.1.attentions.0",
        "unet.down_blocks.0.resnets.0",
        "unet.mid_block",
        "unet.up_blocks.0.attentions.1",
        "unet.up_blocks.1:input",
        "text_encoder.encoder.block.2",
    ),
    hooked={
        "unet.down_blocks.1": 0,
        "unet.down_blocks.1.attentions.0": 0,
        "unet.mid_block": 0,
        "text_encoder.encoder.block.3": 0,
    },
    stop_sites=("unet.down_blocks.1.attentions.0", "unet.mid_block"),
    later_site="unet.conv_out",
    resolution=32,
    size_multiple=2,
    default_guidance_scale=7.0,
    # bs4/ftfy may be absent, and diffprobe encodes the uncleaned text everywhere
    plain_kwargs={"clean_caption": False},
)

register_dummies("if", IF_CASE, scheduler=_full_size_scheduler)
