"""Tiny seeded components for tests, built offline (the sizes diffusers' own tests use).

``dummy_clip_tokenizer()`` writes a character-level CLIP BPE vocabulary to a temporary folder
and loads it as a ``CLIPTokenizer``; ``dummy_sd_pipeline()`` builds a random
``StableDiffusionPipeline``. One module per family adds its own builder
(``diffprobe.testing.sdxl`` ...).
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

# Stable Diffusion's published DDIM settings, shared by the dummy and full-size pipelines
SD_SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

CLIP_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=5,
    layer_norm_eps=1e-05,
    max_position_embeddings=77,
    hidden_act="gelu",
)


def _clip_vocab() -> dict[str, int]:
    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    return vocab


def dummy_clip_tokenizer(max_length: int = 77):
    """A character-level CLIPTokenizer (vocabulary of about 140 symbols), offline.

    The tokenizer reads its vocabulary files when it is built; they are written to a temporary
    folder that is removed again.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="diffprobe-clip-vocab-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(_clip_vocab()))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(
            str(folder / "vocab.json"),
            str(folder / "merges.txt"),
            model_max_length=max_length,
            pad_token="<|endoftext|>",
        )


def dummy_clip_text_config(tokenizer, projection: int | None = None, **overrides):
    from transformers import CLIPTextConfig

    config = dict(
        CLIP_TEXT,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if projection is not None:
        config["projection_dim"] = projection
    config.update(overrides)
    return CLIPTextConfig(**config)


def dummy_vae(latent_channels: int = 4, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=32,
    )


def dummy_sd_components(seed: int = 0) -> dict:
    """Components of a random StableDiffusionPipeline (64 px images, 32 px latents... as in
    diffusers' tests: UNet (32, 64) blocks, cross-attention 32)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    scheduler = DDIMScheduler(**SD_SCHEDULE)
    vae = dummy_vae(seed=seed)
    tokenizer = dummy_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(dummy_clip_text_config(tokenizer)).eval()
    return dict(
        unet=unet.eval(),
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
    )


def dummy_sd_pipeline(seed: int = 0):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**dummy_sd_components(seed), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
