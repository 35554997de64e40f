"""The Diffusion Lens mechanism (Toker et al.): every text-encoder layer read out the way the
pipeline reads its own layer, put in place of that encoder's part of the pipeline's
``prompt_embeds``, and the native pipeline generating from it. The semantics (layer index,
readout, pooled vectors, padding, branches) are :mod:`diffprobe.lens`'s docstring and
``docs/lens.md``; the stage that generates a whole grid and writes it is
:mod:`diffprobe.stages.lens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffprobe import registry
from diffprobe.errors import DiffprobeError, did_you_mean
from diffprobe.models.base import Model
from diffprobe.models.towers import Tower

PADDING = ("keep", "full")
NORMS = ("pipeline", "final")
POOLED = ("full", "lens", "empty")


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


def default_pooled(model: Model, tower) -> str:
    """The family's default ``pooled``: ``empty`` for FLUX lensing its T5 encoder (as Toker et
    al.'s FLUX notebook), ``lens`` for an encoder that feeds only the pooled vector, ``full``
    otherwise."""
    if tower.pipeline_layer is None:
        return "lens"
    if model.family == "flux" and tower.pooled is None:
        return "empty"
    return "full"


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
        pooled: str | None = None,
        guidance_scale: float | None = None,
    ):
        _check_choice("padding", padding, PADDING)
        _check_choice("norm", norm, NORMS)
        self.model = model
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.prompts:
            raise LensError("no prompt given; pass at least one prompt")
        self.tower = _tower(model, encoder)
        pooled = default_pooled(model, self.tower) if pooled is None else pooled
        _check_choice("pooled", pooled, POOLED)
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
        self.empty_pooled = None
        if pooled == "empty":
            if self.pooled_embeds is None:
                raise LensError(
                    f"{what} feeds no pooled vector, so pooled='empty' would change nothing; "
                    "use pooled='full' (--pooled full)"
                )
            empty = model.encode_prompt([""] * len(self.prompts))
            self.empty_pooled = model.prompt_embeds(empty.cond)[1]
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
        if self.pooled == "empty" and layer != self.last_layer:
            # Toker et al.'s FLUX notebook: below the last layer the pooled vector is the empty
            # prompt's, so no final-layer text reaches the image through it
            pooled = self.empty_pooled.to(pooled.dtype)
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
        same_pooled = self.pooled in ("full", "empty") or tower.pipeline_layer in (
            None,
            tower.num_layers,
        )
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
    pooled: str | None = None,
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
