"""A tiny random ``StableDiffusion3Pipeline``, offline (sizes as in diffusers' SD3 tests).

Components, mirroring SD3's layout at toy width:

- ``text_encoder`` / ``text_encoder_2``: ``CLIPTextModelWithProjection`` "CLIP-L" (width 32) and
  "CLIP-G" (width 48), 5 layers, projections 32 + 32 = the 64-wide pooled vector;
- ``text_encoder_3``: a 2-block T5 encoder of width 96 (= ``joint_attention_dim``), so the
  80-wide CLIP concatenation is zero-padded to it as in the real model (2048 -> 4096);
- ``transformer``: ``SD3Transformer2DModel`` with 3 joint blocks (the last one
  ``context_pre_only``), patch 2, 4 heads of 8, latent ``sample_size`` 16;
- ``vae``: a 2-level ``AutoencoderKL`` (factor 2, 4 latent channels) with SD3's
  ``shift_factor``/``scaling_factor`` and no quant convs;
- ``scheduler``: ``FlowMatchEulerDiscreteScheduler(shift=3.0)``, SD3's sampling shift.

Default image size 16 x 2 = 32 px (latents 4 x 16 x 16, 64 image tokens).
``variant="3.5"`` adds SD3.5's RMS q/k norm and a dual-attention first block. Registered for
the ``sd3`` adapter as the dummy cases ``"sd3"`` and ``"sd3.5"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffprobe import registry
from diffprobe.errors import DiffprobeError
from diffprobe.testing.cases import DummyCase, register_dummies
from diffprobe.testing.clip import dummy_clip_text_config, dummy_clip_tokenizer
from diffprobe.testing.t5 import dummy_t5_encoder, dummy_t5_tokenizer


def dummy_flow_vae(latent_channels: int = 4, seed: int = 0):
    """A 2-level AutoencoderKL (factor 2) shaped like the SD3/FLUX VAE: shift and scaling
    factors, no quant convs."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return vae.eval()


def dummy_sd3_components(seed: int = 0, variant: str = "3") -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    if variant not in ("3", "3.5"):
        raise DiffprobeError(f"variant must be '3' or '3.5', not {variant!r}")
    extra = dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if variant == "3.5" else {}
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=96,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        **extra,
    )
    tokenizer, tokenizer_2 = dummy_clip_tokenizer(), dummy_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(dummy_clip_text_config(tokenizer, projection=32))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(
        dummy_clip_text_config(tokenizer_2, projection=32, hidden_size=48)
    )
    tokenizer_3 = dummy_t5_tokenizer()
    text_encoder_3 = dummy_t5_encoder(tokenizer_3, d_model=96, seed=seed)
    return dict(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=dummy_flow_vae(seed=seed),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        image_encoder=None,
        feature_extractor=None,
    )


def dummy_sd3_pipeline(seed: int = 0, variant: str = "3"):
    """A random StableDiffusion3Pipeline (``variant`` "3" or "3.5"), progress bar off."""
    pipe = registry.adapter("sd3").assemble(dummy_sd3_components(seed, variant))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_transformer(pipe: Any, x_t: torch.Tensor, t: torch.Tensor, branch: Mapping[str, Any]):
    return pipe.transformer(
        hidden_states=x_t,
        timestep=t,
        encoder_hidden_states=branch["encoder_hidden_states"],
        pooled_projections=branch["pooled_projections"],
        return_dict=False,
    )[0]


def _full_size_scheduler(alias: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


_SD3_SITES = (
    "transformer.transformer_blocks.0",
    "transformer.transformer_blocks.1",
    "transformer.transformer_blocks.1:encoder_hidden_states",
    "transformer.transformer_blocks.0.attn",
    "transformer.transformer_blocks.2:input",
    "text_encoder.text_model.encoder.layers.3",
    "text_encoder_3.encoder.block.1",
)
# JointTransformerBlock returns (text tokens, image tokens); the attention image tokens first
_SD3_HOOKED = {
    "transformer.transformer_blocks.1": 1,
    "transformer.transformer_blocks.1:encoder_hidden_states": 0,
    "transformer.transformer_blocks.0.attn": 0,
}
_SD3_STOP = (
    "transformer.transformer_blocks.0",
    "transformer.transformer_blocks.0:encoder_hidden_states",
)

SD3_CASE = DummyCase(
    name="sd3",
    family="sd3",
    build=lambda seed: dummy_sd3_pipeline(seed),
    call_denoiser=_call_transformer,
    sites=_SD3_SITES,
    hooked=_SD3_HOOKED,
    stop_sites=_SD3_STOP,
    later_site="transformer.transformer_blocks.1",
    resolution=32,
    size_multiple=4,
    default_guidance_scale=7.0,
)
SD35_CASE = DummyCase(
    name="sd3.5",
    family="sd3",
    build=lambda seed: dummy_sd3_pipeline(seed, variant="3.5"),
    call_denoiser=_call_transformer,
    sites=(*_SD3_SITES, "transformer.transformer_blocks.0.attn2"),
    hooked={**_SD3_HOOKED, "transformer.transformer_blocks.0.attn2": 0},
    stop_sites=_SD3_STOP,
    later_site="transformer.transformer_blocks.1",
    resolution=32,
    size_multiple=4,
    default_guidance_scale=7.0,
)

register_dummies("sd3", SD3_CASE, SD35_CASE, scheduler=_full_size_scheduler)
