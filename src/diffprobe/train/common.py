"""Helpers shared by the training recipes of the embedded models (``tiny``, ``tiny-ddpm``,
``tiny-clip``): image conversions, PSNR, learning-rate schedule, checkpoints' RNG state, EMA,
and the scaffolding of a resumable run (folder claim, per-step generators, safetensors
checkpoints, the step loop with its progress bar and time budget, staged saving)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffprobe.io import claim_output, normalise_modes, write_bytes, write_json


class JsonConfig:
    """Mixin of the recipes' frozen dataclass configs: ``to_json`` (tuples as lists), what
    checkpoints and ``metrics.json`` record and a resume compares."""

    def to_json(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}  # fmt: skip


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean PSNR in dB over items of uint8 images (items, height, width, channels)."""
    error = (reference.astype(np.float64) - reconstruction.astype(np.float64)) ** 2
    mse = np.maximum(error.reshape(len(error), -1).mean(axis=1), 1e-10)
    return float(np.mean(10 * np.log10(255.0**2 / mse)))


def to_unit(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (items, 64, 64, 3) -> float (items, 3, 64, 64) in [-1, 1] on ``device``."""
    tensor = torch.as_tensor(images).to(device)
    return tensor.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def from_unit(images: torch.Tensor) -> np.ndarray:
    """float (items, 3, 64, 64) in [-1, 1] -> uint8 (items, 64, 64, 3)."""
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def batch_indices(generator: torch.Generator, items: int, batch_size: int) -> torch.Tensor:
    return torch.randperm(items, generator=generator)[:batch_size]


def learning_rate_factor(step: int, steps: int, warmup: int, final_fraction: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: checkpoints hold only tensors and plain containers, never pickled objects.
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {f"{name}.{key}": value.detach().clone()
                       for name, module in modules.items()
                       for key, value in module.named_parameters()}  # fmt: skip

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, module in modules.items():
            for key, value in module.named_parameters():
                self.shadow[f"{name}.{key}"].lerp_(value.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, modules: dict[str, torch.nn.Module]) -> None:
        for name, module in modules.items():
            for key, value in module.named_parameters():
                value.copy_(self.shadow[f"{name}.{key}"])


def scratch_directory():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="diffprobe-tiny-")


# ------------------------------------------------------------------------- run scaffolding


def with_overrides(config: Any, **values: Any) -> Any:
    """``config`` with the given fields replaced, ``None`` values left as they are."""
    return dataclasses.replace(config, **{k: v for k, v in values.items() if v is not None})


def open_run(out_dir: str | Path, kind: str, entries: tuple[str, ...], *, device: str,
             threads: int | None, resume: bool,
             derived: tuple[str, ...] = ()) -> tuple[Path, Path, torch.device]:  # fmt: skip
    """Claim ``out_dir`` (the folder rule), set the thread count and, without ``resume``, drop
    earlier checkpoints (and the ``derived`` files made from them). Returns the folder, its
    ``checkpoints`` folder and the torch device."""
    # only a new, empty or earlier folder of this kind is used, so the deletions below touch
    # nothing but diffprobe's own files
    out_dir = claim_output(out_dir, kind, entries=entries)
    checkpoints = out_dir / "checkpoints"
    torch_device = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    if not resume and checkpoints.exists():
        shutil.rmtree(checkpoints)
        for name in derived:
            (out_dir / name).unlink(missing_ok=True)
    return out_dir, checkpoints, torch_device


def step_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """CPU generator for one step of one training stream: independent of device and resume."""
    words = np.random.SeedSequence([seed, stream, step]).generate_state(2)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def log(tag: str, message: str, progress: bool) -> None:
    if progress:
        print(f"[{tag}] {message}", file=sys.stderr, flush=True)


def set_learning_rate(optimizer: torch.optim.Optimizer, config: Any, step: int) -> None:
    """Warm-up and cosine decay of ``config`` (``learning_rate``, ``steps``, ``warmup_steps``,
    ``final_learning_rate_fraction``) at ``step``."""
    factor = learning_rate_factor(step, config.steps, config.warmup_steps,
                                  config.final_learning_rate_fraction)  # fmt: skip
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate * factor


def save_state(directory: Path, prefix: str, step: int, tensors: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> None:  # fmt: skip
    """Checkpoint as safetensors (weights, EMA, optimiser moments) + JSON; keep the last two."""
    from safetensors.torch import save

    state = optimizer.state_dict()
    flat = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    for index, moments in state["state"].items():
        for key, value in moments.items():
            flat[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{prefix}-{step:08d}"
    write_bytes(stem.with_suffix(".safetensors"), save(flat), record=False)
    write_json(stem.with_suffix(".json"),
               {**info, "step": step, "param_groups": state["param_groups"]}, record=False)  # fmt: skip
    for old in sorted(directory.glob(f"{prefix}-*.json"))[:-2]:
        old.unlink()
        old.with_suffix(".safetensors").unlink(missing_ok=True)


def latest_state(directory: Path, prefix: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    from safetensors.torch import load_file

    found = sorted(p for p in directory.glob(f"{prefix}-*.json")
                   if p.with_suffix(".safetensors").exists())  # fmt: skip
    if not found:
        return None
    info = json.loads(found[-1].read_text())
    return load_file(found[-1].with_suffix(".safetensors")), info


def restore_optimizer(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor],
                      info: dict) -> None:  # fmt: skip
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in flat.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def check_config(info: dict, config_json: dict, directory: Path) -> None:
    differing = sorted(k for k in config_json if info.get("config", {}).get(k) != config_json[k])
    if differing:
        raise ValueError(f"checkpoints in {directory} were written with a different config "
                         f"({', '.join(differing)}); pass resume=False or another folder")  # fmt: skip


def prefixed(flat: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of ``flat`` whose names start with ``prefix``, the prefix removed."""
    return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}


def resume_state(checkpoints: Path, prefix: str, config_json: dict,
                 optimizer: torch.optim.Optimizer, *, resume: bool, tag: str,
                 progress: bool) -> tuple[dict[str, torch.Tensor] | None, int]:  # fmt: skip
    """The latest checkpoint's tensors (``None`` when starting afresh) and its step, after
    checking its config and restoring ``optimizer`` from it."""
    found = latest_state(checkpoints, prefix) if resume else None
    if found is None:
        return None, 0
    flat, info = found
    check_config(info, config_json, checkpoints)
    restore_optimizer(optimizer, flat, info)
    log(tag, f"resuming at step {info['step']}", progress)
    return flat, info["step"]


class StepLoop:
    """The steps ``first .. config.steps - 1`` of a resumable run: sets ``optimizer``'s learning
    rate for each step (:func:`set_learning_rate`), shows a tqdm bar (``bar``), keeps a
    wall-clock budget (``minutes`` since ``began``; checkpointed when reached) and checkpoints
    every ``config.checkpoint_every`` steps and at the end. After the loop: ``done`` (steps
    completed) and ``seconds`` (time spent in the loop)."""

    def __init__(self, config: Any, optimizer: torch.optim.Optimizer, first: int, *,
                 checkpoint: Callable[[int], None], tag: str, desc: str, progress: bool,
                 began: float, minutes: float | None) -> None:  # fmt: skip
        self.config, self.optimizer, self.first, self.checkpoint = (
            config,
            optimizer,
            first,
            checkpoint,
        )
        self.tag, self.progress, self.began, self.minutes = tag, progress, began, minutes
        self.done, self.seconds = first, 0.0
        self.bar = tqdm(range(first, config.steps), desc=desc, disable=not progress,
                        initial=first, total=config.steps)  # fmt: skip

    def __iter__(self) -> Iterator[int]:
        run_began = time.perf_counter()
        steps, every = self.config.steps, self.config.checkpoint_every
        for step in self.bar:
            if self.minutes is not None and time.perf_counter() - self.began > 60 * self.minutes:
                log(self.tag, f"time budget reached after {step} steps", self.progress)
                self.checkpoint(step)
                break
            set_learning_rate(self.optimizer, self.config, step)
            yield step
            self.done = step + 1
            if self.done % every == 0 or self.done == steps:
                self.checkpoint(self.done)
        self.bar.close()
        self.seconds = time.perf_counter() - run_began


def run_metrics(loop: StepLoop, *, seed: int, device: torch.device, model: torch.nn.Module,
                loss: float) -> dict[str, Any]:  # fmt: skip
    """The metrics every recipe's ``metrics.json`` starts with."""
    return {
        "seed": seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "parameters": parameter_count(model),
        "steps_done": loop.done,
        "steps_this_session": loop.done - loop.first,
        "train_seconds_this_session": loop.seconds,
        "final_loss": loss,
    }


def finish_metrics(metrics: dict[str, Any], *, began: float, folder: Path,
                   config_json: dict) -> dict[str, Any]:  # fmt: skip
    """``metrics`` with the session's total time, the weights' bytes in ``folder`` and the
    config."""
    return {
        **metrics,
        "total_seconds_this_session": time.perf_counter() - began,
        "weights_bytes": sum(p.stat().st_size for p in folder.rglob("*.safetensors")),
        "config": config_json,
    }


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield ``target.partial`` (emptied) to write into; on success it replaces ``target``, its
    files given the usual mode (``save_pretrained`` writes safetensors 0600)."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    yield staging
    normalise_modes(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
