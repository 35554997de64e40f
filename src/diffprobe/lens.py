"""Diffusion Lens (Toker et al.): images generated from every intermediate text-encoder layer.

The text encoder of a text-to-image pipeline is cut after layer ``ℓ``; what it holds there is read
out the way the pipeline reads its own layer, put in place of that encoder's part of the
pipeline's ``prompt_embeds``, and the native pipeline generates from it. Nothing is patched: the
full embeddings come from the pipeline's own ``encode_prompt`` (through the model adapter), every
layer's hidden states from ``Model.encode_text``, and the pipeline is called with
``prompt_embeds=`` (and ``pooled_prompt_embeds=``, ``negative_prompt_embeds=`` ...).

Semantics (``docs/lens.md`` has the table per family; ``lens.json`` repeats them per run):

- **Layer index.** Layer ``ℓ`` of an encoder is ``hidden_states[ℓ]``: the output of its first
  ``ℓ`` blocks (``0`` is the token embeddings, before any block). The valid layers run from 0 to
  the layer the pipeline itself reads, so the *last lens layer reproduces the normal generation*
  bit for bit: ``L`` for SD 1.x/2.x CLIP and for every T5, ``L - 1`` for the CLIP encoders of
  SDXL and SD3/3.5, which read ``hidden_states[-2]``.
- **Readout** (``norm="pipeline"``, the default): the pipeline's own readout applied to layer
  ``ℓ``. CLIP read from ``last_hidden_state`` (SD 1.x/2.x): the encoder's final layer norm,
  ``final_layer_norm(hidden_states[ℓ])``. CLIP read from ``hidden_states[-2]`` (SDXL, SD3): no
  norm, as the pipeline. T5 (SD3, FLUX, IF): the final norm on every layer but the last, which
  is already normalised. ``norm="final"`` applies the final layer norm at every CLIP layer
  (``0 .. L``), also for SDXL and SD3 (whose last lens layer then does not reproduce the normal
  generation).
- **Pooled vectors** (SDXL, SD3, FLUX) come from the full encoders (``pooled="full"``, the
  default). ``pooled="lens"`` computes the lensed encoder's pooled vector from layer ``ℓ`` as
  CLIP does from its last layer: final layer norm, end-of-text token, ``text_projection`` when
  the encoder has one. FLUX reads nothing but the pooled vector of its CLIP encoder, so lensing
  it needs ``pooled="lens"``.
- **Other encoders** of dual and triple-encoder pipelines are not lensed: their part of the
  embeddings is the full encoder's. ``encoder=`` picks the lensed one.
- **Only the conditional branch is lensed.** The unconditional branch of classifier-free
  guidance is what the pipeline uses by default (the full encoding of ``""``; zeros for SDXL
  base, ``force_zeros_for_empty_prompt``).
- **Same noise for every layer.** Image (layer, seed ``s``) is generated with a fresh
  ``torch.Generator("cpu").manual_seed(s)``, exactly as ``model.generate(seed=s)``, so all
  layers start from the same initial noise (and draw the same sampler noise) and differ only by
  the conditioning.
- **Padding** tokens (every position after the first end-of-text token) keep the lensed layer's
  states (``padding="keep"``, the default), or take the full encoder's (``padding="full"``).

    import diffprobe
    from diffprobe.lens import lens
    result = lens(diffprobe.load("tiny"), "a red circle in the top left", seeds=[0, 1])
    result.save("runs/lens")   # one PNG per (layer, seed), grid.png, lens.json
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffprobe import registry
from diffprobe.errors import DiffprobeError, did_you_mean
from diffprobe.io import atomic_path, claim_output, write_csv, write_json
from diffprobe.models.base import Model
from diffprobe.models.towers import Tower

log = logging.getLogger(__name__)

__all__ = [
    "EmergenceResult",
    "LensEmbeddings",
    "LensError",
    "LensResult",
    "Tower",
    "demo",
    "emergence",
    "emergence_accuracy",
    "lens",
    "lens_embeddings",
    "lens_layers",
    "parse_layers",
    "plot_emergence",
    "towers",
]

PADDING = ("keep", "full")
NORMS = ("pipeline", "final")
POOLED = ("full", "lens")
EMERGENCE_ATTRIBUTES = ("colour", "shape", "quadrant")
LENS_KIND = "lens"


class LensError(DiffprobeError, ValueError):
    """A lens request the model cannot serve (no text encoder, unknown encoder, bad layer)."""


# ------------------------------------------------------------------------------- the encoders


def _clip_core(encoder: torch.nn.Module) -> torch.nn.Module:
    """The module with ``embeddings``, ``encoder.layers`` and ``final_layer_norm``."""
    return encoder.text_model if hasattr(encoder, "text_model") else encoder


def _adapter(model: Model) -> type[Model]:
    # a Model knows its adapter; anything else with .family and .pipe (a pipeline of meta-device
    # encoders, say) is read by its family's registered adapter
    return type(model) if isinstance(model, Model) else registry.adapter(model.family)


def towers(model: Model) -> dict[str, Tower]:
    """The text encoders of ``model`` that can be lensed, in the pipeline's order (the
    adapter's :meth:`~diffprobe.models.Model.text_towers`).

    Raises :class:`LensError` for models without a text encoder (DDPM)."""
    found = _adapter(model).text_towers(model.pipe)
    if not found:
        what = model.name or type(model.pipe).__name__
        lensable = [a.family for a in registry.adapters() if a.default_encoder]
        raise LensError(
            f"{what} ({model.family} family) has no text encoder, so there is nothing to lens: "
            f"the Diffusion Lens needs a text-conditioned model ({', '.join(lensable)})"
        )
    return found


def _tower(model: Model, encoder: str | None) -> Tower:
    available = towers(model)
    name = encoder or _adapter(model).default_tower(available)
    if name not in available:
        close = did_you_mean(str(name), list(available))
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise LensError(
            f"unknown encoder '{name}' for {model.name or model.family}: it has "
            f"{', '.join(available)}.{hint} Pass one of those as encoder= (--encoder)"
        )
    return available[name]


def lens_layers(model: Model, encoder: str | None = None, norm: str = "pipeline") -> list[int]:
    """The layers the lens can read from ``encoder`` (default: the family's, see
    ``docs/lens.md``); the last one is the layer the pipeline itself reads."""
    _check_choice("norm", norm, NORMS)
    return _tower(model, encoder).layers(norm)


def parse_layers(
    spec: str | int | Sequence[int] | None, available: Sequence[int], what: str = "the encoder"
) -> list[int]:
    """``"all"`` / ``None`` -> every available layer; ``"0,2,4"``, an int or a list of ints ->
    those layers, negative ones counted from the last (``-1`` is the last lens layer).
    Duplicates are dropped, the order is kept."""
    available = list(available)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return available
    if isinstance(spec, str):
        values = []
        for word in spec.replace(" ", "").split(","):
            if not word:
                continue
            try:
                values.append(int(word))
            except ValueError:
                raise LensError(
                    f"layers must be 'all' or comma-separated integers such as '0,2,4', got "
                    f"{spec!r}"
                ) from None
    elif isinstance(spec, int):
        values = [spec]
    else:
        values = [int(v) for v in spec]
    if not values:
        raise LensError(f"no layers in {spec!r}; pass 'all' or integers such as '0,2,4'")
    chosen: list[int] = []
    low, high = available[0], available[-1]
    for value in values:
        layer = high + 1 + value if value < 0 else value
        if not low <= layer <= high:
            raise LensError(
                f"layer {value} is out of range for {what}: the lens layers are {low}..{high} "
                f"(0 = token embeddings, {high} = the layer the pipeline reads); negative layers "
                "count from the last"
            )
        if layer not in chosen:
            chosen.append(layer)
    return chosen


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise LensError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


# ------------------------------------------------------------------------------- embeddings


def _padding_mask(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(items, tokens) bool: True at every position after the first end-of-text token."""
    is_eos = input_ids == eos_token_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), input_ids.shape[1])
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return positions[None] > first[:, None]


def _clip_eos_positions(encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The token CLIP pools, by transformers' own rule (legacy ``eos_token_id == 2``: argmax)."""
    eos = getattr(_clip_core(encoder), "eos_token_id", encoder.config.eos_token_id)
    ids = input_ids.to(torch.int)
    if eos == 2:
        return ids.argmax(-1)
    return (ids == eos).int().argmax(-1)


class LensEmbeddings:
    """The full embeddings and every layer of the lensed encoder for a batch of prompts.

    ``pipeline_kwargs(layer)`` gives the keyword arguments of the native pipeline's
    ``__call__`` (``prompt_embeds``, ``negative_prompt_embeds``, and the pooled ones where the
    family has them) with ``layer`` lensed; build it with :func:`lens_embeddings`.
    """

    def __init__(
        self,
        model: Model,
        prompts: Sequence[str],
        *,
        encoder: str | None = None,
        padding: str = "keep",
        norm: str = "pipeline",
        pooled: str = "full",
        guidance_scale: float | None = None,
    ):
        _check_choice("padding", padding, PADDING)
        _check_choice("norm", norm, NORMS)
        _check_choice("pooled", pooled, POOLED)
        self.model = model
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.prompts:
            raise LensError("no prompt given; pass at least one prompt")
        self.tower = _tower(model, encoder)
        what = f"{self.tower.encoder} of {model.name or model.family}"
        if pooled == "lens" and self.tower.pooled is None:
            raise LensError(
                f"{what} feeds no pooled vector, so pooled='lens' would change nothing; use "
                "pooled='full' (--pooled full)"
            )
        if pooled == "full" and self.tower.pipeline_layer is None:
            raise LensError(
                f"{what} feeds only the pooled vector, so with pooled='full' every layer would "
                "give the same image; pass pooled='lens' (--pooled lens)"
            )
        self.padding, self.norm, self.pooled = padding, norm, pooled
        self.guidance_scale = (
            float(model.default_guidance_scale) if guidance_scale is None else float(guidance_scale)
        )
        self.cfg = model.generation_uses_cfg(self.guidance_scale)

        # the pipeline's own embeddings, with the unconditional branch its generation uses
        full = model.encode_prompt(self.prompts, cfg=self.cfg)
        self.sequence, self.pooled_embeds = model.prompt_embeds(full.cond)
        self.uncond_sequence = self.uncond_pooled = None
        if full.uncond is not None:
            self.uncond_sequence, self.uncond_pooled = model.prompt_embeds(full.uncond)
        text = model.encode_text(self.prompts)
        self.hidden_states = text.hidden_states[self.tower.encoder]
        self.input_ids = text.input_ids[self.tower.encoder]
        tokenizer = getattr(model.pipe, self.tower.tokenizer)
        self.padding_mask = _padding_mask(self.input_ids, tokenizer.eos_token_id)
        self.encoder_module = getattr(model.pipe, self.tower.encoder)

    # -- layers ----------------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        return self.tower.layers(self.norm)

    @property
    def last_layer(self) -> int:
        return self.layers[-1]

    def _final_norm(self) -> torch.nn.Module:
        if self.tower.kind == "t5":
            return self.encoder_module.encoder.final_layer_norm
        return _clip_core(self.encoder_module).final_layer_norm

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            parse_layers([layer], self.layers, f"{self.tower.encoder} ({self.norm} readout)")

    def site(self, layer: int) -> str:
        """The site whose output layer ``layer`` is."""
        name = self.tower.encoder
        if self.tower.kind == "t5":
            if layer == 0:
                return f"{name}.encoder.embed_tokens"
            if layer == self.tower.num_layers:
                return f"{name}.encoder.final_layer_norm"
            return f"{name}.encoder.block.{layer - 1}"
        prefix = f"{name}.text_model." if hasattr(self.encoder_module, "text_model") else f"{name}."
        return prefix + ("embeddings" if layer == 0 else f"encoder.layers.{layer - 1}")

    # -- readouts --------------------------------------------------------------------------------

    def token_embeddings(self, layer: int) -> torch.Tensor:
        """The lensed encoder's token embeddings at ``layer`` (items, tokens, width), read out
        as the pipeline reads its own layer (see the module doc); padding not yet replaced."""
        self._check_layer(layer)
        states = self.hidden_states[layer]
        with torch.no_grad():
            if self.tower.applies_norm(layer, self.norm):
                states = self._final_norm()(states)
        return states

    def pooled_embedding(self, layer: int) -> torch.Tensor:
        """The lensed CLIP encoder's pooled vector from ``layer`` (items, width): final layer
        norm, end-of-text token, ``text_projection`` when the encoder has one."""
        self._check_layer(layer)
        return self._pooled_from(layer)

    def _pooled_from(self, layer: int) -> torch.Tensor:
        with torch.no_grad():
            states = self._final_norm()(self.hidden_states[layer])
            rows = torch.arange(states.shape[0], device=states.device)
            pooled = states[rows, _clip_eos_positions(self.encoder_module, self.input_ids)]
            projection = getattr(self.encoder_module, "text_projection", None)
            if projection is not None:
                pooled = projection(pooled)
        return pooled

    def conditional(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, pooled_prompt_embeds or None) with ``layer`` lensed."""
        tower = self.tower
        sequence = self.sequence
        if tower.pipeline_layer is not None:
            where = (slice(None), tower.tokens, tower.features)
            lensed = self.token_embeddings(layer).to(sequence.dtype)
            if self.padding == "full":
                full = sequence[where]
                mask = self.padding_mask[..., None].to(lensed.device)
                lensed = torch.where(mask, full, lensed)
            sequence = sequence.clone()
            sequence[where] = lensed
        pooled = self.pooled_embeds
        if self.pooled == "lens":
            pooled = pooled.clone()
            pooled[:, tower.pooled] = self.pooled_embedding(layer).to(pooled.dtype)
        return sequence, pooled

    def pipeline_kwargs(self, layer: int) -> dict[str, Any]:
        """Keyword arguments of the native pipeline's ``__call__`` with ``layer`` lensed in the
        conditional branch and the full unconditional branch."""
        sequence, pooled = self.conditional(layer)
        kwargs: dict[str, Any] = {"prompt_embeds": sequence}
        if pooled is not None:
            kwargs["pooled_prompt_embeds"] = pooled
        if self.uncond_sequence is not None:
            kwargs["negative_prompt_embeds"] = self.uncond_sequence
            if self.uncond_pooled is not None:
                kwargs["negative_pooled_prompt_embeds"] = self.uncond_pooled
        return kwargs

    def readout_check(self) -> dict[str, float]:
        """Largest absolute difference between the lens readout of the layer the pipeline reads
        and the pipeline's own embedding (0.0: the last lens layer reproduces it exactly)."""
        tower, check = self.tower, {}
        if tower.pipeline_layer is not None:
            states = self.hidden_states[tower.pipeline_layer]
            if tower.applies_norm(tower.pipeline_layer, "pipeline"):
                with torch.no_grad():
                    states = self._final_norm()(states)
            own = self.sequence[:, tower.tokens, tower.features]
            check["token_embeddings"] = float((states.to(own.dtype) - own).abs().max())
        if tower.pooled is not None:
            own = self.pooled_embeds[:, tower.pooled]
            lensed = self._pooled_from(tower.num_layers).to(own.dtype)
            check["pooled"] = float((lensed - own).abs().max())
        return check

    def reproduces_generation(self) -> bool:
        """Whether the settings make the last lens layer the pipeline's own conditioning."""
        tower = self.tower
        same_norm = tower.kind == "t5" or tower.pipeline_layer is None or self.norm == "pipeline"
        same_norm = same_norm or tower.pipeline_norm
        same_pooled = self.pooled == "full" or tower.pipeline_layer in (None, tower.num_layers)
        return same_norm and same_pooled

    def semantics(self) -> list[str]:
        """What this lens run computes, in sentences (written into ``lens.json``)."""
        tower, model = self.tower, self.model
        others = [name for name in towers(model) if name != tower.encoder]
        lines = [
            f"Lensed encoder: {tower.encoder} ({tower.kind}, {tower.num_layers} layers). Layer ℓ "
            "is hidden_states[ℓ], the output of its first ℓ blocks (0 = token embeddings); the "
            f"lens layers are {self.layers[0]}..{self.last_layer}.",
            f"Readout of layer ℓ: {tower.readout_text(self.norm)}.",
            "Only the conditional branch is lensed; the unconditional branch is the pipeline's "
            "own (full encoders)"
            + ("." if self.cfg else " — unused here: this generation runs without CFG."),
            "Every (layer, seed) image starts from the same initial noise: a fresh "
            "torch.Generator('cpu').manual_seed(seed) per image, as model.generate(seed=seed) "
            "uses; layers differ only by the conditioning.",
            "Padding tokens (after the first end-of-text token) "
            + (
                "keep the lensed layer's states."
                if self.padding == "keep"
                else "take the full encoder's states (the pipeline's own embedding there)."
            ),
        ]
        if others:
            lines.append(
                f"Not lensed, from the full encoders: {', '.join(others)}"
                + (
                    " and the pooled vector."
                    if self.pooled == "full" and tower.pooled is not None
                    else "."
                )  # fmt: skip
            )
        if self.pooled == "lens":
            lines.append(
                f"The pooled vector of {tower.encoder} is computed from layer ℓ: final layer "
                "norm, end-of-text token, text_projection where the encoder has one."
            )
        elif self.pooled_embeds is not None:
            lines.append("The pooled vector is the full encoders' (pooled='full').")
        last = "reproduces" if self.reproduces_generation() else "does not reproduce"
        lines.append(
            f"With these settings the last lens layer ({self.last_layer}) {last} the normal "
            "generation."
        )
        return lines


def lens_embeddings(
    model: Model,
    prompts: str | Sequence[str],
    *,
    encoder: str | None = None,
    padding: str = "keep",
    norm: str = "pipeline",
    pooled: str = "full",
    guidance_scale: float | None = None,
) -> LensEmbeddings:
    """Encode ``prompts`` once, fully and layer by layer; see :class:`LensEmbeddings`."""
    return LensEmbeddings(
        model, prompts, encoder=encoder, padding=padding, norm=norm, pooled=pooled,
        guidance_scale=guidance_scale,
    )  # fmt: skip


# ------------------------------------------------------------------------------- generation


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def generate_from(
    model: Model,
    pipeline_kwargs: dict[str, Any],
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    size: int,
) -> np.ndarray:
    """The native pipeline on precomputed embeddings: (items, size, size, 3) floats in [0, 1].

    Every item draws its noise from a fresh ``torch.Generator("cpu").manual_seed(seed)``, as
    ``model.generate(seed=seed)`` does for one prompt."""
    items = int(pipeline_kwargs["prompt_embeds"].shape[0])
    if items == 1:
        generator: Any = torch.Generator("cpu").manual_seed(seed)
    else:
        generator = [torch.Generator("cpu").manual_seed(seed) for _ in range(items)]
    with model.cfg(model.generation_uses_cfg(guidance_scale)), torch.no_grad():
        result = model.pipe(
            **pipeline_kwargs,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            height=size,
            width=size,
            output_type="np",
        )
    return np.asarray(result.images, dtype=np.float32)


@dataclass
class LensResult:
    """``images``: uint8 (prompts, layers, seeds, height, width, 3); ``metadata`` as written to
    ``lens.json``."""

    images: np.ndarray
    prompts: list[str]
    layers: list[int]
    seeds: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)

    def image(self, layer: int, seed: int | None = None, prompt: int = 0) -> np.ndarray:
        """uint8 (height, width, 3) of one (layer, seed); ``seed`` defaults to the first."""
        seed = self.seeds[0] if seed is None else seed
        if layer not in self.layers or seed not in self.seeds:
            raise LensError(
                f"no image for layer {layer}, seed {seed}: this result has layers {self.layers} "
                f"and seeds {self.seeds}"
            )
        return self.images[prompt, self.layers.index(layer), self.seeds.index(seed)]

    def file_name(self, layer: int, seed: int, prompt: int = 0) -> str:
        stem = f"layer{layer:02d}_seed{seed}.png"
        return stem if len(self.prompts) == 1 else f"prompt{prompt:03d}_{stem}"

    def grid(self) -> Any:
        """A PIL image: one column per layer (labelled), one row per (prompt, seed); the
        prompt on top when there is one."""
        title = None
        if len(self.prompts) == 1:
            encoder = self.metadata.get("encoder")
            title = repr(self.prompts[0]) + (f", {encoder}" if encoder else "")
        return _grid(self.images, self.layers, self.seeds, len(self.prompts) > 1, title)

    def save(self, out: str | Path) -> Path:
        """Write one PNG per (prompt, layer, seed), ``grid.png`` and ``lens.json`` into the lens
        folder ``out`` (claimed: new, empty or an earlier lens output); each file is written
        atomically. Returns ``out``."""
        from PIL import Image

        out = claim_output(out, LENS_KIND)
        files = []
        for p in range(len(self.prompts)):
            for li, layer in enumerate(self.layers):
                for si, seed in enumerate(self.seeds):
                    name = self.file_name(layer, seed, p)
                    _save_image(Image.fromarray(self.images[p, li, si]), out / name)
                    files.append({"prompt": p, "layer": layer, "seed": seed, "file": name})
        _save_image(self.grid(), out / "grid.png")
        write_json(out / "lens.json", dict(self.metadata, files=files, grid="grid.png"))
        return out


def _save_image(image: Any, path: Path) -> None:
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _grid(
    images: np.ndarray,
    layers: list[int],
    seeds: list[int],
    by_prompt: bool,
    title: str | None = None,
) -> Any:
    from PIL import Image, ImageDraw

    prompts, _, _, height, width, _ = images.shape
    # labels stay readable on 32 px thumbnails: upscale small images (nearest neighbour)
    scale = max(1, int(np.ceil(96 / max(height, width))))
    cell_h, cell_w, gap = height * scale, width * scale, 4
    font = _font(12)
    header = 18 if title else 0
    top, left = header + 20, 64 if by_prompt else 48
    canvas = Image.new(
        "RGB",
        (left + len(layers) * (cell_w + gap), top + prompts * len(seeds) * (cell_h + gap)),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((3, 3), title, fill="black", font=font)
    for li, layer in enumerate(layers):
        draw.text((left + li * (cell_w + gap) + 2, header + 3), f"layer {layer}", fill="black",
                  font=font)  # fmt: skip
    for p in range(prompts):
        for si, seed in enumerate(seeds):
            row = p * len(seeds) + si
            y = top + row * (cell_h + gap)
            label = f"p{p} s{seed}" if by_prompt else f"seed {seed}"
            draw.text((3, y + cell_h // 2 - 6), label, fill="black", font=font)
            for li in range(len(layers)):
                tile = Image.fromarray(images[p, li, si])
                if scale > 1:
                    tile = tile.resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(tile, (left + li * (cell_w + gap), y))
    return canvas


def _as_model(model: Model | str | Path) -> Model:
    if isinstance(model, Model):
        return model
    import diffprobe

    return diffprobe.load(model)


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    import diffprobe

    return {"diffprobe": diffprobe.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}  # fmt: skip


def lens(
    model: Model | str | Path,
    prompt: str | Sequence[str],
    *,
    layers: str | int | Sequence[int] | None = "all",
    seeds: Sequence[int] = (0,),
    steps: int = 25,
    guidance_scale: float | None = None,
    encoder: str | None = None,
    padding: str = "keep",
    norm: str = "pipeline",
    pooled: str = "full",
    size: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> LensResult:
    """Generate an image from every requested layer of one text encoder, for every seed.

    ``prompt``: one prompt or several (generated ``batch_size`` at a time; item ``i`` of a
    batch draws the same noise as it would alone). ``layers``: ``"all"``, ``"0,2,4"`` or ints
    (negative from the last lens layer); ``guidance_scale`` defaults to the family's
    ``model.generate`` default. See the module doc for the semantics of ``encoder``,
    ``padding`` (``"keep"``/``"full"``), ``norm`` (``"pipeline"``/``"final"``) and ``pooled``
    (``"full"``/``"lens"``). Returns a :class:`LensResult` with uint8 images (prompts, layers,
    seeds, size, size, 3).
    """
    from tqdm.auto import tqdm

    model = _as_model(model)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    seeds = [int(s) for s in ([seeds] if isinstance(seeds, int) else seeds)]
    if not seeds or any(s < 0 for s in seeds):
        raise LensError(f"seeds must be one or more non-negative integers, got {seeds}")
    if steps < 1 or batch_size < 1:
        raise LensError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    size = size or model.resolution
    model.check_size(size)
    started = time.perf_counter()
    batches = [
        lens_embeddings(
            model,
            prompts[first : first + batch_size],
            encoder=encoder,
            padding=padding,
            norm=norm,
            pooled=pooled,
            guidance_scale=guidance_scale,
        )  # fmt: skip
        for first in range(0, len(prompts), batch_size)
    ]
    first = batches[0]
    chosen = parse_layers(layers, first.layers, f"{first.tower.encoder} of "
                          f"{model.name or model.family}")  # fmt: skip
    check = first.readout_check()
    if first.reproduces_generation() and any(value > 0 for value in check.values()):
        log.warning(
            "the lens readout of the pipeline's own layer differs from the pipeline's embedding by "
            "up to %.3g: the last lens layer will not reproduce the normal generation exactly",
            max(check.values()),
        )
    images = np.empty((len(prompts), len(chosen), len(seeds), size, size, 3), dtype=np.uint8)
    bar = tqdm(chosen, desc="lens layers", unit="layer", disable=not progress)
    for li, layer in enumerate(bar):
        bar.set_postfix(layer=layer)
        offset = 0
        for batch in batches:
            kwargs = batch.pipeline_kwargs(layer)
            count = len(batch.prompts)
            for si, seed in enumerate(seeds):
                generated = generate_from(model, kwargs, seed=seed, steps=steps,
                                          guidance_scale=batch.guidance_scale, size=size)  # fmt: skip
                images[offset : offset + count, li, si] = _to_uint8(generated)
            offset += count
    metadata = {
        "method": "diffusion lens (Toker et al.)",
        "model": {
            "name": model.name,
            "family": model.family,
            "pipeline": type(model.pipe).__name__,
        },  # fmt: skip
        "prompts": prompts,
        "encoder": first.tower.encoder,
        "encoder_kind": first.tower.kind,
        "encoder_layers": first.tower.num_layers,
        "pipeline_layer": first.tower.pipeline_layer,
        "lens_layers": first.layers,
        "layers": [
            {
                "layer": layer,
                "hidden_states_index": layer,
                "site": first.site(layer),
                "final_norm": first.tower.applies_norm(layer, norm),
            }
            for layer in chosen
        ],  # fmt: skip
        "seeds": seeds,
        "steps": steps,
        "guidance_scale": first.guidance_scale,
        "cfg": first.cfg,
        "size": size,
        "padding": padding,
        "norm": norm,
        "pooled": pooled,
        "semantics": first.semantics(),
        "readout_check_max_abs_difference": check,
        "last_layer_reproduces_generation": first.reproduces_generation(),
        "seconds": round(time.perf_counter() - started, 3),
        "versions": _versions(),
    }
    return LensResult(images, prompts, chosen, seeds, metadata)


# ------------------------------------------------------------------------------- emergence


@dataclass
class EmergenceResult:
    """Attribute accuracy of lens images per layer: ``accuracy[attribute]`` is (layers,)."""

    layers: list[int]
    accuracy: dict[str, np.ndarray]
    chance: dict[str, float]
    items: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One row per (layer, attribute): layer, attribute, accuracy, chance."""
        return [
            {
                "layer": layer,
                "attribute": name,
                "accuracy": float(values[i]),
                "chance": self.chance[name],
            }  # fmt: skip
            for name, values in self.accuracy.items()
            for i, layer in enumerate(self.layers)
        ]

    def write_csv(self, path: str | Path) -> Path:
        """``rows()`` as CSV (layer, attribute, accuracy, chance), written atomically."""
        return write_csv(path, self.rows(), ["layer", "attribute", "accuracy", "chance"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "accuracy": {
                name: [round(float(v), 4) for v in values] for name, values in self.accuracy.items()
            },  # fmt: skip
            "chance": self.chance,
            "items": self.items,
            **self.metadata,
        }


def _chance() -> dict[str, float]:
    from diffprobe.data import shapes

    counts = {"colour": len(shapes.COLOUR_NAMES), "shape": len(shapes.SHAPES),
              "quadrant": len(shapes.QUADRANTS), "size": len(shapes.SIZES),
              "background": len(shapes.BACKGROUND_NAMES)}  # fmt: skip
    return {name: 1.0 / count for name, count in counts.items()}


def _to_shapes_size(images: np.ndarray) -> np.ndarray:
    """uint8 (items, h, w, 3) -> (items, 64, 64, 3), the size the attribute reader reads."""
    from PIL import Image

    from diffprobe.data.shapes import IMAGE_SIZE

    if images.shape[1:3] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    return np.stack([
        np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
        for image in images
    ])  # fmt: skip


def emergence_accuracy(
    images: np.ndarray,
    factors: dict[str, np.ndarray],
    attributes: Sequence[str] = EMERGENCE_ATTRIBUTES,
    reader_path: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """Per-layer attribute accuracy of lens images.

    ``images``: uint8 (items, layers, seeds, height, width, 3) (as ``LensResult.images``);
    ``factors``: the true factors of the items (``ShapesSample.factors``), each (items,).
    Returns ``attribute -> (layers,)``: the fraction of (item, seed) images whose attribute, read
    by ``diffprobe.data.attributes.read_attributes``, equals the true factor (an unreadable
    image counts as wrong)."""
    from diffprobe.data.attributes import read_attributes

    items, layers, seeds = images.shape[:3]
    truth = {name: np.repeat(np.asarray(factors[name]), seeds) for name in attributes}
    accuracy = {name: np.zeros(layers) for name in attributes}
    for li in range(layers):
        flat = _to_shapes_size(images[:, li].reshape(items * seeds, *images.shape[3:]))
        read = read_attributes(flat, reader_path)
        for name in attributes:
            accuracy[name][li] = float(np.mean(read[name] == truth[name]))
    return accuracy


def emergence(
    model: Model | str | Path,
    captions: Sequence[str],
    factors: dict[str, np.ndarray],
    *,
    layers: str | int | Sequence[int] | None = "all",
    seeds: Sequence[int] = (0,),
    steps: int = 20,
    guidance_scale: float | None = None,
    encoder: str | None = None,
    padding: str = "keep",
    attributes: Sequence[str] = EMERGENCE_ATTRIBUTES,
    batch_size: int = 16,
    progress: bool = True,
) -> EmergenceResult:
    """When does each attribute emerge in the text encoder? Lens images of shapes-world
    ``captions`` at every layer, read back against the true ``factors`` (see
    :func:`emergence_accuracy`). Chance levels are 1 / number of values per attribute."""
    result = lens(model, list(captions), layers=layers, seeds=seeds, steps=steps,
                  guidance_scale=guidance_scale, encoder=encoder, padding=padding,
                  batch_size=batch_size, progress=progress)  # fmt: skip
    accuracy = emergence_accuracy(result.images, factors, attributes)
    chance = _chance()
    metadata = {key: result.metadata[key] for key in
                ("model", "encoder", "encoder_layers", "steps", "guidance_scale", "padding",
                 "seeds", "size", "seconds")}  # fmt: skip
    return EmergenceResult(result.layers, accuracy, {name: chance[name] for name in attributes},
                           len(captions) * len(result.seeds), metadata)  # fmt: skip


def plot_emergence(result: EmergenceResult, path: str | Path, title: str | None = None) -> Path:
    """Accuracy against layer, one line per attribute, dashed chance levels; PNG at ``path``."""
    from diffprobe.report.figures import new_figure, save_figure

    figure = new_figure(figsize=(5.5, 3.6), layout="constrained")
    axes = figure.subplots()
    for index, (name, values) in enumerate(result.accuracy.items()):
        colour = f"C{index}"
        axes.plot(result.layers, values, marker="o", color=colour, label=name)
        axes.axhline(result.chance[name], color=colour, linestyle=":", linewidth=1)
    axes.set_xlabel("text-encoder layer (0 = token embeddings)")
    axes.set_ylabel("attribute accuracy")
    axes.set_xticks(result.layers)
    axes.set_ylim(0, 1.02)
    axes.set_title(title or f"Diffusion Lens: attribute emergence ({result.items} images)")
    axes.legend(title="dotted: chance", fontsize=8)
    return save_figure(figure, path)


# ------------------------------------------------------------------------------- make demo


def demo(model: str, out: Path, caption: str = "a small red circle in the top left") -> dict:
    """``make demo``: the lens grid of one caption (every layer, 2 seeds, 20 steps) in ``out``."""
    out = Path(out)
    loaded = _as_model(model)
    result = lens(loaded, caption, layers="all", seeds=[0, 1], steps=20, guidance_scale=5.0,
                  progress=False)  # fmt: skip
    result.save(out)
    summary = {
        "grid": str(out / "grid.png"),
        "metadata": str(out / "lens.json"),
        "encoder": result.metadata["encoder"],
        "layers": result.layers,
        "seeds": result.seeds,
        "last_layer_reproduces_generation": result.metadata["last_layer_reproduces_generation"],
        "seconds": result.metadata["seconds"],
    }
    print(f"== diffusion lens on {loaded.name or model} ==", flush=True)
    print(f"  caption: {caption!r}; {result.metadata['encoder']} layers {result.layers[0]}.."
          f"{result.layers[-1]}, seeds {result.seeds}, {result.metadata['seconds']:.1f} s", flush=True)  # fmt: skip
    print(f"  grid: {summary['grid']}", flush=True)
    return summary
