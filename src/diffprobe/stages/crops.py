"""The cropped images of the corner ratio (Loos & Linhardt): in memory for a few images
(:func:`spatial_features`, :func:`corner_features`) and as run folders with a run's own grid
(:func:`extract_cropped`), both through the extraction engine, so their maps equal what
``diffprobe extract --pooling none`` stores."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffprobe.analysis.anomalies import AnomalyError, crop_border, to_grid, token_border
from diffprobe.data.sources import DataError, array_source, manifest_images, resize_images
from diffprobe.errors import DiffprobeError
from diffprobe.extract import extract, extract_arrays
from diffprobe.extract.plan import Condition, ExtractionPlan
from diffprobe.extract.store import open_run


def spatial_features(
    model: Any,
    images: np.ndarray,
    sites: Sequence[str],
    *,
    noise_level: float | None = 0.2,
    timestep: float | None = None,
    seed: int = 0,
    prompt: str = "",
    batch_size: int = 16,
    size: int | None = None,
    grid: tuple[int, int] | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Token maps (items, H, W, C) of ``sites`` for uint8 ``images`` (items, H, W, 3), in
    memory, through the extraction engine (:func:`diffprobe.extract.extract_arrays`): at
    ``noise_level`` (or ``timestep``), with ``prompt`` (default the empty prompt), item ``i``
    noised as item ``i`` of an extraction with ``seed`` — the maps ``diffprobe extract
    --pooling none`` stores for the same images."""
    plan = ExtractionPlan(
        sites=list(sites),
        noise_levels=None if timestep is not None else [noise_level],
        timesteps=[timestep] if timestep is not None else None,
        conditions=[Condition("prompt", "prompt", prompt)] if prompt else [Condition("empty")],
        pooling="none",
        seed=seed,
        image_size=size,
        chunk_items=256,
    )
    source = array_source(np.asarray(images), "images given in memory")
    arrays = extract_arrays(model, source, plan, batch_size=batch_size, progress=progress)
    return {site: to_grid(values, grid) for (site, _, _), values in arrays.items()}


def corner_features(
    model: Any,
    images: np.ndarray,
    sites: Sequence[str],
    *,
    size: int | None = None,
    grid: tuple[int, int] | None = None,
    **options: Any,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The two maps of the corner ratio for every site: ``{site: (original, cropped)}``.

    ``images``: uint8 (items, H, W, 3), resized to the model's image size first. For each site,
    the cropped images are the images cropped by one token's pixel width per side (image size /
    the site's grid) and resized back (:func:`~diffprobe.analysis.anomalies.crop_border`); both
    sets go through :func:`spatial_features` with the same ``options`` (noise, seed, prompt,
    batch size). Pass the result to ``corner_ratio(cropped, original)``."""
    size = size or model.resolution
    images = resize_images(np.asarray(images), size)
    original = spatial_features(model, images, sites, size=size, grid=grid, **options)
    by_border: dict[tuple[int, int], list[str]] = {}
    for site in sites:
        by_border.setdefault(token_border(size, original[site].shape[1:3]), []).append(site)
    result = {}
    for border, group in by_border.items():
        cropped = spatial_features(model, crop_border(images, border), group, size=size,
                                   grid=grid, **options)  # fmt: skip
        for site in group:
            result[site] = (original[site], cropped[site])
    return result


# ------------------------------------------------------------------ run level: read and crop


def load_run_images(run: Any) -> np.ndarray:
    """uint8 (items, size, size, 3) images of a run at its image size (shapes-world items drawn
    again, files read from their paths; both checked against the manifest's sha256)."""
    try:
        return manifest_images(run.manifest, run.info["data"]["kind"], int(run.info["image_size"]))
    except DataError as err:
        raise AnomalyError(f"{err} (or pass --no-corner and skip the overlays)") from None


def run_plan(run: Any, sites: Sequence[str]) -> ExtractionPlan:
    """The extraction plan of ``run`` (noise grid, conditions, seed, size, chunking) for
    ``sites``, unpooled: extracting other images with it gives arrays that compare."""
    info = run.info
    noise = info["noise"]
    by_level = all("noise_level" in n for n in noise)
    return ExtractionPlan(
        sites=list(sites),
        noise_levels=[n["noise_level"] for n in noise] if by_level else None,
        timesteps=None if by_level else [n["timestep"] for n in noise],
        conditions=[Condition(**c) for c in info["conditions"]],
        pooling="none",
        seed=info["seed"],
        image_size=info["image_size"],
        chunk_items=info["chunk_items"],
        store_dtype=info["store_dtype"],
        protocol=(info.get("protocol") or {}).get("name", "default"),
        protocol_steps=(info.get("protocol") or {}).get("img2img_steps", 100),
    )


def extract_cropped(
    run: Any,
    model: Any,
    out: str | Path,
    sites: Sequence[str],
    grids: dict[str, tuple[int, int]],
    *,
    images: np.ndarray | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract the cropped images of ``run`` with the run's own grid (noise levels, conditions,
    seed, image size), one run folder per token border: ``out/cropped-<rows>x<cols>px``.

    Returns ``{site: Run}``. Re-running resumes the folders (they are ordinary run folders)."""
    size = int(run.info["image_size"])
    images = load_run_images(run) if images is None else images
    by_border: dict[tuple[int, int], list[str]] = {}
    for site in sites:
        by_border.setdefault(token_border(size, grids[site]), []).append(site)
    runs = {}
    for border, group in by_border.items():
        opened = extract_crops_of(
            model, run, crop_border(images, border),
            f"{run.root} cropped by {border[0]}x{border[1]} px per side and resized back "
            "(diffprobe anomalies)",
            run_plan(run, group), Path(out) / f"cropped-{border[0]}x{border[1]}px",
            batch_size=batch_size, progress=progress,
        )  # fmt: skip
        for site in group:
            runs[site] = opened
    return runs


def extract_crops_of(model: Any, run: Any, pixels, description: str, plan, folder: Path, *,
                    batch_size: int, progress: bool) -> Any:  # fmt: skip
    """Extract ``plan`` over ``pixels`` (the run's items, cropped) into ``folder``, with the
    run's item ids, labels and captions; returns the opened run."""
    manifest = run.manifest
    source = array_source(pixels, description, ids=[m["id"] for m in manifest],
                          labels=[m["label"] for m in manifest],
                          captions=[m.get("caption") for m in manifest], kind="cropped")  # fmt: skip
    extract(model, source, plan, folder, batch_size=batch_size, overwrite=True, progress=progress)
    return open_run(folder)


def load_model_of(run: Any, model: Any, device: str, dtype: str | None) -> Any:
    """``model`` if it is a loaded model, else the model it names or the run's own (by name,
    then source), loaded; :class:`AnomalyError` when none loads."""
    from diffprobe.loading import load

    if model is not None and not isinstance(model, (str, Path)):
        return model
    info = run.info["model"]
    name = model or info.get("name") or info.get("source")
    last: Exception | None = None
    for candidate in [name, info.get("source")]:
        if not candidate:
            continue
        try:
            return load(candidate, dtype=dtype or info.get("dtype"), device=device)
        except DiffprobeError as err:
            last = err
    raise AnomalyError(
        f"the corner ratio extracts cropped images, but the run's model ({name}) could not be "
        f"loaded ({last if name else 'none recorded'}); pass --model MODEL or --no-corner"
    )
