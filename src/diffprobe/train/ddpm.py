"""Train ``tiny-ddpm``: a pixel-space ``UNet2DModel`` DDPM on the shapes world (Asyrp's setting).

Unconditional, 32×32 pixels in [-1, 1] (shapes-world images downsampled from 64 px with PIL's
antialiased bilinear filter), the DDPM linear beta schedule of Ho et al. (1e-4 .. 0.02, 1,000
steps, the schedule of the CelebA-HQ DDPM Asyrp edits), epsilon loss, AdamW with warm-up and
cosine decay, EMA of the weights shipped. The bottleneck ``unet.mid_block`` is
``channels[-1] × 8 × 8``, the spatial size of Asyrp's h-space.

Resumable: every ``checkpoint_every`` steps the weights, EMA, optimiser state and step go to
``out/checkpoints/ddpm-<step>.safetensors`` (+ ``.json``; no pickle). Each step's random draws
come from a CPU generator seeded by ``(seed, step)``, so a resumed run equals an uninterrupted
one. The pipeline is written with ``save_pretrained`` as a ``DDPMPipeline`` folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffprobe.io import write_json
from diffprobe.train.common import (
    JsonConfig,
    StepLoop,
    batch_indices,
    check_config,
    finish_metrics,
    latest_state,
    log,
    open_run,
    prefixed,
    resume_state,
    run_metrics,
    save_state,
    staged_folder,
    step_generator,
    with_overrides,
)

__all__ = ["DDPM_KIND", "DDPMConfig", "downsample", "export_pipeline", "train_tiny_ddpm"]

DDPM_KIND = "train-tiny-ddpm"
_ENTRIES = ("checkpoints", "pipeline", "pipeline.partial", "metrics.json")


@dataclass(frozen=True)
class DDPMConfig(JsonConfig):
    """Everything that decides the weights of ``tiny-ddpm`` apart from ``seed``."""

    train_items: int = 8_000
    image_size: int = 32
    channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    norm_groups: int = 8
    steps: int = 2_400
    batch_size: int = 24
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    final_learning_rate_fraction: float = 0.05
    weight_decay: float = 0.0
    gradient_clip: float = 1.0
    ema_decay: float = 0.995
    train_timesteps: int = 1_000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    checkpoint_every: int = 100
    save_dtype: str = "float16"

    @classmethod
    def small(cls) -> DDPMConfig:
        """Seconds-long smoke configuration for tests."""
        return cls(train_items=16, image_size=16, channels=(8, 16), norm_groups=4, steps=4,
                   batch_size=4, warmup_steps=1, checkpoint_every=2)  # fmt: skip


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (items, H, W, 3) -> uint8 (items, size, size, 3), PIL bilinear (antialiased)."""
    from PIL import Image

    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
                     for image in images])  # fmt: skip


def build_unet(config: DDPMConfig):
    from diffusers import UNet2DModel

    levels = len(config.channels)
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=config.layers_per_block,
        block_out_channels=tuple(config.channels),
        # attention only in the mid block (the bottleneck h), to keep CPU training short
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=config.norm_groups,
        attention_head_dim=8,
    )


def build_scheduler(config: DDPMConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.train_timesteps, beta_start=config.beta_start,
                         beta_end=config.beta_end, beta_schedule="linear", clip_sample=True,
                         prediction_type="epsilon")  # fmt: skip


# ---------------------------------------------------------------------------------- training


def train_tiny_ddpm(
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    resume: bool = True,
    progress: bool = True,
    config: DDPMConfig | None = None,
    threads: int | None = 1,
    minutes: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
) -> Path:
    """Train ``tiny-ddpm`` into ``out_dir/pipeline`` (``DDPMPipeline.save_pretrained``).

    ``out_dir`` follows the folder rule (kind ``train-tiny-ddpm``) and also holds
    ``checkpoints/`` and ``metrics.json`` (timings, parameter count, final loss). ``minutes``
    stops the run after that much wall-clock time of this session (checkpointed; the EMA
    weights reached so far are saved as the pipeline, and ``metrics.json`` says how many of
    the planned steps ran).
    """
    from diffusers import DDPMPipeline

    from diffprobe.data import shapes

    began = time.perf_counter()
    config = with_overrides(config or DDPMConfig(), steps=steps, batch_size=batch_size)
    out_dir, checkpoints, device_ = open_run(out_dir, DDPM_KIND, _ENTRIES, device=device,
                                             threads=threads, resume=resume)  # fmt: skip

    data = shapes.sample(config.train_items, seed=seed, split="train")
    pixels = torch.as_tensor(downsample(data.images, config.image_size))
    pixels = (pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(device_)

    torch.manual_seed(seed)
    unet = build_unet(config).to(device_)
    scheduler = build_scheduler(config)
    alphas = scheduler.alphas_cumprod.to(device_)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)  # fmt: skip
    ema = {k: v.detach().clone() for k, v in unet.named_parameters()}
    flat, first = resume_state(checkpoints, "ddpm", config.to_json(), optimizer, resume=resume,
                               tag=DDPM_KIND, progress=progress)  # fmt: skip
    if flat is not None:
        unet.load_state_dict(prefixed(flat, "model."))
        ema = {k: v.to(device_) for k, v in prefixed(flat, "ema.").items()}

    def checkpoint(step: int) -> None:
        tensors = {f"model.{k}": v for k, v in unet.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.items()})
        save_state(checkpoints, "ddpm", step, tensors, optimizer,
                   {"config": config.to_json(), "seed": seed})  # fmt: skip

    unet.train()
    loss_value = float("nan")
    loop = StepLoop(config, optimizer, first, checkpoint=checkpoint, tag=DDPM_KIND, desc="tiny-ddpm",
                    progress=progress, began=began, minutes=minutes)  # fmt: skip
    for step in loop:
        generator = step_generator(seed, 11, step)
        index = batch_indices(generator, len(pixels), config.batch_size)
        clean = pixels[index.to(device_)]
        noise = torch.randn(clean.shape, generator=generator).to(device_)
        timesteps = torch.randint(0, config.train_timesteps, (len(index),),
                                  generator=generator).to(device_)  # fmt: skip
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
        loss = (unet(noisy, timesteps).sample - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.gradient_clip)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, value in unet.named_parameters():
                ema[name].lerp_(value.detach(), 1 - decay)
        loss_value = loss.item()
        loop.bar.set_postfix(loss=f"{loss_value:.4f}")

    with torch.no_grad():
        for name, value in unet.named_parameters():
            value.copy_(ema[name])
    pipeline_dir = out_dir / "pipeline"
    with staged_folder(pipeline_dir) as staging:
        pipe = DDPMPipeline(unet=unet.to("cpu", getattr(torch, config.save_dtype)),
                            scheduler=scheduler)  # fmt: skip
        pipe.save_pretrained(staging, safe_serialization=True)
    metrics = run_metrics(loop, seed=seed, device=device_, model=unet, loss=loss_value)
    write_json(out_dir / "metrics.json", finish_metrics(metrics, began=began, folder=pipeline_dir,
                                                        config_json=config.to_json()))  # fmt: skip
    log(DDPM_KIND, f"wrote {pipeline_dir}", progress)
    return pipeline_dir


def export_pipeline(out_dir: str | Path, config: DDPMConfig | None = None) -> Path:
    """Write ``out_dir/pipeline`` from the EMA weights of the latest checkpoint (a run stopped
    early, e.g. killed), without loading the training data."""
    from diffusers import DDPMPipeline

    config = config or DDPMConfig()
    out_dir = Path(out_dir)
    found = latest_state(out_dir / "checkpoints", "ddpm")
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {out_dir / 'checkpoints'}")
    flat, info = found
    check_config(info, config.to_json(), out_dir / "checkpoints")
    unet = build_unet(config)
    unet.load_state_dict(prefixed(flat, "ema."), strict=False)
    with staged_folder(out_dir / "pipeline") as staging:
        pipe = DDPMPipeline(unet=unet.to(getattr(torch, config.save_dtype)),
                            scheduler=build_scheduler(config))  # fmt: skip
        pipe.save_pretrained(staging, safe_serialization=True)
    write_json(out_dir / "metrics.json", {"exported_from_step": info["step"],
                                          "config": config.to_json()})  # fmt: skip
    return out_dir / "pipeline"
