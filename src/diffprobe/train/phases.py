"""The phases of ``tiny``'s training: their random streams (one generator per (seed, phase,
step), so resuming continues exactly), their progress lines and their checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from diffprobe.train import common
from diffprobe.train.recipe import TinyConfig

PHASE_IDS = {"vae": 1, "unet": 2, "text": 3}


PHASE_ORDER = ("text", "vae", "unet")


def step_generator(seed: int, phase: str, step: int) -> torch.Generator:
    """CPU generator for one step: random draws do not depend on the device or on resuming."""
    return common.step_generator(seed, PHASE_IDS[phase], step)


def log(message: str, progress: bool) -> None:
    common.log("train-tiny", message, progress)


def checkpoint_path(directory: Path, phase: str, step: int) -> Path:
    return directory / f"{phase}-{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, int, Path]]:
    """Checkpoints as (phase rank, step, path), oldest first."""
    found = []
    for path in directory.glob("*.pt"):
        phase, _, step = path.stem.partition("-")
        if phase in PHASE_ORDER and step.isdigit():
            found.append((PHASE_ORDER.index(phase), int(step), path))
    return sorted(found)


def save_checkpoint(directory: Path, phase: str, step: int, state: dict[str, Any]) -> Path:
    """Write atomically (temporary file, then rename); keep this phase's last two."""
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, phase, step)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)
    same_phase = [p for rank, _, p in list_checkpoints(directory) if PHASE_ORDER[rank] == phase]
    for old in same_phase[:-2]:
        old.unlink()
    return path


def check_config(checkpoint: dict[str, Any], config: TinyConfig, path: Path) -> None:
    saved = json.loads(checkpoint["config"])
    current = config.to_json()
    differing = sorted(key for key in current if saved.get(key) != current[key])
    if differing:
        raise ValueError(
            f"checkpoint {path} was written with a different config ({', '.join(differing)}); "
            "pass resume=False or another out_dir"
        )
