"""What the UNet families (SD, SDXL, IF, DDPM) share: the tuple elements of diffusers' UNet
blocks and the meta-device inputs of a UNet."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from diffprobe.models.geometry import BATCH, CLIP_TOKENS, ConfigError, meta_empty

# Down blocks return (hidden_states, res_samples); the skip variants add skip_sample.
UNET_TUPLE_ELEMENTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "DownBlock2D": ("hidden_states", "res_samples"),
        "CrossAttnDownBlock2D": ("hidden_states", "res_samples"),
        "SimpleCrossAttnDownBlock2D": ("hidden_states", "res_samples"),
        "AttnDownBlock2D": ("hidden_states", "res_samples"),
        "ResnetDownsampleBlock2D": ("hidden_states", "res_samples"),
        "KDownBlock2D": ("hidden_states", "res_samples"),
        "KCrossAttnDownBlock2D": ("hidden_states", "res_samples"),
        "SkipDownBlock2D": ("hidden_states", "res_samples", "skip_sample"),
        "AttnSkipDownBlock2D": ("hidden_states", "res_samples", "skip_sample"),
    }
)


def unet_inputs(config: Mapping[str, Any], geometry: Mapping[str, Any]) -> dict[str, Any]:
    """``sample`` and ``timestep`` of any UNet, plus the class labels and ``timestep_cond`` its
    config asks for."""
    inputs: dict[str, Any] = {
        "sample": meta_empty(BATCH, *geometry["input_shape"]),
        "timestep": meta_empty(BATCH),
    }
    kind = config.get("class_embed_type")
    if kind == "projection":
        width = int(config["projection_class_embeddings_input_dim"])
        inputs["class_labels"] = meta_empty(BATCH, width)
    elif kind == "timestep":
        inputs["class_labels"] = meta_empty(BATCH)
    elif kind is None and config.get("num_class_embeds"):
        inputs["class_labels"] = meta_empty(BATCH, dtype=torch.long)
    elif kind not in (None, "identity"):
        raise ConfigError(f"cannot make dummy inputs for class_embed_type {kind!r}")
    if config.get("time_cond_proj_dim"):
        inputs["timestep_cond"] = meta_empty(BATCH, int(config["time_cond_proj_dim"]))
    return inputs


def text_unet_inputs(config: Mapping[str, Any], geometry: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`unet_inputs` plus ``encoder_hidden_states`` of 77 tokens, ``encoder_hid_dim`` wide
    when set (IF's T5 states), else ``cross_attention_dim``."""
    width = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    if isinstance(width, (list, tuple)):
        width = width[0]
    return {
        **unet_inputs(config, geometry),
        "encoder_hidden_states": meta_empty(BATCH, CLIP_TOKENS, int(width)),
    }
