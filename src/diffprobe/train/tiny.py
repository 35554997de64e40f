"""Train ``tiny``: a real ``StableDiffusionPipeline`` on the shapes world.

The pipeline has the Stable Diffusion module names (``vae``, ``text_encoder``, ``tokenizer``,
``unet``, ``scheduler``), so every diffprobe method applies to it unchanged. Training runs in three
phases after the tokenizer, each resumable from ``out_dir/checkpoints``:

0. tokenizer: CLIP byte-level BPE (``</w>`` suffix, CLIP normaliser) whose merges are learned
   from every training-split caption; built in a second, never checkpointed. Captions are at
   most 14 tokens, so the context is 16 tokens (``text_max_length``), not CLIP's 77.
1. ``text``: the ``CLIPTextModel`` is trained from scratch to read the caption: linear heads on
   its pooled output (the end-of-text token after the final layer norm) predict the factors
   the caption states (shape, colour, size, quadrant, and background or "not said"), with a
   cross-entropy loss. The heads are thrown away; the encoder is then frozen.
2. ``vae``: an ``AutoencoderKL`` 64×64×3 -> 16×16×4, L1 + L2 reconstruction and a small KL.
   The training images are then encoded once (posterior mean and std) to a latent cache, and
   every training caption once by the frozen text encoder to an embedding cache.
3. ``unet``: ``UNet2DConditionModel`` trained from scratch on the epsilon loss (min-SNR
   weighted, offset noise), with 10 % of captions replaced by the empty prompt so that
   classifier-free guidance works. An exponential moving average (EMA) of the UNet ships.

Training the text encoder on its own first, on a task it can learn in a minute, and freezing it
is what makes the recipe fit a CPU hour: the UNet sees informative conditioning from its first
step, and no text-encoder backward pass is paid per UNet step.

Every random draw of a step comes from generators seeded by ``(seed, phase, step)`` on the CPU,
so a run resumed from a checkpoint continues exactly as an uninterrupted one, and two runs with
the same seed on the same device give the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffprobe.io import write_json
from diffprobe.train.common import (
    EMA,
    batch_indices,
    from_unit,
    learning_rate_factor,
    load_checkpoint,
    open_run,
    parameter_count,
    psnr,
    rng_state,
    scratch_directory,
    set_rng_state,
    staged_folder,
    to_unit,
    with_overrides,
)
from diffprobe.train.phases import (
    check_config,
    checkpoint_path,
    list_checkpoints,
    log,
    save_checkpoint,
    step_generator,
)
from diffprobe.train.recipe import (
    TinyConfig,
    build_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
)
from diffprobe.train.tokenizer import build_tokenizer, caption_corpus, save_tokenizer
from diffprobe.train.tokenizer import token_ids as caption_token_ids

__all__ = [
    "TinyConfig",
    "build_tokenizer",
    "caption_corpus",
    "caption_labels",
    "psnr",
    "train_tiny",
]

# Random streams of the phases: the first word of every per-step seed.
# CLIP's pre-tokeniser pattern (transformers' CLIPTokenizer uses the same one).


# ---------------------------------------------------------------------------------- tokenizer


# ---------------------------------------------------------------------------------- models


# ---------------------------------------------------------------------------------- helpers


# ---------------------------------------------------------------------------------- checkpoints


# ---------------------------------------------------------------------------------- phases


_TEXT_FACTORS = ("shape", "colour", "size", "quadrant", "background")


def caption_labels(factors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """What each caption states, as class indices: the targets of the ``text`` phase.

    ``background`` has one extra class, ``len(BACKGROUNDS)``, for captions whose template does
    not name the background.
    """
    from diffprobe.data import shapes

    labels = {name: torch.as_tensor(np.asarray(factors[name]), dtype=torch.long)
              for name in _TEXT_FACTORS}  # fmt: skip
    says_background = torch.as_tensor(
        ["{background}" in shapes.CAPTION_TEMPLATES[t] for t in np.asarray(factors["template"])]
    )
    labels["background"] = torch.where(
        says_background, labels["background"], torch.tensor(len(shapes.BACKGROUNDS))
    )
    return labels


def _text_heads(config: TinyConfig) -> torch.nn.ModuleDict:
    from diffprobe.data import shapes

    classes = {"shape": len(shapes.SHAPES), "colour": len(shapes.COLOURS),
               "size": len(shapes.SIZES), "quadrant": len(shapes.QUADRANTS),
               "background": len(shapes.BACKGROUNDS) + 1}  # fmt: skip
    return torch.nn.ModuleDict(
        {name: torch.nn.Linear(config.text_hidden_size, count) for name, count in classes.items()}
    )


def _train_text(
    text_encoder, token_ids: torch.Tensor, labels: dict[str, torch.Tensor], config: TinyConfig,
    *, seed: int, device: torch.device, checkpoints: Path, progress: bool,
) -> dict[str, float]:  # fmt: skip
    """Train ``text_encoder`` in place to read the factors a caption states (phase ``text``)."""
    torch.manual_seed(seed)
    heads = _text_heads(config).to(device)
    parameters = [*text_encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.text_learning_rate, weight_decay=0.01)
    token_ids = token_ids.to(device)
    labels = {name: value.to(device) for name, value in labels.items()}
    text_encoder.train()
    began = time.perf_counter()
    bar = tqdm(range(config.text_steps), desc="text", disable=not progress)
    loss_value, accuracy = float("nan"), {}
    for step in bar:
        factor = learning_rate_factor(step, config.text_steps, config.warmup_steps, 0.05)
        for group in optimizer.param_groups:
            group["lr"] = config.text_learning_rate * factor
        generator = step_generator(seed, "text", step)
        index = batch_indices(generator, len(token_ids), config.text_batch_size).to(device)
        pooled = text_encoder(token_ids[index]).pooler_output
        logits = {name: head(pooled) for name, head in heads.items()}
        loss = sum(torch.nn.functional.cross_entropy(logits[name], labels[name][index])
                   for name in heads)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.gradient_clip)
        optimizer.step()
        loss_value = loss.item()
        accuracy = {name: (logits[name].argmax(-1) == labels[name][index]).float().mean().item()
                    for name in heads}  # fmt: skip
        bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()
    text_encoder.eval()
    text_encoder.requires_grad_(False)
    save_checkpoint(checkpoints, "text", config.text_steps, {
        "phase": "text", "step": config.text_steps, "config": json.dumps(config.to_json()),
        "models": {"text_encoder": text_encoder.state_dict()},
    })  # fmt: skip
    return {"text_seconds": time.perf_counter() - began, "text_final_loss": loss_value,
            "text_final_batch_accuracy": accuracy}  # fmt: skip


@torch.no_grad()
def _encode_captions(text_encoder, token_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Last hidden states (items, tokens, hidden) of the frozen encoder, on the CPU."""
    text_encoder.eval()
    return torch.cat([text_encoder(token_ids[first : first + 512].to(device))[0].cpu()
                      for first in range(0, len(token_ids), 512)])  # fmt: skip


def _train_vae(
    vae, images: np.ndarray, config: TinyConfig, *, seed: int, device: torch.device,
    checkpoints: Path, start: dict[str, Any] | None, progress: bool,
) -> dict[str, float]:  # fmt: skip
    """Train ``vae`` in place on uint8 ``images`` (items, 64, 64, 3)."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    first_step = 0
    if start is not None:
        vae.load_state_dict(start["models"]["vae"])
        optimizer.load_state_dict(start["optimizer"])
        set_rng_state(start["rng"], device)
        first_step = start["step"]
    if first_step >= config.vae_steps:
        return {}
    vae.train()
    began = time.perf_counter()
    bar = tqdm(range(first_step, config.vae_steps), desc="vae", disable=not progress,
               initial=first_step, total=config.vae_steps)  # fmt: skip
    loss_value = float("nan")
    for step in bar:
        factor = learning_rate_factor(step, config.vae_steps, config.warmup_steps, 0.05)
        for group in optimizer.param_groups:
            group["lr"] = config.vae_learning_rate * factor
        generator = step_generator(seed, "vae", step)
        index = batch_indices(generator, len(images), config.vae_batch_size)
        batch = to_unit(images[index.numpy()], device)
        posterior = vae.encode(batch).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        reconstruction = vae.decode(posterior.mean + posterior.std * noise).sample
        error = reconstruction - batch
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = error.abs().mean() + error.pow(2).mean() + config.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), config.gradient_clip)
        optimizer.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.vae_steps:
            save_checkpoint(checkpoints, "vae", done, {
                "phase": "vae", "step": done, "config": json.dumps(config.to_json()),
                "models": {"vae": vae.state_dict()}, "optimizer": optimizer.state_dict(),
                "rng": rng_state(device),
            })  # fmt: skip
    bar.close()
    seconds = time.perf_counter() - began
    return {"vae_seconds": seconds, "vae_steps_per_second": (config.vae_steps - first_step) / seconds,
            "vae_final_loss": loss_value}  # fmt: skip


@torch.no_grad()
def _encode_latents(vae, images: np.ndarray, device: torch.device, progress: bool):
    """Posterior mean and std (items, latent channels, 16, 16) of every image, on the CPU."""
    vae.eval()
    means, stds = [], []
    for first in tqdm(range(0, len(images), 128), desc="encode", disable=not progress):
        posterior = vae.encode(to_unit(images[first : first + 128], device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def _reconstruction_psnr(vae, images: np.ndarray, device: torch.device) -> float:
    """PSNR of decode(posterior mean) against uint8 ``images``: the pipeline's own round trip."""
    vae.eval()
    outputs = []
    for first in range(0, len(images), 128):
        batch = to_unit(images[first : first + 128], device)
        outputs.append(from_unit(vae.decode(vae.encode(batch).latent_dist.mean).sample))
    return psnr(images, np.concatenate(outputs))


def _train_denoiser(
    unet, latents: tuple[torch.Tensor, torch.Tensor], scaling_factor: float,
    caption_embeds: torch.Tensor, empty_embeds: torch.Tensor, config: TinyConfig, *, seed: int,
    device: torch.device, steps: int, deadline: float | None, checkpoints: Path,
    start: dict[str, Any] | None, extra_state: dict[str, Any], progress: bool,
) -> tuple[EMA, dict[str, float]]:  # fmt: skip
    """Train ``unet`` in place on cached caption embeddings; return its EMA and timings."""
    scheduler = build_scheduler(config)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # min-SNR-gamma weights (Hang et al. 2023): min(snr, gamma) / snr for epsilon, / (snr + 1)
    # for v, whose loss already weighs every timestep by snr + 1 against epsilon's
    velocity = config.prediction_type == "v_prediction"
    loss_weight = snr.clamp(max=config.min_snr_gamma) / (snr + 1 if velocity else snr)
    latent_mean, latent_std = (tensor.to(device) for tensor in latents)
    caption_embeds, empty_embeds = caption_embeds.to(device), empty_embeds.to(device)

    modules = {"unet": unet}
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    ema = EMA(modules, config.ema_decay)
    first_step = 0
    if start is not None:
        unet.load_state_dict(start["models"]["unet"])
        optimizer.load_state_dict(start["optimizer"])
        ema.shadow = {key: value.to(device) for key, value in start["ema"].items()}
        set_rng_state(start["rng"], device)
        first_step = start["step"]
    unet.train()
    began = time.perf_counter()
    bar = tqdm(range(first_step, steps), desc="unet", disable=not progress,
               initial=first_step, total=steps)  # fmt: skip
    done = first_step
    loss_value = float("nan")

    def checkpoint(step: int) -> None:
        save_checkpoint(checkpoints, "unet", step, {
            "phase": "unet", "step": step, "config": json.dumps(config.to_json()),
            "models": {"unet": unet.state_dict()},
            "optimizer": optimizer.state_dict(), "ema": ema.shadow, "rng": rng_state(device),
            **extra_state,
        })  # fmt: skip

    for step in bar:
        if deadline is not None and time.perf_counter() > deadline:
            log(f"time budget reached after {step} of {steps} denoiser steps", progress)
            checkpoint(step)
            break
        factor = learning_rate_factor(
            step, steps, config.warmup_steps, config.final_learning_rate_fraction
        )
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * factor
        generator = step_generator(seed, "unet", step)
        index = batch_indices(generator, len(caption_embeds), config.batch_size)
        shape = (len(index), *latent_mean.shape[1:])
        posterior_noise = torch.randn(shape, generator=generator).to(device)
        noise = torch.randn(shape, generator=generator)
        if config.noise_offset:
            offset = torch.randn((*shape[:2], 1, 1), generator=generator)
            noise = noise + config.noise_offset * offset
        noise = noise.to(device)
        timesteps = torch.randint(0, config.train_timesteps, (len(index),), generator=generator)
        dropped = torch.rand(len(index), generator=generator) < config.caption_dropout
        index, timesteps, dropped = index.to(device), timesteps.to(device), dropped.to(device)

        clean = (latent_mean[index] + latent_std[index] * posterior_noise) * scaling_factor
        alpha = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
        prompt_embeds = torch.where(
            dropped[:, None, None], empty_embeds[None], caption_embeds[index]
        )
        prediction = unet(noisy, timesteps, prompt_embeds).sample
        target = scheduler.get_velocity(clean, noise, timesteps) if velocity else noise
        per_item = (prediction.float() - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_item * loss_weight[timesteps]).mean()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.gradient_clip)
        optimizer.step()
        ema.update(modules, step)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == steps:
            checkpoint(done)
    bar.close()
    seconds = time.perf_counter() - began
    return ema, {
        "unet_seconds": seconds,
        "unet_steps_run": done - first_step,
        "unet_steps_per_second": (done - first_step) / seconds if seconds > 0 else float("nan"),
        "unet_final_loss": loss_value,
        "unet_steps_done": done,
    }


def _save_pipeline(
    directory: Path, *, vae, text_encoder, tokenizer, unet, config: TinyConfig
) -> None:
    from diffusers import StableDiffusionPipeline

    dtype = getattr(torch, config.save_dtype)
    pipeline = StableDiffusionPipeline(
        vae=vae.to("cpu", dtype),
        text_encoder=text_encoder.to("cpu", torch.float32),
        tokenizer=tokenizer,
        unet=unet.to("cpu", dtype),
        scheduler=build_scheduler(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with staged_folder(directory) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        save_tokenizer(tokenizer, staging / "tokenizer")


# ---------------------------------------------------------------------------------- entry


TRAIN_KIND = "train-tiny"
TRAIN_ENTRIES = ("checkpoints", "latents.pt", "pipeline", "pipeline.partial", "metrics.json")


def train_tiny(
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    minutes: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    resume: bool = True,
    progress: bool = True,
    config: TinyConfig | None = None,
    threads: int | None = 2,
) -> Path:
    """Train ``tiny`` and write it to ``out_dir/pipeline`` (a ``save_pretrained`` folder).

    Args:
        out_dir: run folder; holds ``checkpoints/``, ``latents.pt`` (the encoded training set),
            ``pipeline/`` and ``metrics.json`` (timings, parameter counts, VAE PSNR).
        seed: seeds the training data, the initial weights and every step's random draws.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... Weights are deterministic per device.
        minutes: wall-clock budget of the whole run. After the VAE and 20 denoiser steps the
            number of denoiser steps is cut (never raised) to fit it, and the learning-rate
            schedule follows the new count, which checkpoints keep for a resume.
        steps, batch_size: override ``config.steps`` / ``config.batch_size`` of the denoiser.
        resume: continue from the latest checkpoint in ``out_dir/checkpoints``, if any.
        progress: tqdm bars and log lines on stderr.
        config: the recipe; ``TinyConfig()`` by default, ``TinyConfig.small()`` for tests.
        threads: ``torch.set_num_threads`` for the run (``None`` leaves it as it is).

    Returns:
        The pipeline folder, loadable with ``StableDiffusionPipeline.from_pretrained``.
    """
    from diffprobe.data import shapes

    began = time.perf_counter()
    config = with_overrides(config or TinyConfig(), steps=steps, batch_size=batch_size)
    # the folder rule (diffprobe.io), then a fresh start unless resuming
    out_dir, checkpoints, torch_device = open_run(
        out_dir, TRAIN_KIND, TRAIN_ENTRIES, device=device, threads=threads, resume=resume,
        derived=("latents.pt",),
    )  # fmt: skip

    latest = None
    if resume and (found := list_checkpoints(checkpoints)):
        latest = load_checkpoint(found[-1][2])
        check_config(latest, config, found[-1][2])
        log(f"resuming from {found[-1][2].name}", progress)

    tokenizer = build_tokenizer(caption_corpus(), model_max_length=config.text_max_length)
    data = shapes.sample(config.train_items, seed=seed, split="train")
    heldout = shapes.sample(config.eval_items, seed=seed, split="heldout")

    torch.manual_seed(seed)
    vae = build_vae(config).to(torch_device)
    text_encoder = build_text_encoder(config, tokenizer).to(torch_device)
    unet = build_unet(config).to(torch_device)
    metrics: dict[str, Any] = {
        "seed": seed,
        "device": str(torch_device),
        "threads": torch.get_num_threads(),
        "parameters": {
            "vae": parameter_count(vae),
            "text_encoder": parameter_count(text_encoder),
            "unet": parameter_count(unet),
        },  # fmt: skip
        "vocabulary": len(tokenizer),
    }

    # phase 1: the text encoder learns to read captions, then stays frozen
    token_ids = caption_token_ids(tokenizer, data.captions)
    text_checkpoint = checkpoint_path(checkpoints, "text", config.text_steps)
    if resume and text_checkpoint.exists():
        text_encoder.load_state_dict(load_checkpoint(text_checkpoint)["models"]["text_encoder"])
        text_encoder.eval().requires_grad_(False)
    else:
        metrics.update(_train_text(text_encoder, token_ids, caption_labels(data.factors), config,
                                   seed=seed, device=torch_device, checkpoints=checkpoints,
                                   progress=progress))  # fmt: skip
        latest = None  # nothing after this phase can be reused
    caption_embeds = _encode_captions(text_encoder, token_ids, torch_device)
    empty_embeds = _encode_captions(text_encoder, caption_token_ids(tokenizer, [""]), torch_device)[
        0
    ]

    # phase 2: VAE
    if latest is None or latest["phase"] in ("text", "vae"):
        latest = latest if latest is not None and latest["phase"] == "vae" else None
        metrics.update(_train_vae(vae, data.images, config, seed=seed, device=torch_device,
                                  checkpoints=checkpoints, start=latest, progress=progress))  # fmt: skip
    else:
        vae.load_state_dict(load_checkpoint(_vae_final(checkpoints, config))["models"]["vae"])
    metrics["vae_psnr_heldout"] = _reconstruction_psnr(vae, heldout.images, torch_device)
    metrics["vae_psnr_train"] = _reconstruction_psnr(vae, data.images[: config.eval_items],
                                                     torch_device)  # fmt: skip
    log(f"VAE reconstruction PSNR on held-out images: {metrics['vae_psnr_heldout']:.2f} dB",
         progress)  # fmt: skip

    cache = out_dir / "latents.pt"
    if cache.exists():
        cached = load_checkpoint(cache)
        latent_mean, latent_std = cached["mean"], cached["std"]
    else:
        encode_began = time.perf_counter()
        latent_mean, latent_std = _encode_latents(vae, data.images, torch_device, progress)
        metrics["encode_seconds"] = time.perf_counter() - encode_began
        torch.save({"mean": latent_mean, "std": latent_std}, cache.with_suffix(".tmp"))
        os.replace(cache.with_suffix(".tmp"), cache)
    scaling_factor = float(1.0 / latent_mean.std())
    metrics["scaling_factor"] = scaling_factor
    vae.register_to_config(scaling_factor=scaling_factor)

    # phase 3: UNet
    total_steps = config.steps
    start = latest if latest is not None and latest["phase"] == "unet" else None
    if start is not None:
        total_steps = start["total_steps"]
    deadline = None if minutes is None else began + 60 * minutes
    if deadline is not None and start is None and total_steps > 20:
        # Measure 20 steps, then cut the step count to the budget; the probe steps are thrown
        # away so that the run with the chosen count is the same as one asked for directly.
        probe = _probe_rate(unet, (latent_mean, latent_std), scaling_factor, caption_embeds,
                            empty_embeds, config, seed=seed, device=torch_device)  # fmt: skip
        left = deadline - time.perf_counter() - 30  # saving the pipeline, margins
        fitted = max(1, int(left * probe))
        if fitted < total_steps:
            log(f"{probe:.2f} denoiser steps/s: {fitted} steps fit in {minutes} min "
                 f"(asked for {total_steps})", progress)  # fmt: skip
            total_steps = fitted
    ema, timings = _train_denoiser(
        unet, (latent_mean, latent_std), scaling_factor, caption_embeds, empty_embeds, config,
        seed=seed, device=torch_device, steps=total_steps, deadline=deadline,
        checkpoints=checkpoints, start=start, extra_state={"total_steps": total_steps},
        progress=progress,
    )  # fmt: skip
    metrics.update(timings)
    metrics["unet_steps_planned"] = total_steps
    ema.copy_to({"unet": unet})

    pipeline_dir = out_dir / "pipeline"
    _save_pipeline(pipeline_dir, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                   unet=unet, config=config)  # fmt: skip
    metrics["weights_bytes"] = sum(p.stat().st_size for p in pipeline_dir.rglob("*.safetensors"))
    metrics["folder_bytes"] = sum(p.stat().st_size for p in pipeline_dir.rglob("*") if p.is_file())
    metrics["total_seconds_this_session"] = time.perf_counter() - began
    metrics["config"] = config.to_json()
    write_json(out_dir / "metrics.json", metrics)
    log(f"wrote {pipeline_dir} ({metrics['folder_bytes'] / 1e6:.1f} MB)", progress)
    return pipeline_dir


def _vae_final(checkpoints: Path, config: TinyConfig) -> Path:
    path = checkpoint_path(checkpoints, "vae", config.vae_steps)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the VAE of this run cannot be restored")
    return path


def _probe_rate(unet, latents, scaling_factor, caption_embeds, empty_embeds,
                config: TinyConfig, *, seed: int, device: torch.device) -> float:  # fmt: skip
    """Denoiser training steps per second, measured on copies so the real run is untouched."""
    import copy

    unet_copy = copy.deepcopy(unet)
    rng = torch.get_rng_state()
    with scratch_directory() as scratch:
        # the first 5 steps warm up allocators and kernels; the next 15 are timed
        probe_config = dataclasses.replace(config, checkpoint_every=10**9, warmup_steps=1)
        _train_denoiser(unet_copy, latents, scaling_factor, caption_embeds, empty_embeds,
                        probe_config, seed=seed, device=device, steps=5, deadline=None,
                        checkpoints=scratch, start=None, extra_state={}, progress=False)  # fmt: skip
        _, timings = _train_denoiser(unet_copy, latents, scaling_factor, caption_embeds,
                                     empty_embeds, probe_config, seed=seed, device=device, steps=15,
                                     deadline=None, checkpoints=scratch, start=None,
                                     extra_state={}, progress=False)  # fmt: skip
    torch.set_rng_state(rng)
    return timings["unet_steps_per_second"]
