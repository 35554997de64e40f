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
default image is 32 px: latents 4 x 16 x 16, packed to 64 tokens of 16 channels. Registered for
the ``flux`` adapter as the dummy cases ``"flux"`` (schnell-like) and ``"flux-dev"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffprobe import registry
from diffprobe.testing.cases import DummyCase, register_dummies
from diffprobe.testing.clip import dummy_clip_text_config, dummy_clip_tokenizer
from diffprobe.testing.sd3 import dummy_flow_vae
from diffprobe.testing.t5 import dummy_t5_encoder, dummy_t5_tokenizer

# FLUX.1-schnell's published scheduler: shift 1, no dynamic shifting
SCHNELL_SCHEDULE = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                        max_shift=1.15, shift=1.0)  # fmt: skip


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
    shifting = dict(shift=3.0, use_dynamic_shifting=True) if guidance_embeds else {}
    scheduler = FlowMatchEulerDiscreteScheduler(**{**SCHNELL_SCHEDULE, **shifting})
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
    pipe = registry.adapter("flux").assemble(dummy_flux_components(seed, guidance_embeds))
    pipe.default_sample_size = 16
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pack(latents: torch.Tensor) -> torch.Tensor:
    """2 x 2 patches -> tokens, written out: token (i, j) holds channels c * 4 + 2 di + dj."""
    items, channels, height, width = latents.shape
    patches = latents.reshape(items, channels, height // 2, 2, width // 2, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(items, height * width // 4, channels * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack`: (items, tokens, 4 C) -> (items, C, height, width)."""
    items, _, packed = tokens.shape
    patches = tokens.reshape(items, height // 2, width // 2, packed // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(items, packed // 4, height, width)


def image_ids(height: int, width: int) -> torch.Tensor:
    """(tokens, 3) rows (0, row, column) of the packed latent grid."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()


def _call_transformer(pipe: Any, x_t: torch.Tensor, t: torch.Tensor, branch: Mapping[str, Any]):
    """The transformer on packed latents, timestep sigma (= t / 1000), embedded guidance 3.5
    (the adapter's default) for guidance-distilled models; unpacked again."""
    items, _, height, width = x_t.shape
    embeds = branch["encoder_hidden_states"]
    guided = pipe.transformer.config.guidance_embeds
    out = pipe.transformer(
        hidden_states=pack(x_t),
        timestep=t / 1000,
        guidance=torch.full([items], 3.5) if guided else None,
        pooled_projections=branch["pooled_projections"],
        encoder_hidden_states=embeds,
        txt_ids=torch.zeros(embeds.shape[1], 3),
        img_ids=image_ids(height, width),
        return_dict=False,
    )[0]
    return unpack(out, height, width)


def _full_size_scheduler(alias: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHNELL_SCHEDULE)


_FLUX_SITES = (
    "transformer.transformer_blocks.0",
    "transformer.transformer_blocks.1:encoder_hidden_states",
    "transformer.transformer_blocks.0.attn",
    "transformer.single_transformer_blocks.0",
    "transformer.single_transformer_blocks.1:encoder_hidden_states",
    "transformer.single_transformer_blocks.1:input",
    "text_encoder.encoder.layers.3",
    "text_encoder_2.encoder.block.1",
)
# both block kinds return (text tokens, image tokens); the attention image tokens first
_FLUX_HOOKED = {
    "transformer.transformer_blocks.1": 1,
    "transformer.transformer_blocks.1:encoder_hidden_states": 0,
    "transformer.single_transformer_blocks.0": 1,
    "transformer.transformer_blocks.0.attn": 0,
}
_FLUX_STOP = ("transformer.transformer_blocks.0",
              "transformer.transformer_blocks.1:encoder_hidden_states")  # fmt: skip
# true CFG: a conditional transformer call, then an unconditional one, per step
_TRUE_CFG = {"true_cfg_scale": 2.5, "negative_prompt": ""}

FLUX_CASE = DummyCase(
    name="flux",
    family="flux",
    build=lambda seed: dummy_flux_pipeline(seed),
    call_denoiser=_call_transformer,
    sites=_FLUX_SITES,
    hooked=_FLUX_HOOKED,
    stop_sites=_FLUX_STOP,
    later_site="transformer.single_transformer_blocks.0",
    resolution=32,
    size_multiple=4,
    default_guidance_scale=3.5,
    # schnell's adapter uses 256 T5 tokens; the pipeline's default is 512
    plain_kwargs={"max_sequence_length": 256},
    cfg_kwargs=_TRUE_CFG,
    cfg_calls="calls",
    no_cfg_kwargs={"guidance_scale": 5.0},  # embedded guidance: never CFG
)
FLUX_DEV_CASE = DummyCase(
    name="flux-dev",
    family="flux",
    build=lambda seed: dummy_flux_pipeline(seed, guidance_embeds=True),
    call_denoiser=_call_transformer,
    sites=_FLUX_SITES,
    hooked=_FLUX_HOOKED,
    stop_sites=_FLUX_STOP,
    later_site="transformer.single_transformer_blocks.0",
    resolution=32,
    size_multiple=4,
    default_guidance_scale=3.5,
    cfg_kwargs={"guidance_scale": 3.0, **_TRUE_CFG},
    cfg_calls="calls",
    no_cfg_kwargs={"guidance_scale": 3.0},
)

register_dummies("flux", FLUX_CASE, FLUX_DEV_CASE, scheduler=_full_size_scheduler)
