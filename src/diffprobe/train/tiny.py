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
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffprobe.io import claim_output, write_json

__all__ = [
    "TinyConfig",
    "build_tokenizer",
    "caption_corpus",
    "caption_labels",
    "psnr",
    "train_tiny",
]

# Random streams of the phases: the first word of every per-step seed.
_PHASE_IDS = {"vae": 1, "unet": 2, "text": 3}
_PHASE_ORDER = ("text", "vae", "unet")
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokeniser pattern (transformers' CLIPTokenizer uses the same one).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass(frozen=True)
class TinyConfig:
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

    def to_json(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}  # fmt: skip


# ---------------------------------------------------------------------------------- tokenizer


def caption_corpus() -> list[str]:
    """Every caption the training split can produce: each combination × each template."""
    from diffprobe.data import shapes

    corpus = []
    for shape, colour, size, quadrant, background in shapes.combinations("train"):
        factors = {"shape": shape, "colour": colour, "size": size, "quadrant": quadrant,
                   "background": background}  # fmt: skip
        for template in range(len(shapes.CAPTION_TEMPLATES)):
            corpus.append(shapes.caption(factors, template))
    return corpus


def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP byte -> printable character table, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return [chr(c) for c in characters]


def build_tokenizer(corpus: Iterable[str], model_max_length: int = 77):
    """A ``CLIPTokenizer`` with CLIP's layout and merges learned from ``corpus``.

    The vocabulary is laid out as CLIP's: the 256 byte characters, the same with ``</w>``, one
    token per merge in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` (also the
    padding and unknown token). Every byte is in it, so any text tokenises; words of the
    corpus become single tokens.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    learner = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    learner.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # stop only when every word is one token
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    learner.train_from_iterator(list(corpus), trainer)
    merges = [tuple(pair) for pair in json.loads(learner.to_str())["model"]["merges"]]

    alphabet = _byte_alphabet()
    tokens = alphabet + [character + "</w>" for character in alphabet]
    tokens += ["".join(pair) for pair in merges] + [_BOS, _EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise AssertionError("duplicate token in the learned vocabulary")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _save_tokenizer(tokenizer, directory: Path) -> None:
    """``save_pretrained`` plus CLIP's ``vocab.json`` / ``merges.txt`` for older transformers."""
    tokenizer.save_pretrained(directory)
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (directory / "vocab.json").write_text(json.dumps(state["vocab"], ensure_ascii=False))
    lines = ["#version: 0.2"] + [" ".join(pair) for pair in state["merges"]]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids (items, 77) exactly as ``StableDiffusionPipeline.encode_prompt`` makes them."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


# ---------------------------------------------------------------------------------- models


def _build_vae(config: TinyConfig):
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


def _build_text_encoder(config: TinyConfig, tokenizer):
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


def _build_unet(config: TinyConfig):
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


def _build_scheduler(config: TinyConfig):
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


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


# ---------------------------------------------------------------------------------- helpers


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean PSNR in dB over items of uint8 images (items, height, width, channels)."""
    error = (reference.astype(np.float64) - reconstruction.astype(np.float64)) ** 2
    mse = np.maximum(error.reshape(len(error), -1).mean(axis=1), 1e-10)
    return float(np.mean(10 * np.log10(255.0**2 / mse)))


def _to_unit(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (items, 64, 64, 3) -> float (items, 3, 64, 64) in [-1, 1] on ``device``."""
    tensor = torch.as_tensor(images).to(device)
    return tensor.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _from_unit(images: torch.Tensor) -> np.ndarray:
    """float (items, 3, 64, 64) in [-1, 1] -> uint8 (items, 64, 64, 3)."""
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def _step_generator(seed: int, phase: str, step: int) -> torch.Generator:
    """CPU generator for one step: random draws do not depend on the device or on resuming."""
    words = np.random.SeedSequence([seed, _PHASE_IDS[phase], step]).generate_state(2)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def _batch_indices(generator: torch.Generator, items: int, batch_size: int) -> torch.Tensor:
    return torch.randperm(items, generator=generator)[:batch_size]


def _learning_rate_factor(step: int, steps: int, warmup: int, final_fraction: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def _log(message: str, progress: bool) -> None:
    if progress:
        print(f"[train-tiny] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- checkpoints


def _checkpoint_path(directory: Path, phase: str, step: int) -> Path:
    return directory / f"{phase}-{step:08d}.pt"


def _list_checkpoints(directory: Path) -> list[tuple[int, int, Path]]:
    """Checkpoints as (phase rank, step, path), oldest first."""
    found = []
    for path in directory.glob("*.pt"):
        phase, _, step = path.stem.partition("-")
        if phase in _PHASE_ORDER and step.isdigit():
            found.append((_PHASE_ORDER.index(phase), int(step), path))
    return sorted(found)


def _save_checkpoint(directory: Path, phase: str, step: int, state: dict[str, Any]) -> Path:
    """Write atomically (temporary file, then rename); keep this phase's last two."""
    directory.mkdir(parents=True, exist_ok=True)
    path = _checkpoint_path(directory, phase, step)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)
    same_phase = [p for rank, _, p in _list_checkpoints(directory) if _PHASE_ORDER[rank] == phase]
    for old in same_phase[:-2]:
        old.unlink()
    return path


def _load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: checkpoints hold only tensors and plain containers, never pickled objects.
    return torch.load(path, map_location="cpu", weights_only=True)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _check_config(checkpoint: dict[str, Any], config: TinyConfig, path: Path) -> None:
    saved = json.loads(checkpoint["config"])
    current = config.to_json()
    differing = sorted(key for key in current if saved.get(key) != current[key])
    if differing:
        raise ValueError(
            f"checkpoint {path} was written with a different config ({', '.join(differing)}); "
            "pass resume=False or another out_dir"
        )


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
        factor = _learning_rate_factor(step, config.text_steps, config.warmup_steps, 0.05)
        for group in optimizer.param_groups:
            group["lr"] = config.text_learning_rate * factor
        generator = _step_generator(seed, "text", step)
        index = _batch_indices(generator, len(token_ids), config.text_batch_size).to(device)
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
    _save_checkpoint(checkpoints, "text", config.text_steps, {
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
        _set_rng_state(start["rng"], device)
        first_step = start["step"]
    if first_step >= config.vae_steps:
        return {}
    vae.train()
    began = time.perf_counter()
    bar = tqdm(range(first_step, config.vae_steps), desc="vae", disable=not progress,
               initial=first_step, total=config.vae_steps)  # fmt: skip
    loss_value = float("nan")
    for step in bar:
        factor = _learning_rate_factor(step, config.vae_steps, config.warmup_steps, 0.05)
        for group in optimizer.param_groups:
            group["lr"] = config.vae_learning_rate * factor
        generator = _step_generator(seed, "vae", step)
        index = _batch_indices(generator, len(images), config.vae_batch_size)
        batch = _to_unit(images[index.numpy()], device)
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
            _save_checkpoint(checkpoints, "vae", done, {
                "phase": "vae", "step": done, "config": json.dumps(config.to_json()),
                "models": {"vae": vae.state_dict()}, "optimizer": optimizer.state_dict(),
                "rng": _rng_state(device),
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
        posterior = vae.encode(_to_unit(images[first : first + 128], device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def _reconstruction_psnr(vae, images: np.ndarray, device: torch.device) -> float:
    """PSNR of decode(posterior mean) against uint8 ``images``: the pipeline's own round trip."""
    vae.eval()
    outputs = []
    for first in range(0, len(images), 128):
        batch = _to_unit(images[first : first + 128], device)
        outputs.append(_from_unit(vae.decode(vae.encode(batch).latent_dist.mean).sample))
    return psnr(images, np.concatenate(outputs))


class _EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {f"{name}.{key}": value.detach().clone()
                       for name, module in modules.items()
                       for key, value in module.named_parameters()}  # fmt: skip

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, module in modules.items():
            for key, value in module.named_parameters():
                self.shadow[f"{name}.{key}"].lerp_(value.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, modules: dict[str, torch.nn.Module]) -> None:
        for name, module in modules.items():
            for key, value in module.named_parameters():
                value.copy_(self.shadow[f"{name}.{key}"])


def _train_denoiser(
    unet, latents: tuple[torch.Tensor, torch.Tensor], scaling_factor: float,
    caption_embeds: torch.Tensor, empty_embeds: torch.Tensor, config: TinyConfig, *, seed: int,
    device: torch.device, steps: int, deadline: float | None, checkpoints: Path,
    start: dict[str, Any] | None, extra_state: dict[str, Any], progress: bool,
) -> tuple[_EMA, dict[str, float]]:  # fmt: skip
    """Train ``unet`` in place on cached caption embeddings; return its EMA and timings."""
    scheduler = _build_scheduler(config)
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
    ema = _EMA(modules, config.ema_decay)
    first_step = 0
    if start is not None:
        unet.load_state_dict(start["models"]["unet"])
        optimizer.load_state_dict(start["optimizer"])
        ema.shadow = {key: value.to(device) for key, value in start["ema"].items()}
        _set_rng_state(start["rng"], device)
        first_step = start["step"]
    unet.train()
    began = time.perf_counter()
    bar = tqdm(range(first_step, steps), desc="unet", disable=not progress,
               initial=first_step, total=steps)  # fmt: skip
    done = first_step
    loss_value = float("nan")

    def checkpoint(step: int) -> None:
        _save_checkpoint(checkpoints, "unet", step, {
            "phase": "unet", "step": step, "config": json.dumps(config.to_json()),
            "models": {"unet": unet.state_dict()},
            "optimizer": optimizer.state_dict(), "ema": ema.shadow, "rng": _rng_state(device),
            **extra_state,
        })  # fmt: skip

    for step in bar:
        if deadline is not None and time.perf_counter() > deadline:
            _log(f"time budget reached after {step} of {steps} denoiser steps", progress)
            checkpoint(step)
            break
        factor = _learning_rate_factor(
            step, steps, config.warmup_steps, config.final_learning_rate_fraction
        )
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * factor
        generator = _step_generator(seed, "unet", step)
        index = _batch_indices(generator, len(caption_embeds), config.batch_size)
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
        scheduler=_build_scheduler(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging, safe_serialization=True)
    _save_tokenizer(tokenizer, staging / "tokenizer")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)


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
    config = config or TinyConfig()
    overrides = {"steps": steps, "batch_size": batch_size}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    # the folder rule (diffprobe.io): only a new, empty or earlier train-tiny folder is used,
    # so the deletions below touch nothing but diffprobe's own files
    out_dir = claim_output(out_dir, TRAIN_KIND, entries=TRAIN_ENTRIES)
    checkpoints = out_dir / "checkpoints"
    torch_device = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    if not resume and checkpoints.exists():
        shutil.rmtree(checkpoints)
        (out_dir / "latents.pt").unlink(missing_ok=True)

    latest = None
    if resume and (found := _list_checkpoints(checkpoints)):
        latest = _load_checkpoint(found[-1][2])
        _check_config(latest, config, found[-1][2])
        _log(f"resuming from {found[-1][2].name}", progress)

    tokenizer = build_tokenizer(caption_corpus(), model_max_length=config.text_max_length)
    data = shapes.sample(config.train_items, seed=seed, split="train")
    heldout = shapes.sample(config.eval_items, seed=seed, split="heldout")

    torch.manual_seed(seed)
    vae = _build_vae(config).to(torch_device)
    text_encoder = _build_text_encoder(config, tokenizer).to(torch_device)
    unet = _build_unet(config).to(torch_device)
    metrics: dict[str, Any] = {
        "seed": seed,
        "device": str(torch_device),
        "threads": torch.get_num_threads(),
        "parameters": {
            "vae": _parameter_count(vae),
            "text_encoder": _parameter_count(text_encoder),
            "unet": _parameter_count(unet),
        },  # fmt: skip
        "vocabulary": len(tokenizer),
    }

    # phase 1: the text encoder learns to read captions, then stays frozen
    token_ids = _token_ids(tokenizer, data.captions)
    text_checkpoint = _checkpoint_path(checkpoints, "text", config.text_steps)
    if resume and text_checkpoint.exists():
        text_encoder.load_state_dict(_load_checkpoint(text_checkpoint)["models"]["text_encoder"])
        text_encoder.eval().requires_grad_(False)
    else:
        metrics.update(_train_text(text_encoder, token_ids, caption_labels(data.factors), config,
                                   seed=seed, device=torch_device, checkpoints=checkpoints,
                                   progress=progress))  # fmt: skip
        latest = None  # nothing after this phase can be reused
    caption_embeds = _encode_captions(text_encoder, token_ids, torch_device)
    empty_embeds = _encode_captions(text_encoder, _token_ids(tokenizer, [""]), torch_device)[0]

    # phase 2: VAE
    if latest is None or latest["phase"] in ("text", "vae"):
        latest = latest if latest is not None and latest["phase"] == "vae" else None
        metrics.update(_train_vae(vae, data.images, config, seed=seed, device=torch_device,
                                  checkpoints=checkpoints, start=latest, progress=progress))  # fmt: skip
    else:
        vae.load_state_dict(_load_checkpoint(_vae_final(checkpoints, config))["models"]["vae"])
    metrics["vae_psnr_heldout"] = _reconstruction_psnr(vae, heldout.images, torch_device)
    metrics["vae_psnr_train"] = _reconstruction_psnr(vae, data.images[: config.eval_items],
                                                     torch_device)  # fmt: skip
    _log(f"VAE reconstruction PSNR on held-out images: {metrics['vae_psnr_heldout']:.2f} dB",
         progress)  # fmt: skip

    cache = out_dir / "latents.pt"
    if cache.exists():
        cached = _load_checkpoint(cache)
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
            _log(f"{probe:.2f} denoiser steps/s: {fitted} steps fit in {minutes} min "
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
    _log(f"wrote {pipeline_dir} ({metrics['folder_bytes'] / 1e6:.1f} MB)", progress)
    return pipeline_dir


def _vae_final(checkpoints: Path, config: TinyConfig) -> Path:
    path = _checkpoint_path(checkpoints, "vae", config.vae_steps)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the VAE of this run cannot be restored")
    return path


def _probe_rate(unet, latents, scaling_factor, caption_embeds, empty_embeds,
                config: TinyConfig, *, seed: int, device: torch.device) -> float:  # fmt: skip
    """Denoiser training steps per second, measured on copies so the real run is untouched."""
    import copy

    unet_copy = copy.deepcopy(unet)
    rng = torch.get_rng_state()
    with _scratch_directory() as scratch:
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


def _scratch_directory():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="diffprobe-tiny-")
