"""Attribution: per-token cross-attention maps (and output-space maps) of generated images.

:func:`attribute` generates each prompt with :func:`~diffprobe.hooks.attention.capture_attention`
on the adapter's attention sites (:meth:`~diffprobe.models.Model.attention_sites`) and turns
the records into one array per prompt, ``(tokens, layers, timesteps, rows, columns)``: every
site's maps resized to the finest attention grid, for the prompt's tokens (its start, words and
end token; padding is left out). Only the **conditional branch** is read: the ``"cond"`` half of
CFG-doubled batches, the whole batch when guidance is off (branch ``"none"``); the
unconditional half is never mixed in. With a store (``store=``) each prompt's array is written
to zarr as float16 as soon as it is made, so memory does not grow with the number of prompts.

Token alignment (:func:`prompt_tokens`): the text sequence the denoiser attends to is made of
one segment per text encoder that feeds tokens (its :class:`~diffprobe.models.towers.Tower`
``tokens`` slice): SD/SDXL and IF one segment (SDXL's two CLIP encoders share the 77
positions), SD3 the 77 CLIP positions then the T5 tokens, FLUX the T5 tokens. A word is found
in every segment by its own tokenizer (all occurrences; its pieces when it is split) and its
map sums all those positions.

Weighting ``rollout`` (``weighting="rollout"`` in :meth:`PromptAttribution.token_maps` and
the word maps; ``diffprobe attribution --weighting rollout``): the map of input token t is
Σ_j R[j, t] · map_j over the prompt's positions j (start .. end), R the text encoder's
attention rollout (:func:`encoder_rollout`), so a word's map also collects the maps of the
later positions that read it (a causal encoder such as CLIP writes each word into every later
position); ``rollout-words`` then takes each pixel's share over the prompt's word tokens
(:func:`~diffprobe.analysis.attribution.word_share`); ``output-rollout-words`` does the same
on the value-space scores of cross-attention (:mod:`diffprobe.hooks.attention`, UNet families
only) instead of the probabilities. Families whose token positions are fed by one text encoder only (SD 1.x/2.x,
`tiny`, FLUX, IF); SDXL's and SD3's positions mix two or three encoders and are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffprobe.analysis import attribution as maths
from diffprobe.errors import DiffprobeError
from diffprobe.hooks.attention import AttentionRecord, AttentionSite, capture_attention
from diffprobe.models.base import Model

ATTRIBUTION_KIND = "attribution"
CONDITIONAL = ("cond", "none")


class AttributionError(DiffprobeError):
    """Bad input to attribution: a word not in the prompt, a model without text attention."""


@dataclass(frozen=True)
class Token:
    """One text position the denoiser attends to: ``position`` in the text sequence,
    ``piece`` (the tokenizer's string), ``encoder`` whose segment it is in, ``special``
    (start/end token)."""

    position: int
    piece: str
    encoder: str
    special: bool


@dataclass
class PromptAttribution:
    """The maps of one generated prompt.

    ``maps``: float32 (tokens, layers, timesteps, rows, columns) on the finest attention grid,
    token ``i`` at text position ``tokens[i].position``; ``outputs``: the output-space scores of
    the same layout for the joint/single sites (``output_sites``), else None; ``sites`` the
    layers, ``noise_levels`` (timesteps,) the noise level of each denoiser call."""

    prompt: str
    seed: int
    image: np.ndarray
    tokens: list[Token]
    sites: list[str]
    noise_levels: np.ndarray
    maps: np.ndarray
    outputs: np.ndarray | None = None
    output_sites: list[str] = field(default_factory=list)
    text_length: int = 0
    rollout: np.ndarray | None = None  # (tokens, tokens) over ``tokens``: R[j, t]

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    def positions(self, word: str, model: Model) -> list[int]:
        """Indices into ``tokens`` of ``word``'s pieces (every segment, every occurrence)."""
        text_positions = word_positions(model, self.prompt, word)
        index = {token.position: i for i, token in enumerate(self.tokens)}
        return [index[p] for p in text_positions if p in index]

    def select(self, layers: Sequence[str] | None = None, ranges: Sequence[str] | None = None):
        """Boolean masks over (layers, timesteps). ``layers``: layer groups (``down``, ``mid``,
        ``up``, ``joint``, ``single``) or site names, ``"all"`` for every site, None for the
        default (:func:`~diffprobe.analysis.attribution.default_sites`: every site but the
        UNet mid block, as DAAM); ``ranges``: timestep ranges (``early``, ``middle``,
        ``late``), None keeps all."""
        if isinstance(layers, str):
            layers = [layers]
        if layers is None:
            chosen = set(maths.default_sites(self.sites))
            keep_layers = np.array([s in chosen for s in self.sites])
        else:
            keep_layers = np.array(
                [
                    "all" in layers or s in layers or maths.layer_group(s) in layers
                    for s in self.sites
                ]
            )
        keep_steps = np.array(
            [ranges is None or maths.timestep_range(p) in ranges for p in self.noise_levels]
        )
        if not keep_layers.any() or not keep_steps.any():
            raise AttributionError(
                f"layers {layers} and timestep ranges {ranges} select nothing; groups here: "
                f"{sorted({maths.layer_group(s) for s in self.sites})}"
            )
        return keep_layers, keep_steps

    def token_maps(self, layers=None, ranges=None, weighting: str = "attention") -> np.ndarray:
        """(tokens, rows, columns): the mean over the chosen layers and timesteps; with
        ``weighting="rollout"`` each input token's rollout map (see the module doc)."""
        keep_layers, keep_steps = self.select(layers, ranges)
        source = self.maps
        if maths.check_weighting(weighting).startswith("output"):
            if self.outputs is None or self.output_sites != self.sites:
                raise AttributionError(
                    f"weighting {weighting!r} needs value-space scores at every site: "
                    f"attribute a UNet model with weighting={weighting!r}"
                )
            source = self.outputs
        maps = source[:, keep_layers][:, :, keep_steps].mean(axis=(1, 2))
        if "rollout" in weighting:
            if self.rollout is None:
                raise AttributionError(
                    "weighting 'rollout' needs the text encoder's rollout: attribute with "
                    "weighting='rollout'"
                )
            maps = maths.rollout_maps(maps, self.rollout)
        if weighting.endswith("rollout-words"):
            maps = maths.word_share(maps, [not t.special for t in self.tokens])
        return maps

    def word_map(
        self, word: str, model: Model, layers=None, ranges=None, weighting: str = "attention"
    ) -> np.ndarray:
        """(height, width) at the image size: the word's token maps summed, resized."""
        return self.map_of(self.positions(word, model), layers, ranges, weighting)

    def map_of(
        self, indices: Sequence[int], layers=None, ranges=None, weighting: str = "attention"
    ) -> np.ndarray:
        grid = torch.from_numpy(np.ascontiguousarray(self.token_maps(layers, ranges, weighting)))
        summed = maths.word_map(grid, list(indices))
        return maths.upsample(summed, self.size).numpy()

    def concept_maps(self, words: Sequence[str], model: Model) -> dict[str, np.ndarray]:
        """ConceptAttention-style output-space maps of ``words`` (softmax over the words,
        per layer and timestep, then the mean), at the image size; empty without outputs."""
        if self.outputs is None or not words:
            return {}
        concepts = [self.positions(w, model) for w in words]
        scores = torch.from_numpy(self.outputs).float()  # (tokens, layers, steps, rows, cols)
        tokens, layers, steps, rows, columns = scores.shape
        moved = scores.reshape(tokens, layers, steps, rows * columns).permute(1, 2, 3, 0)
        probs = maths.concept_maps(moved, concepts).mean(dim=(0, 1))  # (concepts, image tokens)
        probs = probs.reshape(len(concepts), rows, columns)
        return {w: maths.upsample(probs[i], self.size).numpy() for i, w in enumerate(words)}


# ------------------------------------------------------------------------------ tokens


def _segments(model: Model) -> list[tuple[str, Any, int]]:
    """(encoder, tokenizer, first text position) of each token segment, in order."""
    segments, seen = [], set()
    for name, tower in model.text_towers(model.pipe).items():
        if tower.tokens is None:
            continue
        start = tower.tokens.start or 0
        tokenizer = getattr(model.pipe, tower.tokenizer, None)
        if start in seen or tokenizer is None:
            continue
        seen.add(start)
        segments.append((name, tokenizer, start))
    return segments


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt, truncation=True, max_length=_length(tokenizer)).input_ids)


def _length(tokenizer: Any) -> int:
    length = int(getattr(tokenizer, "model_max_length", 77))
    return length if length < 100_000 else 512


def prompt_tokens(model: Model, prompt: str) -> list[Token]:
    """The text positions of ``prompt`` in every segment: start/end tokens and word pieces
    (``special`` marks the start/end tokens); padding positions are not listed."""
    tokens = []
    for name, tokenizer, start in _segments(model):
        ids = _prompt_ids(tokenizer, prompt)
        specials = set(tokenizer.all_special_ids)
        pieces = tokenizer.convert_ids_to_tokens(ids)
        for i, (token_id, piece) in enumerate(zip(ids, pieces, strict=True)):
            tokens.append(Token(start + i, piece, name, token_id in specials))
    return tokens


def word_positions(model: Model, prompt: str, word: str) -> list[int]:
    """Text positions of ``word`` (a word or a phrase such as "top left") in every segment.
    Raises :class:`AttributionError` listing the prompt's tokens when it is not there."""
    positions = []
    for _name, tokenizer, start in _segments(model):
        ids = _prompt_ids(tokenizer, prompt)
        word_ids = list(tokenizer(word.strip(), add_special_tokens=False).input_ids)
        positions += [start + p for p in maths.locate_tokens(ids, word_ids)]
    if not positions or not word.strip():
        listing = " ".join(t.piece for t in prompt_tokens(model, prompt) if not t.special)
        raise AttributionError(
            f"word {word!r} is not in the prompt {prompt!r}; its tokens are: {listing} "
            "(pass --words with words of the prompt)"
        )
    return positions


def attention_sites_of(model: Model) -> list[AttentionSite]:
    sites = type(model).attention_sites(model.pipe)
    if not sites:
        raise AttributionError(
            f"model {model.name or model.family!r} (family {model.family}) has no attention "
            "from image to text tokens, so there is nothing to attribute; use a text-to-image "
            "model such as tiny, sd15, sdxl, sd3, flux or if"
        )
    return sites


def _single_encoder(model: Model) -> tuple[str, Any, Any]:
    """(name, tower, tokenizer) of the one text encoder that feeds every token position;
    :class:`AttributionError` when positions mix several (SDXL, SD3)."""
    towers = [(n, t) for n, t in model.text_towers(model.pipe).items() if t.tokens is not None]
    segments = _segments(model)
    if len(towers) != 1 or len(segments) != 1:
        raise AttributionError(
            f"weighting 'rollout' needs token positions fed by one text encoder; "
            f"{model.name or model.family!r} has {len(towers)} "
            f"({', '.join(n for n, _ in towers)}); use weighting 'attention'"
        )
    return (*towers[0], segments[0][1])


def encoder_rollout(model: Model, prompt: str, length: int | None = None) -> np.ndarray:
    """The text encoder's attention rollout over the prompt's tokens
    (:func:`prompt_tokens`): (tokens, tokens), R[j, t] (:func:`~diffprobe.analysis.
    attribution.attention_rollout` of the encoder run on the prompt's ids padded to
    ``length`` (default: the tokenizer's maximum; the denoiser's text length), every layer up
    to the one the pipeline reads, then the prompt's rows and columns). Raises
    :class:`AttributionError` when token positions mix several encoders (SDXL, SD3)."""
    name, tower, tokenizer = _single_encoder(model)
    encoder = getattr(model.pipe, name)
    ids = tokenizer(
        prompt, padding="max_length", max_length=length or _length(tokenizer), truncation=True,
        return_tensors="pt",
    ).input_ids.to(next(encoder.parameters()).device)  # fmt: skip
    previous = encoder.config._attn_implementation
    encoder.set_attn_implementation("eager")  # sdpa gives no probabilities
    try:
        with torch.no_grad():
            attentions = encoder(ids, output_attentions=True).attentions
    finally:
        encoder.set_attn_implementation(previous)
    read = tower.num_layers if tower.pipeline_layer is None else tower.pipeline_layer
    layers = torch.stack([a[0].float().mean(0) for a in attentions[:read]]).cpu().numpy()
    rollout = maths.attention_rollout(layers)
    count = len(_prompt_ids(tokenizer, prompt))
    return rollout[:count, :count]


# ------------------------------------------------------------------------------ capture


class _Collector:
    """Keeps one prompt's records reduced to its tokens, as float16 (site, call) -> grid."""

    def __init__(self, positions: np.ndarray, size: tuple[int, int]) -> None:
        self.positions = torch.from_numpy(positions)
        self.size = size
        self.maps: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.noise: dict[int, float] = {}
        self.text_length = 0

    def __call__(self, record: AttentionRecord) -> None:
        if record.probs.shape[0] != 1:
            raise AttributionError("attribution captures one prompt per generation")
        grid = maths.token_grid(record.probs.shape[1], *self.size)
        self.text_length = record.probs.shape[2]
        keep = self.positions[self.positions < self.text_length]
        probs = maths.to_grid(record.probs[0][:, keep], grid)
        self.maps.setdefault(record.site, []).append(probs.to(torch.float16))
        if record.outputs is not None:
            scores = maths.to_grid(record.outputs[0][:, keep], grid)
            self.outputs.setdefault(record.site, []).append(scores.to(torch.float32))
        if record.call is not None:
            self.noise.setdefault(record.call, float(record.noise_level or 0.0))

    def stacked(self, table: dict[str, list[torch.Tensor]], sites: list[str]) -> np.ndarray:
        chosen = [torch.stack(table[s]).float() for s in sites]  # each (steps, tokens, r, c)
        common, _ = maths.to_common_grid(chosen)  # (layers, steps, tokens, rows, cols)
        return common.permute(2, 0, 1, 3, 4).numpy()


def attribute_prompt(
    model: Model,
    prompt: str,
    *,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float | None = None,
    size: int | tuple[int, int] | None = None,
    sites: Sequence[AttentionSite] | None = None,
    outputs: bool = True,
    weighting: str = "attention",
) -> PromptAttribution:
    """Generate ``prompt`` once and return its per-token maps (conditional branch only);
    ``weighting="rollout"`` also keeps the text encoder's rollout (:func:`encoder_rollout`)."""
    sites = list(sites) if sites is not None else attention_sites_of(model)
    maths.check_weighting(weighting)
    if "rollout" in weighting:
        _single_encoder(model)  # refuse before generating
    if weighting.startswith("output") and any(s.kind != "cross" for s in sites):
        raise AttributionError(
            f"weighting {weighting!r} reads value-space scores of cross-attention (UNet "
            f"families); {model.name or model.family!r} has {sorted({s.kind for s in sites})} "
            "sites; use rollout-words"
        )
    tokens = prompt_tokens(model, prompt)
    size = size or model.resolution
    height, width = size if isinstance(size, tuple) else (size, size)
    collector = _Collector(np.array([t.position for t in tokens]), (height, width))
    joint = any(s.kind in ("joint", "single") for s in sites)
    values = weighting.startswith("output")
    with capture_attention(
        model, sites, branches=CONDITIONAL, outputs=(outputs and joint) or values,
        on_record=collector,
    ):  # fmt: skip
        images = model.generate(
            prompt, steps=steps, guidance_scale=guidance_scale, seed=seed, size=size
        )
    image = (np.clip(images[0], 0, 1) * 255).round().astype(np.uint8)
    names = [s.site for s in sites if s.site in collector.maps]
    if not names:
        raise AttributionError(f"no attention site of {model.name!r} ran during generation")
    # tokens beyond the sequence the denoiser got (a shorter T5 length) have no maps
    tokens = [t for t in tokens if t.position < collector.text_length]
    output_names = [s for s in names if s in collector.outputs]
    rollout = None
    if "rollout" in weighting:  # padded as the denoiser's text was
        length = min(collector.text_length, _length(_single_encoder(model)[2]))
        rollout = encoder_rollout(model, prompt, length)[: len(tokens), : len(tokens)]
    return PromptAttribution(
        prompt=prompt,
        seed=seed,
        image=image,
        tokens=tokens,
        sites=names,
        noise_levels=np.array([collector.noise[c] for c in sorted(collector.noise)]),
        maps=collector.stacked(collector.maps, names),
        outputs=collector.stacked(collector.outputs, output_names) if output_names else None,
        output_sites=output_names,
        text_length=collector.text_length,
        rollout=rollout,
    )


def attribute(
    model: Model,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int] | None = None,
    steps: int = 25,
    guidance_scale: float | None = None,
    size: int | tuple[int, int] | None = None,
    outputs: bool = True,
    weighting: str = "attention",
    store: Any = None,
    each: Callable[[int, PromptAttribution], None] | None = None,
    progress: bool = True,
) -> list[PromptAttribution] | None:
    """Attribute every prompt (one generation each, seed ``seeds[i]`` or ``i``).

    With ``store`` (a :class:`MapStore`) or ``each`` (called with (index, result)) the results
    are handed on as they are made and not kept (returns None): memory stays that of one
    prompt. Otherwise returns the list."""
    from tqdm.auto import tqdm

    sites = attention_sites_of(model)
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    kept = []
    for index in tqdm(range(len(prompts)), desc="attribution", unit="prompt", disable=not progress):
        result = attribute_prompt(
            model, prompts[index], seed=seeds[index], steps=steps,
            guidance_scale=guidance_scale, size=size, sites=sites, outputs=outputs,
            weighting=weighting,
        )  # fmt: skip
        if store is not None:
            store.write(index, result)
        if each is not None:
            each(index, result)
        if store is None and each is None:
            kept.append(result)
    return None if (store is not None or each is not None) else kept
