"""The attribution folder: one DAAM experiment folder per prompt, a summary, maps in zarr.

``diffprobe attribution`` writes into ``OUT``::

    attribution.json        model, prompts, words, the aggregation choices, IoUs when masks known
    000/ 001/ ...           one DAAM experiment folder per prompt (see diffprobe.report.attribution)
    maps.zarr/              with --store: float16 (prompts, text positions, layers, timesteps,
                            rows, columns), written prompt by prompt (diffprobe.stages.attribution_store)

and ``diffprobe attribution-eval DIR`` scores ``*.heat_map.png`` against ``*.gt.png``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffprobe.analysis import attribution as maths
from diffprobe.data import shapes
from diffprobe.io import claim_output, versions, write_json
from diffprobe.models.base import Model
from diffprobe.stages.attribution import (
    ATTRIBUTION_KIND,
    AttributionError,
    PromptAttribution,
    attention_sites_of,
    attribute,
    prompt_tokens,
    word_positions,
)
from diffprobe.stages.attribution_store import MAPS_STORE, MapStore

CHOICES = {
    "probabilities": "softmax over all keys (image keys too for joint attention), mean over heads",
    "branch": "conditional: the cond half under CFG, the whole batch when guidance is off",
    "layers": "each site resized bilinearly to the finest attention grid, mean over the chosen "
    "(default: every site but the UNet mid block, as DAAM)",
    "timesteps": "mean over the chosen denoiser calls",
    "words": "sum over the word's tokens: every occurrence, every encoder segment",
    "weighting": "attention: each text position's map; rollout: each input token's map, "
    "sum_j R[j, t] map_j over the prompt's positions, R the text encoder's attention rollout "
    "(0.5 A + 0.5 I per layer, A mean over heads; Abnar & Zuidema 2020); rollout-words: "
    "then each pixel's share over the prompt's word tokens (start and end out); "
    "output-rollout-words: the same on value-space scores (W_o o_i) . (W_o v_t) of UNet "
    "cross-attention instead of probabilities",
    "image": "bilinear resize to the image size; thresholds on min-max normalised maps",
    "output_space": "image-token SDPA outputs . concept-token outputs, softmax over the words "
    "per layer and call, then the mean (ConceptAttention style, MMDiT/FLUX only)",
    "masks_reader": "ground truth of generated images: the attribute reader's foreground "
    "(ink against the border's background colour, weight >= 0.5)",
}


def prompt_words(model: Model, prompt: str) -> list[str]:
    """Every word of the prompt that its tokens contain (punctuation stripped, unique)."""
    words = []
    for word in re.findall(r"[\w'-]+", prompt):
        if word.lower() in (w.lower() for w in words):
            continue
        try:
            word_positions(model, prompt, word)
        except AttributionError:
            continue
        words.append(word)
    return words


def check_words(model: Model, prompts: Sequence[str], words: Sequence[str] | None) -> None:
    """Raise before any work when a word is missing from a prompt (listing its tokens)."""
    attention_sites_of(model)
    for prompt in prompts:
        for word in words or ():
            word_positions(model, prompt, word)


def reader_masks(image: np.ndarray, words: Sequence[str]) -> dict[str, np.ndarray]:
    """Ground truth of a generated shapes-world image: the reader's foreground for every
    shape or colour word (the words that name the one object)."""
    from diffprobe.data.attributes import foreground_masks

    named = [w for w in words if w.lower() in (*shapes.SHAPES, *shapes.COLOUR_NAMES)]
    if not named:
        return {}
    mask = foreground_masks(image[None])[0]
    return {w: mask for w in named}


def run_attribution(
    model: Model,
    prompts: Sequence[str],
    out: str | Path,
    *,
    words: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    steps: int = 25,
    guidance_scale: float | None = None,
    size: int | tuple[int, int] | None = None,
    layers: Sequence[str] | None = None,
    timesteps: Sequence[str] | None = None,
    store: bool = False,
    masks: str | None = None,
    threshold: float = 0.4,
    weighting: str = "attention",
    progress: bool = True,
) -> Path:
    """Attribute ``prompts`` and write the attribution folder ``out`` (see the module doc).
    ``masks="reader"`` writes ``<word>.gt.png`` for shape and colour words and scores them."""
    maths.check_threshold(threshold)
    maths.check_weighting(weighting)
    check_words(model, prompts, words)
    out = claim_output(out, ATTRIBUTION_KIND, entries=(MAPS_STORE,) if store else ())
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    summary: list[dict[str, Any]] = []
    scores: list[float] = []

    def each(index: int, result: PromptAttribution) -> None:
        chosen = list(words) if words else prompt_words(model, result.prompt)
        cross = {w: result.word_map(w, model, layers, timesteps, weighting) for w in chosen}
        concept = result.concept_maps(chosen, model) if result.outputs is not None else {}
        truth = reader_masks(result.image, chosen) if masks == "reader" else {}
        from diffprobe.report.attribution import save_experiment

        folder = out / f"{index:03d}"
        label = "cross-attention" if weighting == "attention" else f"cross-attention, {weighting}"
        files = save_experiment(folder, result, cross, concept, truth, label)
        entry: dict[str, Any] = {
            "prompt": result.prompt, "seed": result.seed, "folder": folder.name,
            "words": chosen, "files": files,
        }  # fmt: skip
        if truth:
            entry["iou"] = {
                w: float(maths.iou(maths.normalise(cross[w]) >= threshold, m))
                for w, m in truth.items()
            }
            scores.extend(entry["iou"].values())
        summary.append(entry)

    map_store = MapStore(out, len(prompts)) if store else None
    attribute(
        model, prompts, seeds=seeds, steps=steps, guidance_scale=guidance_scale, size=size,
        weighting=weighting, store=map_store, each=each, progress=progress,
    )  # fmt: skip
    write_json(
        out / "attribution.json",
        {
            "model": model.name,
            "family": model.family,
            "sites": [s.site for s in attention_sites_of(model)],
            "steps": steps,
            "guidance_scale": guidance_scale
            if guidance_scale is not None
            else model.default_guidance_scale,
            "layers": list(layers) if layers else "default",
            "timesteps": list(timesteps) if timesteps else "all",
            "weighting": weighting,
            "choices": CHOICES,
            "threshold": threshold,
            "mIoU": float(np.mean(scores)) if scores else None,
            "store": MAPS_STORE if store else None,
            "prompts": summary,
            "tokens_of_first_prompt": [t.piece for t in prompt_tokens(model, prompts[0])],
            "versions": versions(),
        },
    )
    return out


def evaluate_folder(
    folder: str | Path,
    *,
    threshold: float = 0.4,
    sweep: bool = False,
    maps: str = "heat_map",
) -> dict[str, Any]:
    """mIoU of every ``<word>.<maps>.png`` against its ``<word>.gt.png`` under ``folder``
    (DAAM's layout), at ``threshold`` and, with ``sweep``, at 0.05 .. 0.95."""
    from diffprobe.report.attribution import read_experiment

    threshold = maths.check_threshold(threshold)
    folder = Path(folder)
    if not folder.is_dir():
        raise AttributionError(
            f"{folder} is not a folder; give a folder of DAAM experiments holding "
            "<word>.heat_map.png and <word>.gt.png pairs"
        )
    pairs = read_experiment(folder, maps)
    if not pairs:
        raise AttributionError(
            f"{folder} holds no <word>.{maps}.png with a <word>.gt.png beside it; write masks "
            "with diffprobe attribution --masks reader, or add DAAM's *.gt.png files"
        )
    per_map = {
        name: float(maths.iou(maths.normalise(values) >= threshold, mask))
        for name, values, mask in pairs
    }
    result: dict[str, Any] = {
        "folder": str(folder),
        "maps": maps,
        "threshold": threshold,
        "pairs": len(pairs),
        "mIoU": float(np.mean(list(per_map.values()))),
        "iou": per_map,
    }
    if sweep:
        taus = np.round(np.arange(0.05, 0.951, 0.05), 2)
        curve = [
            float(np.mean([maths.iou(maths.normalise(v) >= t, m) for _, v, m in pairs]))
            for t in taus
        ]
        result["sweep"] = {"thresholds": taus.tolist(), "mIoU": curve}
        best = int(np.argmax(curve))
        result["best"] = {"threshold": float(taus[best]), "mIoU": curve[best]}
    return result
