"""A CLIP of the user's choice as the judge of h-space edits: ``tiny-clip`` (embedded,
offline) or any ``CLIPModel`` folder or hub id. Images go in as float pixels (items, 3, H, W)
in [-1, 1] and stay differentiable (resized with antialiasing, normalised with the model's
own mean and std), so the directional CLIP loss back-propagates to Δh."""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from diffprobe.interventions.hspace.deltas import HSpaceError

__all__ = ["CLIP_ALIASES", "ClipScorer", "SHAPES_TEMPLATES", "IMAGENET_TEMPLATES", "load_clip"]

ASSETS = Path(str(resources.files("diffprobe"))) / "assets"
CLIP_ALIASES = {"tiny-clip": ASSETS / "tiny-clip"}
# Prompt templates whose text-feature differences are averaged (Asyrp: ImageNet templates).
SHAPES_TEMPLATES = ("{}", "a {} shape", "a small {} shape", "a large {} shape")
IMAGENET_TEMPLATES = ("a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.",
                      "a photo of the small {}.", "a cropped photo of a {}.",
                      "a bright photo of a {}.", "a close-up photo of a {}.",
                      "a rendering of a {}.")  # fmt: skip


class ClipScorer:
    """Image and text embeddings (unit norm) of one CLIP model."""

    def __init__(self, model, tokenizer, mean: Sequence[float], std: Sequence[float],
                 name: str, templates: Sequence[str]) -> None:  # fmt: skip
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.size = int(model.config.vision_config.image_size)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.name = name
        self.templates = tuple(templates)

    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(items, 3, H, W) in [-1, 1] -> unit embeddings (items, dim), differentiable."""
        x = (pixels.float() + 1) / 2
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                antialias=True, align_corners=False)  # fmt: skip
        x = (x - self.mean.to(x)) / self.std.to(x)
        output = self.model.get_image_features(pixel_values=x.to(self.model.dtype))
        output = output if isinstance(output, torch.Tensor) else output.pooler_output
        return torch.nn.functional.normalize(output.float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings (texts, dim)."""
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length,
                                return_tensors="pt")  # fmt: skip
        output = self.model.get_text_features(input_ids=tokens.input_ids,
                                              attention_mask=tokens.attention_mask)  # fmt: skip
        output = output if isinstance(output, torch.Tensor) else output.pooler_output
        return torch.nn.functional.normalize(output.float(), dim=-1)

    def concept(self, text: str) -> torch.Tensor:
        """Unit text embedding of ``text`` averaged over the templates (Asyrp's way)."""
        embeddings = self.texts([template.format(text) for template in self.templates])
        return torch.nn.functional.normalize(embeddings.mean(0), dim=-1)

    def direction(self, source: str, target: str) -> torch.Tensor:
        """ΔT: unit (E_T(target) − E_T(source)), each averaged over the templates."""
        if source.strip().lower() == target.strip().lower():
            raise HSpaceError(f"source and target text are the same ({source!r}); an edit "
                              "direction needs two different texts, e.g. --source red "
                              "--target blue")  # fmt: skip
        delta = self.concept(target) - self.concept(source)
        return torch.nn.functional.normalize(delta, dim=-1)


def load_clip(name: str = "tiny-clip", templates: Sequence[str] | None = None) -> ClipScorer:
    """``tiny-clip`` (offline), a local CLIP folder or a hub id (``openai/clip-vit-base-patch16``
    as Asyrp, ``openai/clip-vit-large-patch14`` as the reproduction and diffusers' docs)."""
    from transformers import CLIPModel, CLIPTokenizer

    path = CLIP_ALIASES.get(name, Path(name))
    source = str(path) if Path(path).exists() else name
    if name in CLIP_ALIASES and not Path(path).exists():
        raise HSpaceError(f"the embedded {name} is missing from {path}; reinstall diffprobe or "
                          "train it with `diffprobe train-tiny-clip`")  # fmt: skip
    try:
        model = CLIPModel.from_pretrained(source, torch_dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - every failure is "cannot load this CLIP"
        raise HSpaceError(f"could not load CLIP {name!r} ({type(err).__name__}); pass "
                          "'tiny-clip', a local CLIPModel folder or a hub id you can "
                          "reach") from None  # fmt: skip
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    processor = Path(source) / "preprocessor_config.json"
    if processor.is_file():
        config = json.loads(processor.read_text())
        mean, std = config.get("image_mean", mean), config.get("image_std", std)
    if templates is None:
        templates = SHAPES_TEMPLATES if name == "tiny-clip" else IMAGENET_TEMPLATES
    return ClipScorer(model, tokenizer, mean, std, name, templates)
