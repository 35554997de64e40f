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

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffprobe.io import claim_output, write_bytes, write_json
from diffprobe.train.common import learning_rate_factor

__all__ = ["DDPM_KIND", "DDPMConfig", "downsample", "export_pipeline", "train_tiny_ddpm"]

DDPM_KIND = "train-tiny-ddpm"
_ENTRIES = ("checkpoints", "pipeline", "pipeline.partial", "metrics.json")


@dataclass(frozen=True)
class DDPMConfig:
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

    def to_json(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}  # fmt: skip


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


# ---------------------------------------------------------------------------------- helpers


def step_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """CPU generator for one step of one training stream: independent of device and resume."""
    words = np.random.SeedSequence([seed, stream, step]).generate_state(2)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def log(tag: str, message: str, progress: bool) -> None:
    if progress:
        print(f"[{tag}] {message}", file=sys.stderr, flush=True)


def save_state(directory: Path, prefix: str, step: int, tensors: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> None:  # fmt: skip
    """Checkpoint as safetensors (weights, EMA, optimiser moments) + JSON; keep the last two."""
    from safetensors.torch import save

    state = optimizer.state_dict()
    flat = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    for index, moments in state["state"].items():
        for key, value in moments.items():
            flat[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{prefix}-{step:08d}"
    write_bytes(stem.with_suffix(".safetensors"), save(flat), record=False)
    write_json(stem.with_suffix(".json"),
               {**info, "step": step, "param_groups": state["param_groups"]}, record=False)  # fmt: skip
    for old in sorted(directory.glob(f"{prefix}-*.json"))[:-2]:
        old.unlink()
        old.with_suffix(".safetensors").unlink(missing_ok=True)


def latest_state(directory: Path, prefix: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    from safetensors.torch import load_file

    found = sorted(p for p in directory.glob(f"{prefix}-*.json")
                   if p.with_suffix(".safetensors").exists())  # fmt: skip
    if not found:
        return None
    info = json.loads(found[-1].read_text())
    return load_file(found[-1].with_suffix(".safetensors")), info


def restore_optimizer(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor],
                      info: dict) -> None:  # fmt: skip
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in flat.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def check_config(info: dict, config_json: dict, directory: Path) -> None:
    differing = sorted(k for k in config_json if info.get("config", {}).get(k) != config_json[k])
    if differing:
        raise ValueError(f"checkpoints in {directory} were written with a different config "
                         f"({', '.join(differing)}); pass resume=False or another folder")  # fmt: skip


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
    config = config or DDPMConfig()
    overrides = {"steps": steps, "batch_size": batch_size}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    out_dir = claim_output(out_dir, DDPM_KIND, entries=_ENTRIES)
    checkpoints = out_dir / "checkpoints"
    device_ = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    if not resume and checkpoints.exists():
        shutil.rmtree(checkpoints)

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
    first = 0
    found = latest_state(checkpoints, "ddpm") if resume else None
    if found is not None:
        flat, info = found
        check_config(info, config.to_json(), checkpoints)
        unet.load_state_dict({k[len("model."):]: v for k, v in flat.items()
                              if k.startswith("model.")})  # fmt: skip
        ema = {k[len("ema.") :]: v.to(device_) for k, v in flat.items() if k.startswith("ema.")}
        restore_optimizer(optimizer, flat, info)
        first = info["step"]
        log("train-tiny-ddpm", f"resuming at step {first}", progress)

    def checkpoint(step: int) -> None:
        tensors = {f"model.{k}": v for k, v in unet.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.items()})
        save_state(checkpoints, "ddpm", step, tensors, optimizer,
                   {"config": config.to_json(), "seed": seed})  # fmt: skip

    unet.train()
    loss_value = float("nan")
    run_began = time.perf_counter()
    bar = tqdm(range(first, config.steps), desc="tiny-ddpm", disable=not progress,
               initial=first, total=config.steps)  # fmt: skip
    done = first
    for step in bar:
        if minutes is not None and time.perf_counter() - began > 60 * minutes:
            log("train-tiny-ddpm", f"time budget reached after {step} steps", progress)
            checkpoint(step)
            break
        factor = learning_rate_factor(step, config.steps, config.warmup_steps,
                                      config.final_learning_rate_fraction)  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * factor
        generator = step_generator(seed, 11, step)
        index = torch.randperm(len(pixels), generator=generator)[: config.batch_size]
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
        bar.set_postfix(loss=f"{loss_value:.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            checkpoint(done)
    bar.close()
    seconds = time.perf_counter() - run_began

    with torch.no_grad():
        for name, value in unet.named_parameters():
            value.copy_(ema[name])
    pipeline_dir = out_dir / "pipeline"
    staging = out_dir / "pipeline.partial"
    shutil.rmtree(staging, ignore_errors=True)
    pipe = DDPMPipeline(unet=unet.to("cpu", getattr(torch, config.save_dtype)),
                        scheduler=scheduler)  # fmt: skip
    pipe.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(pipeline_dir, ignore_errors=True)
    os.replace(staging, pipeline_dir)
    metrics = {
        "seed": seed,
        "device": str(device_),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "steps_done": done,
        "steps_this_session": done - first,
        "train_seconds_this_session": seconds,
        "final_loss": loss_value,
        "total_seconds_this_session": time.perf_counter() - began,
        "weights_bytes": sum(p.stat().st_size for p in pipeline_dir.rglob("*.safetensors")),
        "config": config.to_json(),
    }
    write_json(out_dir / "metrics.json", metrics)
    log("train-tiny-ddpm", f"wrote {pipeline_dir}", progress)
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
    unet.load_state_dict({k[len("ema."):]: v for k, v in flat.items() if k.startswith("ema.")},
                         strict=False)  # fmt: skip
    staging = out_dir / "pipeline.partial"
    shutil.rmtree(staging, ignore_errors=True)
    pipe = DDPMPipeline(unet=unet.to(getattr(torch, config.save_dtype)),
                        scheduler=build_scheduler(config))  # fmt: skip
    pipe.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(out_dir / "pipeline", ignore_errors=True)
    os.replace(staging, out_dir / "pipeline")
    write_json(out_dir / "metrics.json", {"exported_from_step": info["step"],
                                          "config": config.to_json()})  # fmt: skip
    return out_dir / "pipeline"
