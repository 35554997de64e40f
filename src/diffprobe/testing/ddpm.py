"""A tiny random unconditional ``DDPMPipeline`` / ``DDIMPipeline``, offline.

UNet2DModel as in diffusers' own DDPM tests: (32, 64) channels, 2 layers per block, an attention
down and up block, 32 px pixels; a default DDPM (or DDIM) scheduler of 1000 steps.
"""

from __future__ import annotations

import torch


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
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    unet = dummy_ddpm_unet(seed)
    if ddim:
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
