"""The recipe of ``tiny``: :class:`TinyConfig` (everything that decides the weights apart from
the seed and the device) and the builders of its four diffusers/transformers components."""

from __future__ import annotations

from dataclasses import dataclass

from diffprobe.train.common import JsonConfig


@dataclass(frozen=True)
class TinyConfig(JsonConfig):
    """Everything that decides the weights of ``tiny`` apart from ``seed`` and the device.

    ``TinyConfig()`` is the shipped recipe; ``TinyConfig.small()`` is a seconds-long smoke
    configuration for tests.
    """

    # data: items 0 .. train_items-1 of shapes.sample(seed=seed, split="train")
    train_items: int = 16_000
    # held-out items (split="heldout") on which the VAE's reconstruction PSNR is reported
    eval_items: int = 512
    # VAE (AutoencoderKL): 2 ** (len(vae_channels) - 1) is the downsampling factor
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_latent_channels: int = 4
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 16
    vae_steps: int = 1_000
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    # weight of the KL term per latent element against the per-pixel reconstruction loss
    vae_kl_weight: float = 1e-6
    # text encoder (CLIPTextModel) and its caption-reading phase
    text_max_length: int = 16
    text_steps: int = 300
    text_batch_size: int = 256
    text_learning_rate: float = 2e-3
    text_hidden_size: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate_size: int = 512
    # UNet2DConditionModel: cross-attention in every block but the lowest, as in SD 1.x
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_layers_per_block: int = 1
    unet_attention_head_dim: int = 8
    unet_norm_groups: int = 32
    # UNet training (text encoder frozen)
    steps: int = 3_500
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    # the learning rate decays along a cosine to this fraction of its peak
    final_learning_rate_fraction: float = 0.1
    weight_decay: float = 0.01
    gradient_clip: float = 1.0
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    # noise schedule (SD 1.x's betas)
    train_timesteps: int = 1_000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # what the UNet predicts: "epsilon" (SD 1.x) or "v_prediction" (SD 2.x 768)
    prediction_type: str = "epsilon"
    # rescale the betas so that the last timestep is pure noise (Lin et al. 2024, "Common
    # diffusion noise schedules and sample steps are flawed"), with "trailing" timestep spacing
    # at inference. Needs v-prediction. Without it, the noisiest latent still holds a little of
    # the image's mean, which a model cannot set from pure noise: black or white backgrounds
    # drift to grey.
    zero_terminal_snr: bool = False
    # offset noise (Guttenberg 2023): std of a per-item, per-channel constant added to the
    # training noise. SD 1.x's schedule leaves a little of the image's mean in the noisiest
    # latent, so a model trained on plain Gaussian noise reads the image's overall colour from
    # the mean of its starting noise instead of from the caption; in the shapes world that
    # sends black or white backgrounds to grey and neighbouring hues into each other. 0.1 took
    # held-out colour accuracy from 0.67 to 1.00 (docs/tiny.md).
    noise_offset: float = 0.1
    # how often a checkpoint is written, in steps of the running phase; the last two are kept
    checkpoint_every: int = 250
    # dtype of the UNet and VAE weights in the saved pipeline; the text encoder stays float32
    save_dtype: str = "float16"

    @classmethod
    def small(cls) -> TinyConfig:
        """A configuration that trains in seconds: for tests, not for images."""
        return cls(
            train_items=64,
            eval_items=8,
            vae_channels=(8, 16),
            vae_norm_groups=4,
            vae_steps=4,
            vae_batch_size=4,
            text_hidden_size=32,
            text_layers=1,
            text_heads=2,
            text_intermediate_size=64,
            text_steps=3,
            text_batch_size=8,
            unet_channels=(16, 32),
            unet_attention_head_dim=8,
            unet_norm_groups=8,
            steps=6,
            batch_size=4,
            warmup_steps=2,
            checkpoint_every=2,
        )


def build_vae(config: TinyConfig):
    from diffusers import AutoencoderKL

    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.vae_channels),
        layers_per_block=config.vae_layers_per_block,
        latent_channels=config.vae_latent_channels,
        norm_num_groups=config.vae_norm_groups,
        sample_size=64,
    )


def build_text_encoder(config: TinyConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        projection_dim=config.text_hidden_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(text_config)


def build_unet(config: TinyConfig):
    from diffusers import UNet2DConditionModel

    levels = len(config.unet_channels)
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    return UNet2DConditionModel(
        sample_size=64 // 2 ** (len(config.vae_channels) - 1),
        in_channels=config.vae_latent_channels,
        out_channels=config.vae_latent_channels,
        layers_per_block=config.unet_layers_per_block,
        block_out_channels=tuple(config.unet_channels),
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=config.unet_attention_head_dim,
        norm_num_groups=config.unet_norm_groups,
    )


def build_scheduler(config: TinyConfig):
    from diffusers import DDIMScheduler

    if config.zero_terminal_snr and config.prediction_type != "v_prediction":
        raise ValueError("zero_terminal_snr=True needs prediction_type='v_prediction'")
    return DDIMScheduler(
        num_train_timesteps=config.train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.zero_terminal_snr,
        timestep_spacing="trailing" if config.zero_terminal_snr else "leading",
    )
