"""A tiny random unconditional ``DDPMPipeline`` / ``DDIMPipeline``, offline.

UNet2DModel as in diffusers' own DDPM tests: (32, 64) channels, 2 layers per block, an attention
down and up block, 32 px pixels; a default DDPM (or DDIM) scheduler of 1000 steps. Registered for
the ``ddpm`` adapter as the dummy cases ``"ddpm"`` and ``"ddim"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffprobe import registry
from diffprobe.testing.cases import DummyCase, register_dummies


def dummy_ddpm_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def dummy_ddpm_pipeline(seed: int = 0, ddim: bool = False):
    """A random ``DDPMPipeline`` (or ``DDIMPipeline`` with ``ddim=True``), 32 px."""
    from diffusers import DDIMScheduler, DDPMScheduler

    components = {
        "unet": dummy_ddpm_unet(seed),
        "scheduler": DDIMScheduler() if ddim else DDPMScheduler(),
    }
    pipeline = "DDIMPipeline" if ddim else "DDPMPipeline"
    pipe = registry.adapter("ddpm").assemble(components, pipeline=pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_unet(pipe: Any, x_t: torch.Tensor, t: torch.Tensor, branch: Mapping[str, Any]):
    return pipe.unet(x_t, t).sample


def _full_size_scheduler(alias: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler()  # 1000 linear steps, as google/ddpm-celebahq-256 ships


_DDPM = dict(
    family="ddpm",
    call_denoiser=_call_unet,
    sites=(
        "unet:input",
        "unet.down_blocks.1",
        "unet.down_blocks.1.attentions.0",
        "unet.down_blocks.0.resnets.1",
        "unet.mid_block",
        "unet.up_blocks.0.attentions.1",
        "unet.up_blocks.1:input",
    ),
    hooked={
        "unet.down_blocks.1": 0,
        "unet.down_blocks.1.attentions.0": 0,
        "unet.mid_block": 0,
        "unet.up_blocks.0.resnets.2": 0,
    },
    stop_sites=("unet.down_blocks.0.resnets.1", "unet.mid_block"),
    later_site="unet.conv_out",
    resolution=32,
    size_multiple=2,
    default_guidance_scale=None,
    cfg_kwargs=None,
    no_cfg_kwargs={},
    unconditional=True,
)
DDPM_CASE = DummyCase(name="ddpm", build=lambda seed: dummy_ddpm_pipeline(seed), **_DDPM)
DDIM_CASE = DummyCase(name="ddim", build=lambda seed: dummy_ddpm_pipeline(seed, ddim=True), **_DDPM)

register_dummies("ddpm", DDPM_CASE, DDIM_CASE, scheduler=_full_size_scheduler)
