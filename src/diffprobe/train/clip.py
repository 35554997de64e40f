"""Train ``tiny-clip``: a transformers ``CLIPModel`` (vision + text towers) on the shapes world.

Contrastive (InfoNCE, learned temperature) on 32×32 shapes-world images and captions that name
a random non-empty subset of the image's factors (``"a red star"``, ``"blue"``, ``"a large
circle in the top left on black"``, or the world's full caption), so that short prompts such as
``"red"`` or ``"a blue shape"`` — what a directional CLIP loss and S_dir compare — land where
the images of that colour are. The tokenizer is ``tiny``'s (CLIP byte-level BPE learned from the
shapes captions, 16-token context). Saved with ``save_pretrained`` (model, tokenizer and a
``CLIPImageProcessor`` config: resize to 32 px, mean 0.5, std 0.5), so
``CLIPModel.from_pretrained`` and ``CLIPProcessor.from_pretrained`` load it.

Resumable (safetensors checkpoints, per-step generators), like :mod:`diffprobe.train.ddpm`.
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
    finish_metrics,
    log,
    open_run,
    prefixed,
    resume_state,
    run_metrics,
    save_state,
    staged_folder,
    step_generator,
)
from diffprobe.train.ddpm import downsample

__all__ = ["CLIP_KIND", "CLIPConfig", "caption_variant", "pixel_values", "train_tiny_clip",
           "zero_shot_accuracy"]  # fmt: skip

CLIP_KIND = "train-tiny-clip"
_ENTRIES = ("checkpoints", "model", "model.partial", "metrics.json")
_PART_ORDER = ("size", "colour", "shape", "quadrant", "background")


@dataclass(frozen=True)
class CLIPConfig(JsonConfig):
    """Everything that decides the weights of ``tiny-clip`` apart from ``seed``."""

    train_items: int = 8_000
    eval_items: int = 512
    image_size: int = 32
    patch_size: int = 4
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 128
    projection_dim: int = 64
    text_max_length: int = 16
    steps: int = 700
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    final_learning_rate_fraction: float = 0.05
    weight_decay: float = 0.05
    full_caption_fraction: float = 0.3
    checkpoint_every: int = 100
    save_dtype: str = "float16"

    @classmethod
    def small(cls) -> CLIPConfig:
        return cls(train_items=16, eval_items=8, image_size=16, hidden_size=32, layers=1,
                   heads=2, intermediate_size=64, projection_dim=16, steps=4, batch_size=4,
                   warmup_steps=1, checkpoint_every=2)  # fmt: skip


def caption_variant(factors: dict, rng: np.random.Generator, full_fraction: float) -> str:
    """A caption naming a random non-empty subset of the item's factors (or its own caption)."""
    from diffprobe.data import shapes

    if rng.random() < full_fraction:
        return shapes.caption(factors)
    keep = [name for name in _PART_ORDER if rng.random() < 0.5]
    if not keep:
        keep = [_PART_ORDER[rng.integers(len(_PART_ORDER))]]
    words = {
        "size": shapes.SIZES[int(factors["size"])],
        "colour": shapes.COLOUR_NAMES[int(factors["colour"])],
        "shape": shapes.SHAPES[int(factors["shape"])],
        "quadrant": shapes.QUADRANTS[int(factors["quadrant"])],
        "background": shapes.BACKGROUND_NAMES[int(factors["background"])],
    }
    noun = words["shape"] if "shape" in keep else "shape"
    text = " ".join(words[name] for name in ("size", "colour") if name in keep)
    text = f"a {text} {noun}".replace("  ", " ")
    if "quadrant" in keep:
        text += f" in the {words['quadrant']}"
    if "background" in keep:
        text += f" on {words['background']}"
    if keep == ["colour"] and rng.random() < 0.5:
        text = words["colour"]
    return text.replace("a a", "an a").replace("a o", "an o")


def pixel_values(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (items, H, W, 3) or float (items, 3, H, W) in [-1, 1] -> CLIP input (items, 3,
    size, size): [-1, 1] (mean 0.5, std 0.5 of [0, 1]); float input keeps its autograd graph."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(downsample(images, size)).permute(0, 3, 1, 2).float()
        return images / 127.5 - 1.0
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images.float(), size=(size, size),
                                                 mode="bilinear", antialias=True,
                                                 align_corners=False)  # fmt: skip
    return images.float()


def build_clip(config: CLIPConfig, tokenizer):
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel

    text = {"vocab_size": len(tokenizer), "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_hidden_layers": config.layers,
            "num_attention_heads": config.heads,
            "max_position_embeddings": config.text_max_length, "hidden_act": "quick_gelu",
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    vision = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
              "num_hidden_layers": config.layers, "num_attention_heads": config.heads,
              "image_size": config.image_size, "patch_size": config.patch_size,
              "hidden_act": "quick_gelu"}  # fmt: skip
    hf = HFConfig(text_config=text, vision_config=vision, projection_dim=config.projection_dim)
    return CLIPModel(hf)


def image_embeddings(model, pixels: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings (items, projection_dim), whatever transformers returns."""
    output = model.get_image_features(pixel_values=pixels)
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def text_embeddings(model, **tokens: torch.Tensor) -> torch.Tensor:
    """Projected text embeddings (items, projection_dim)."""
    output = model.get_text_features(**tokens)
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _tokens(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")  # fmt: skip
    return {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images: np.ndarray, factors: dict[str, np.ndarray],
                       size: int) -> dict[str, float]:  # fmt: skip
    """Zero-shot colour ("a {colour} shape") and shape ("a {shape}") accuracy."""
    from diffprobe.data import shapes

    model.eval()
    image_features = torch.nn.functional.normalize(
        image_embeddings(model, pixel_values(images, size)), dim=-1
    )
    scores = {}
    for factor, names, template in (("colour", shapes.COLOUR_NAMES, "a {} shape"),
                                    ("shape", shapes.SHAPES, "a {}")):  # fmt: skip
        prompts = [template.format(name) for name in names]
        text = text_embeddings(model, **_tokens(tokenizer, prompts))
        text = torch.nn.functional.normalize(text, dim=-1)
        predicted = (image_features @ text.T).argmax(1).numpy()
        scores[factor] = float(np.mean(predicted == np.asarray(factors[factor])))
    return scores


def train_tiny_clip(
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    resume: bool = True,
    progress: bool = True,
    config: CLIPConfig | None = None,
    threads: int | None = 1,
    minutes: float | None = None,
) -> Path:
    """Train ``tiny-clip`` into ``out_dir/model`` (``save_pretrained`` layout with tokenizer and
    image-processor config); ``metrics.json`` has timings and held-out zero-shot accuracy."""
    from transformers import CLIPImageProcessor

    from diffprobe.data import shapes
    from diffprobe.train.tokenizer import build_tokenizer, caption_corpus

    began = time.perf_counter()
    config = config or CLIPConfig()
    out_dir, checkpoints, device_ = open_run(out_dir, CLIP_KIND, _ENTRIES, device=device,
                                             threads=threads, resume=resume)  # fmt: skip

    tokenizer = build_tokenizer(caption_corpus(), model_max_length=config.text_max_length)
    data = shapes.sample(config.train_items, seed=seed, split="train")
    heldout = shapes.sample(config.eval_items, seed=seed, split="heldout")
    pixels = pixel_values(data.images, config.image_size).to(device_)

    torch.manual_seed(seed)
    model = build_clip(config, tokenizer).to(device_)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)  # fmt: skip
    flat, first = resume_state(checkpoints, "clip", config.to_json(), optimizer, resume=resume,
                               tag=CLIP_KIND, progress=progress)  # fmt: skip
    if flat is not None:
        model.load_state_dict(prefixed(flat, "model."))

    def checkpoint(step: int) -> None:
        save_state(checkpoints, "clip", step,
                   {f"model.{k}": v for k, v in model.state_dict().items()}, optimizer,
                   {"config": config.to_json(), "seed": seed})  # fmt: skip

    model.train()
    loss_value = float("nan")
    loop = StepLoop(config, optimizer, first, checkpoint=checkpoint, tag=CLIP_KIND, desc="tiny-clip",
                    progress=progress, began=began, minutes=minutes)  # fmt: skip
    for step in loop:
        generator = step_generator(seed, 21, step)
        index = batch_indices(generator, len(pixels), config.batch_size)
        rng = np.random.default_rng([seed, 21, step])
        texts = [caption_variant(shapes.item_factors(data.factors, int(i)), rng,
                                 config.full_caption_fraction) for i in index]  # fmt: skip
        # items with the same text are positives of each other, not negatives
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        targets = (same / same.sum(1, keepdim=True)).to(device_)
        tokens = {k: v.to(device_) for k, v in _tokens(tokenizer, texts).items()}
        output = model(pixel_values=pixels[index.to(device_)], **tokens)
        logits = output.logits_per_image
        loss = 0.5 * (torch.sum(-targets * logits.log_softmax(1), 1).mean()
                      + torch.sum(-targets * logits.T.log_softmax(1), 1).mean())  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        loss_value = loss.item()
        loop.bar.set_postfix(loss=f"{loss_value:.3f}")

    accuracy = zero_shot_accuracy(model, tokenizer, heldout.images, heldout.factors,
                                  config.image_size)  # fmt: skip
    model_dir = out_dir / "model"
    with staged_folder(model_dir) as staging:
        model.to("cpu", getattr(torch, config.save_dtype)).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        CLIPImageProcessor(size={"shortest_edge": config.image_size},
                           crop_size={"height": config.image_size, "width": config.image_size},
                           image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(staging)  # fmt: skip
    metrics = run_metrics(loop, seed=seed, device=device_, model=model, loss=loss_value)
    metrics.update({"zero_shot_heldout": accuracy, "heldout_items": config.eval_items})
    write_json(out_dir / "metrics.json", finish_metrics(metrics, began=began, folder=model_dir,
                                                        config_json=config.to_json()))  # fmt: skip
    log(CLIP_KIND, f"wrote {model_dir}: zero-shot {accuracy}", progress)
    return model_dir
