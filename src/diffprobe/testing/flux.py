"""A tiny random ``FluxPipeline``, offline (sizes as in diffusers' FLUX tests).

Components, mirroring FLUX's layout at toy width:

- ``text_encoder``: ``CLIPTextModel`` (width 32, 5 layers); FLUX uses only its pooled output;
- ``text_encoder_2``: a 2-block T5 encoder of width 32 (= ``joint_attention_dim``);
- ``transformer``: ``FluxTransformer2DModel`` with 2 double-stream and 2 single-stream blocks,
  2 heads of 16, RoPE axes (4, 4, 8), ``in_channels`` 16 = 4 latent channels x 2 x 2 packing;
  ``guidance_embeds=True`` builds a "dev"-like model, False (default) a "schnell"-like one;
- ``vae``: the 2-level flow VAE of :mod:`diffprobe.testing.sd3` (factor 2, 4 latent channels);
- ``scheduler``: schnell's ``FlowMatchEulerDiscreteScheduler`` config (shift 1, no dynamic
  shifting), or dev's (shift 3, dynamic shifting) when ``guidance_embeds``.

The pipeline's ``default_sample_size`` (128 latent pixels in diffusers) is set to 16, so the
default image is 32 px: latents 4 x 16 x 16, packed to 64 tokens of 16 channels.
"""

from __future__ import annotations

import torch

from diffprobe.testing import dummy_clip_text_config, dummy_clip_tokenizer
from diffprobe.testing.sd3 import dummy_flow_vae
from diffprobe.testing.t5 import dummy_t5_encoder, dummy_t5_tokenizer


def dummy_flux_components(seed: int = 0, guidance_embeds: bool = False) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    tokenizer = dummy_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(dummy_clip_text_config(tokenizer))
    tokenizer_2 = dummy_t5_tokenizer()
    text_encoder_2 = dummy_t5_encoder(tokenizer_2, d_model=32, seed=seed)
    shifting = dict(shift=3.0, use_dynamic_shifting=True) if guidance_embeds else dict(shift=1.0)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
        **shifting,
    )
    return dict(
        transformer=transformer.eval(),
        scheduler=scheduler,
        vae=dummy_flow_vae(seed=seed),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        image_encoder=None,
        feature_extractor=None,
    )


def dummy_flux_pipeline(seed: int = 0, guidance_embeds: bool = False):
    """A random FluxPipeline ("schnell"-like, or "dev"-like with ``guidance_embeds``)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**dummy_flux_components(seed, guidance_embeds))
    pipe.default_sample_size = 16
    pipe.set_progress_bar_config(disable=True)
    return pipe
