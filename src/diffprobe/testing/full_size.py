"""Full-size pipelines with random weights, built from the configs shipped with diffprobe.

Random weights have exactly the FLOPs and memory of the published models, so these measure
speed honestly (never quality). Tokenizers are diffprobe's offline stand-ins (their ids are in
range of the real vocabularies); schedulers use the published schedule settings.
"""

from __future__ import annotations

import torch

from diffprobe.models import meta
from diffprobe.testing import SD_SCHEDULE


def random_pipeline(
    alias: str, device: str = "cpu", dtype: torch.dtype = torch.float32, t5: bool = False
):
    """A pipeline of ``alias``'s architecture with random weights on ``device``.

    Families: sd (sd1.5, sd2.1, sd2.1-base, sd-turbo) and sd3 (sd3, sd3.5). For sd3 the T5-XXL
    encoder (4.7 B parameters, irrelevant to denoiser speed) is left out unless ``t5=True``;
    the pipeline then feeds zeros in its place, as diffusers does without it.
    """
    from diffprobe.testing import dummy_clip_tokenizer

    def build(component: str):
        return meta.build_component(alias, component, device=device, dtype=dtype)

    names = meta.components(alias)
    if "unet" in names:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=build("vae"),
            text_encoder=build("text_encoder"),
            tokenizer=dummy_clip_tokenizer(),
            unet=build("unet"),
            scheduler=DDIMScheduler(**SD_SCHEDULE),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif "transformer" in names and "text_encoder_3" in names:
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        from diffprobe.testing.t5 import dummy_t5_tokenizer

        pipe = StableDiffusion3Pipeline(
            transformer=build("transformer"),
            vae=build("vae"),
            text_encoder=build("text_encoder"),
            tokenizer=dummy_clip_tokenizer(),
            text_encoder_2=build("text_encoder_2"),
            tokenizer_2=dummy_clip_tokenizer(),
            text_encoder_3=build("text_encoder_3") if t5 else None,
            tokenizer_3=dummy_t5_tokenizer() if t5 else None,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
    else:
        raise ValueError(f"random_pipeline supports the sd and sd3 families, not '{alias}'")
    pipe.set_progress_bar_config(disable=True)
    return pipe
