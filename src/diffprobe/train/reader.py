"""Training and evaluating the attribute reader's shape CNN (:mod:`diffprobe.data.attributes`
reads images with it): ``python -m diffprobe.train.reader`` trains it on augmented, degraded
shapes-world images and writes ``assets/attribute_reader.safetensors``; ``--evaluate-only``
measures its accuracy on fresh images, clean and degraded."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffprobe.data import shapes
from diffprobe.data.attributes import (
    CROP,
    READER_PATH,
    ShapeReader,
    _background,
    _crops,
    _foreground,
    _load_reader,
    _locate,
    attribute_accuracy,
    degrade,
)
from diffprobe.io import atomic_path


def _training_crops(images: np.ndarray) -> np.ndarray:
    ground = _background(images)
    ink, strongest = _foreground(images, ground)
    weights, _, x, y, _ = _locate(images, ground, ink, strongest)
    return _crops(weights, x, y)


def _augment_geometry(crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small rotation, scale, shift and warp of a batch (items, 1, CROP, CROP)."""
    items = len(crops)
    angle = (torch.rand(items, generator=generator) * 2 - 1) * np.deg2rad(12)
    scale = 1 + (torch.rand(items, generator=generator) * 2 - 1) * 0.15
    shift = (torch.rand(items, 2, generator=generator) * 2 - 1) * (3 / CROP)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(crops.shape), align_corners=False)
    # A smooth random warp of up to ~1.5 px: generated shapes are rarely drawn exactly.
    warp = (torch.rand(items, 2, 4, 4, generator=generator) * 2 - 1) * (3 / CROP)
    warp = F.interpolate(warp, size=crops.shape[-2:], mode="bicubic", align_corners=False)
    grid = grid + warp.permute(0, 2, 3, 1)
    return F.grid_sample(crops, grid, align_corners=False, padding_mode="zeros")


def train_attribute_reader(
    output: str | Path = READER_PATH,
    *,
    items: int = 24_000,
    epochs: int = 6,
    batch_size: int = 128,
    seed: int = 1,
    evaluation_seed: int = 12_345,
    evaluation_items: int = 2_000,
    threads: int = 1,
    quiet: bool = False,
) -> dict[str, dict[str, float]]:
    """Train the shape CNN on augmented generator images and save it to ``output``.

    Training images are items ``0 .. items - 1`` of ``sample(items, seed, split="all")``, half of
    them degraded with ``degrade`` (random blur, noise, colour jitter, JPEG, softening). Returns the
    accuracies of the finished reader on ``evaluation_items`` fresh images of ``evaluation_seed``,
    clean and degraded (see ``evaluate_reader``), also stored in the file's metadata.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.time()

    def log(message: str) -> None:
        if not quiet:
            print(f"[{time.time() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    sample = shapes.sample(items, seed=seed, split="all")
    images = sample.images.copy()
    degraded = np.random.default_rng(seed).random(items) < 0.5
    images[degraded] = degrade(images[degraded], seed=seed)
    crops = torch.from_numpy(_training_crops(images)).unsqueeze(1)
    labels = torch.from_numpy(sample.factors["shape"])
    log(f"prepared {items} training crops")

    model = ShapeReader()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * (items // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(items, generator=generator)
        correct = total = 0
        for start in range(0, items - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            batch = _augment_geometry(crops[index], generator)
            logits = model(batch)
            loss = F.cross_entropy(logits, labels[index], label_smoothing=0.05)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            correct += int((logits.argmax(1) == labels[index]).sum())
            total += len(index)
        log(f"epoch {epoch + 1}/{epochs}: train accuracy {correct / total:.4f}")

    model.eval()
    output = Path(output)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    _save_reader(state, output, {"training": json.dumps({"items": items, "seed": seed})})
    _load_reader.cache_clear()
    results = evaluate_reader(evaluation_items, evaluation_seed, reader_path=output)
    log(json.dumps(results, indent=1))
    _save_reader(
        state,
        output,
        {
            "training": json.dumps(
                {"items": items, "epochs": epochs, "seed": seed, "seconds": time.time() - started}
            ),
            "evaluation": json.dumps(
                {"seed": evaluation_seed, "items": evaluation_items, **results}
            ),
        },
    )
    _load_reader.cache_clear()
    return results


DEGRADATIONS: dict[str, dict | None] = {
    "clean": None,
    "blur 1.0": {"blur": 1.0, "noise": 0, "jpeg": 0, "jitter": 0, "soften": False},
    "blur 1.5": {"blur": 1.5, "noise": 0, "jpeg": 0, "jitter": 0, "soften": False},
    "noise 15": {"blur": 0, "noise": 15.0, "jpeg": 0, "jitter": 0, "soften": False},
    "jpeg 30": {"blur": 0, "noise": 0, "jpeg": 30, "jitter": 0, "soften": False},
    "soften (2x down and up)": {"blur": 0, "noise": 0, "jpeg": 0, "jitter": 0, "soften": True},
    "blur 1 + noise 10 + jitter 0.1 + jpeg 50": {
        "blur": 1.0,
        "noise": 10.0,
        "jpeg": 50,
        "jitter": 0.1,
        "soften": False,
    },
    "random (training distribution)": {},
    # Beyond the training distribution: where the reader starts to fail.
    "blur 2.5": {"blur": 2.5, "noise": 0, "jpeg": 0, "jitter": 0, "soften": False},
    "noise 30": {"blur": 0, "noise": 30.0, "jpeg": 0, "jitter": 0, "soften": False},
    "soften + blur 1.5 + noise 20 + jitter 0.15 + jpeg 30": {
        "blur": 1.5,
        "noise": 20.0,
        "jpeg": 30,
        "jitter": 0.15,
        "soften": True,
    },
}


def evaluate_reader(
    items: int = 2_000, seed: int = 12_345, reader_path: str | Path | None = None
) -> dict[str, dict[str, float]]:
    """Attribute accuracies on fresh generator images of ``seed``, clean and degraded."""
    sample = shapes.sample(items, seed=seed, split="all")
    results = {}
    for name, settings in DEGRADATIONS.items():
        images = sample.images if settings is None else degrade(sample.images, seed, **settings)
        scores = attribute_accuracy(images, sample.factors, reader_path)
        results[name] = {key: round(value, 4) for key, value in scores.items()}
    return results


def _save_reader(state: dict, output: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(output) as temporary:
        save_file(state, str(temporary), metadata=metadata)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train or evaluate the shapes-world reader.")
    parser.add_argument("--output", default=str(READER_PATH))
    parser.add_argument("--items", type=int, default=24_000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--evaluate-only", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    arguments = parser.parse_args()
    if arguments.evaluate_only:
        torch.set_num_threads(1)
        print(json.dumps(evaluate_reader(reader_path=arguments.output), indent=1))
    else:
        report = train_attribute_reader(
            arguments.output, items=arguments.items, epochs=arguments.epochs, quiet=arguments.quiet
        )
        print(json.dumps(report, indent=1))
