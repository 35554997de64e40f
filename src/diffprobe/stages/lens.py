"""The lens stage: generate the lens images of a whole grid (prompts × layers × seeds) with the
mechanism of :mod:`diffprobe.interventions.lens`, write them (one PNG each, ``grid.png``,
``lens.json``) into a claimed folder, and measure attribute emergence on the shapes world."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffprobe.interventions.lens import (
    LensError,
    _to_uint8,
    generate_from,
    lens_embeddings,
    parse_layers,
)
from diffprobe.io import atomic_path, claim_output, versions, write_csv, write_json
from diffprobe.models.base import Model
from diffprobe.report.lens import lens_grid

log = logging.getLogger(__name__)

EMERGENCE_ATTRIBUTES = ("colour", "shape", "quadrant")
LENS_KIND = "lens"


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
        return lens_grid(self.images, self.layers, self.seeds, len(self.prompts) > 1, title)

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


def _as_model(model: Model | str | Path) -> Model:
    if isinstance(model, Model):
        return model
    from diffprobe.loading import load

    return load(model)


def _versions() -> dict[str, str]:
    return versions()


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
    pooled: str | None = None,
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
    (``"full"``/``"lens"``/``"empty"``; default: the family's, ``empty`` for FLUX's T5).
    Returns a :class:`LensResult` with uint8 images (prompts, layers,
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
        "pooled": first.pooled,
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
