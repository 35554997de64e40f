"""Attribution pictures and files: heat maps, overlays, the side-by-side figure, DAAM export.

A DAAM experiment folder (castorini/daam's ``GenerationExperiment`` layout, without its pickle):
``prompt.txt``, ``seed.txt``, ``output.png`` and per word ``<word>.heat_map.png`` (the map
normalised to [0, 1] by its min and max, as 8-bit greyscale at the image size). diffprobe adds
``<word>.overlay.png`` (the heat map in colour over the image), ``<word>.concept_map.png``
(output-space map, MMDiT/FLUX), ``<word>.gt.png`` when a mask is known, ``comparison.png`` and
``tokens.json``. :func:`read_experiment` reads ``*.heat_map.png`` / ``*.gt.png`` pairs back
for the evaluator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffprobe.analysis.attribution import normalise
from diffprobe.io import atomic_path, write_json, write_text
from diffprobe.report.figures import colorbar, new_figure, save_figure


def file_word(word: str) -> str:
    """A word as a file-name stem (spaces -> underscores)."""
    return "_".join(word.split()).replace("/", "_")


def heat_image(values: np.ndarray) -> Any:
    """(H, W) map -> 8-bit greyscale PIL image of the min-max normalised map."""
    from PIL import Image

    return Image.fromarray((normalise(values) * 255).round().astype(np.uint8), mode="L")


def overlay(image: np.ndarray, values: np.ndarray, strength: float = 0.55) -> Any:
    """The normalised map in the 'jet' colour map blended over the image (uint8 (H, W, 3));
    images under 256 px are enlarged by a whole factor (nearest neighbour) to stay readable."""
    from matplotlib import colormaps
    from PIL import Image

    colours = colormaps["jet"](normalise(values))[..., :3]
    blended = (1 - strength) * image.astype(np.float64) / 255 + strength * colours
    picture = Image.fromarray((np.clip(blended, 0, 1) * 255).round().astype(np.uint8))
    factor = max(1, 256 // max(image.shape[:2]))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
    return picture


def _save_png(image: Any, path: Path) -> None:
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def comparison_figure(
    image: np.ndarray,
    prompt: str,
    cross: Mapping[str, np.ndarray],
    concept: Mapping[str, np.ndarray] | None = None,
    label: str = "cross-attention",
) -> Any:
    """The image, then one column per word: its cross-attention map (row 1, titled
    ``label``: the weighting when not plain attention) and, for MMDiT/FLUX, its output-space
    map (row 2), each over the image with a colour bar."""
    words = list(cross)
    rows = 2 if concept else 1
    figure = new_figure(figsize=(2.4 * (len(words) + 1), 2.5 * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, len(words) + 1, squeeze=False)
    figure.suptitle(repr(prompt), fontsize=10)
    for row in range(rows):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title("image" if row == 0 else "", fontsize=9)
        axes[row, 0].axis("off")
        table = cross if row == 0 else concept
        title = label if row == 0 else "output space"
        for column, word in enumerate(words, start=1):
            ax = axes[row, column]
            ax.imshow(image)
            shown = ax.imshow(normalise(table[word]), cmap="jet", alpha=0.55, vmin=0, vmax=1)
            ax.set_title(f"{word!r}: {title}", fontsize=8)
            ax.axis("off")
            colorbar(figure, shown, ax, "normalised map", shrink=0.7)
    return figure


def save_experiment(
    folder: Path,
    result: Any,
    cross: Mapping[str, np.ndarray],
    concept: Mapping[str, np.ndarray] | None = None,
    masks: Mapping[str, np.ndarray] | None = None,
    label: str = "cross-attention",
) -> list[str]:
    """Write one prompt's DAAM experiment folder (see the module doc); returns its files."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    files = ["prompt.txt", "seed.txt", "output.png", "tokens.json", "comparison.png"]
    write_text(folder / "prompt.txt", result.prompt + "\n")
    write_text(folder / "seed.txt", f"{result.seed}\n")
    _save_png(Image.fromarray(result.image), folder / "output.png")
    write_json(
        folder / "tokens.json",
        [
            {"position": t.position, "piece": t.piece, "encoder": t.encoder, "special": t.special}
            for t in result.tokens
        ],
    )
    for word, values in cross.items():
        stem = file_word(word)
        _save_png(heat_image(values), folder / f"{stem}.heat_map.png")
        _save_png(overlay(result.image, values), folder / f"{stem}.overlay.png")
        files += [f"{stem}.heat_map.png", f"{stem}.overlay.png"]
    for word, values in (concept or {}).items():
        stem = file_word(word)
        _save_png(heat_image(values), folder / f"{stem}.concept_map.png")
        files.append(f"{stem}.concept_map.png")
    for word, mask in (masks or {}).items():
        stem = file_word(word)
        _save_png(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"), folder / f"{stem}.gt.png")
        files.append(f"{stem}.gt.png")
    if cross:
        save_figure(
            comparison_figure(result.image, result.prompt, cross, concept, label),
            folder / "comparison.png",
        )
    return files


def read_experiment(
    folder: Path, maps: str = "heat_map"
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(word, map float (H, W), mask bool (H, W)) for every ``<word>.gt.png`` in ``folder``
    (searched recursively) with a ``<word>.<maps>.png`` beside it."""
    from PIL import Image

    pairs = []
    for truth in sorted(Path(folder).rglob("*.gt.png")):
        stem = truth.name[: -len(".gt.png")]
        predicted = truth.with_name(f"{stem}.{maps}.png")
        if not predicted.is_file():
            continue
        values = np.asarray(Image.open(predicted).convert("L"), dtype=np.float64) / 255
        mask = np.asarray(Image.open(truth).convert("L")) >= 128
        if values.shape != mask.shape:
            values = (
                np.asarray(
                    Image.open(predicted).convert("L").resize(mask.shape[::-1], Image.BILINEAR),
                    dtype=np.float64,
                )
                / 255
            )
        pairs.append((str(truth.relative_to(folder).parent / stem), values, mask))
    return pairs


def sweep_figure(thresholds: Sequence[float], scores: Sequence[float], title: str) -> Any:
    """mIoU against the threshold."""
    figure = new_figure(figsize=(4.5, 3.2), layout="constrained")
    ax = figure.subplots()
    ax.plot(thresholds, scores, marker="o")
    ax.set_xlabel("threshold on the normalised map")
    ax.set_ylabel("mIoU")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 1)
    return figure
