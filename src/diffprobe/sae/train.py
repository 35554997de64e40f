"""Training a TopK SAE on activations (``diffprobe sae train``; docs/sae.md).

The loss is sparsify's: FVU of the batch plus ``aux_alpha`` x the AuxK loss,

    FVU  = sum((x - x^)^2) / sum((x - mean_batch(x))^2)
    AuxK = min(dead / k_aux, 1) * sum((e^ - (x - x^))^2) / sum((x - mean_batch(x))^2)

where ``e^`` is the reconstruction (without ``b_dec``) from the ``k_aux`` (``d_in // 2``)
largest pre-activations among the *dead* latents, those that have not fired for
``dead_tokens`` tokens. Adam with a linear decay to 0 and no warm-up (SAeUron); after each
step the decoder rows are renormalised, and before it the gradient component parallel to each
row is removed. With ``batch_topk`` the k x tokens largest activations of the whole batch are
kept (per-token TopK is always used at inference).

The step is sparse: only the selected (token, latent) pairs enter the backward pass, as
sparse matrix products (``_SparseEncode``), so its cost is the encoder matmul and the TopK.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from diffprobe.sae.model import SAEError, TopKSAE, check_size
from diffprobe.sae.sources import (
    ActivationSource,
    IterableSource,
    as_source,
    batch_stream,
    fingerprint,
)
from diffprobe.sae.trainer import (  # noqa: F401 - the trainer's names, also importable here
    SAETrainer,
    StepMetrics,
    TrainConfig,
    batch_topk_select,
)

log = logging.getLogger(__name__)

SAE_KIND = "sae"
TRAINING_JSON = "training.json"
CHECKPOINT = "checkpoint"
STATE_JSON = "state.json"


# ----------------------------------------------------------------------------------- training


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None): the GPU when there is one, else the CPU; otherwise as given,
    refused unless this machine has it."""
    from diffprobe.loading import parse_device

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(device)


def plan_steps(source: ActivationSource, config: TrainConfig) -> int:
    """Optimiser steps of a training: ``tokens`` // batch, or batches of ``epochs`` passes."""
    batch = config.batch_size
    if config.tokens is not None:
        steps = config.tokens // batch
        if steps == 0:
            raise SAEError(
                f"tokens {config.tokens} is less than one batch of {batch}; train on more "
                "tokens or use a smaller batch size (--batch-size)"
            )
        return steps
    if source.n_tokens is None:
        raise SAEError(
            "an iterator of activations has no length: give the number of training tokens "
            "(tokens=N, --tokens N)"
        )
    per_epoch = source.n_tokens // batch
    if per_epoch == 0:
        raise SAEError(
            f"the activations hold {source.n_tokens} tokens, less than one batch of {batch}; "
            "use a smaller batch size (--batch-size)"
        )
    return per_epoch * config.epochs


def _epochs_needed(source: ActivationSource, config: TrainConfig, steps: int) -> int | None:
    if source.n_tokens is None:
        return None
    per_epoch = source.n_tokens // config.batch_size
    return -(-steps // per_epoch)


def train_sae(
    activations: Any,
    out: str | Path | None = None,
    *,
    config: TrainConfig | None = None,
    metadata: dict | None = None,
    device: str | torch.device | None = "auto",
    overwrite: bool = False,
    until_step: int | None = None,
    progress: bool = True,
    **options: Any,
) -> TopKSAE:
    """Train a TopK SAE on ``activations`` (any source of :mod:`diffprobe.sae.sources`) and
    return it.

    ``config`` (or its fields as keyword ``options``) sets the hyperparameters. ``metadata``
    (model_name, site, branch, timesteps, scheduler, site_semantics) is recorded with the
    SAE; a run source fills it in. With ``out`` the SAE is written there in the SAELens
    layout with ``training.json``, and a checkpoint every ``checkpoint_every`` steps: the same
    call resumes from it and ends with the same weights as an uninterrupted run.
    ``until_step`` stops after that step (with a checkpoint), as a job's time limit would.
    """
    from diffprobe.sae.formats import save_sae

    config = config or TrainConfig()
    if options:
        unknown = sorted(set(options) - set(TrainConfig.__dataclass_fields__))
        if unknown:
            raise SAEError(
                f"unknown training option {unknown[0]!r}; the options are "
                f"{', '.join(TrainConfig.__dataclass_fields__)}"
            )
        config = TrainConfig(**{**asdict(config), **options})
    config.validate()
    if until_step is not None:
        check_size("until_step", until_step)
    device = resolve_device(device)
    source = as_source(activations)
    if isinstance(source, IterableSource):
        source.peek_d_in()
    steps = plan_steps(source, config)
    d_in = source.d_in
    d_sae = config.d_sae or d_in * config.expansion
    if config.k > d_sae:
        raise SAEError(f"k {config.k} is larger than d_sae {d_sae}; k must be at most d_sae")
    meta = {**source.metadata, **(metadata or {})}
    identity = fingerprint(
        {
            "config": {**asdict(config), "checkpoint_every": None, "log_every": None},
            "source": source.describe(),
            "d_in": d_in,
            "steps": steps,
        }  # fmt: skip
    )
    sae = TopKSAE(d_in, d_sae, config.k, normalization=config.normalization, metadata=meta,
                  seed=config.seed, device=device)  # fmt: skip
    trainer = SAETrainer(sae, config)
    history: list[dict] = []
    seconds = 0.0
    folder = None
    if out is not None:
        folder, done = _prepare_output(Path(out), identity, overwrite)
        if done is not None:
            log.info("%s already holds this training, finished; loading it", folder)
            from diffprobe.sae.formats import load_sae

            return load_sae(folder)
        resumed = _resume(folder, identity, trainer)
        if resumed is not None:
            history, seconds = resumed["history"], resumed["seconds"]
            if not source.resumable:
                raise SAEError(
                    f"{folder} holds a checkpoint at step {trainer.step_count}, but a one-pass "
                    "iterator cannot be replayed to that point; pass a function returning a "
                    "fresh iterator, or --overwrite to start again"
                )
            log.info("resuming %s at step %d of %d", folder, trainer.step_count, steps)
    stream = batch_stream(source, config.batch_size, config.seed, config.buffer_tokens,
                          _epochs_needed(source, config, steps))  # fmt: skip
    for _ in range(trainer.step_count):  # replay the data order up to the checkpoint
        next(stream, None)
    last = min(steps, until_step) if until_step is not None else steps
    seconds = _loop(trainer, stream, steps, last, folder, identity, history, seconds, progress)
    if trainer.step_count < steps:
        if until_step is not None and trainer.step_count >= until_step:
            return sae  # stopped as asked, with a checkpoint when there is a folder
        raise SAEError(
            f"the activations ran out after {trainer.step_count} of {steps} steps; give fewer "
            "tokens (--tokens) or more data"
        )
    final = {
        "step": trainer.step_count,
        "tokens": trainer.step_count * config.batch_size,
        "dead_fraction": trainer.dead_fraction(),
        **(history[-1] if history else {}),
    }
    if folder is not None:
        save_sae(sae, folder, claim=False)
        from diffprobe.io import write_json

        write_json(
            folder / TRAINING_JSON,
            {
                "done": True,
                "identity": identity,
                "config": asdict(config),
                "source": source.describe(),
                "device": str(device),
                "steps": steps,
                "seconds": round(seconds, 3),
                "tokens_per_second": round(final["tokens"] / max(seconds, 1e-9), 1),
                "final": final,
                "history": history,
            },
        )
        _drop_checkpoints(folder)
    return sae


def _loop(
    trainer: SAETrainer,
    stream: Iterator,
    steps: int,
    last: int,
    folder: Path | None,
    identity: str,
    history: list[dict],
    seconds: float,
    progress: bool,
) -> float:
    from tqdm.auto import tqdm

    config = trainer.config
    bar = tqdm(total=steps, initial=trainer.step_count, disable=not progress, desc="sae train",
               unit="step", file=sys.stderr)  # fmt: skip
    sums = {"fvu": 0.0, "aux_loss": 0.0, "l0": 0.0}
    accumulated: list[StepMetrics] = []
    began = time.perf_counter()
    try:
        while trainer.step_count < last:
            batch = next(stream, None)
            if batch is None:
                break
            lr = config.lr * (1 - trainer.step_count / steps)
            accumulated.append(trainer.step(batch[0], lr))
            bar.update(1)
            if trainer.step_count % config.log_every == 0 or trainer.step_count == last:
                for name in sums:
                    sums[name] = float(torch.stack([getattr(m, name) for m in accumulated]).mean())
                row = {
                    "step": trainer.step_count,
                    "tokens": trainer.step_count * config.batch_size,
                    "lr": lr,
                    "fvu": round(sums["fvu"], 6),
                    "l0": round(sums["l0"], 3),
                    "aux_loss": round(sums["aux_loss"], 6),
                    "dead_fraction": round(trainer.dead_fraction(), 6),
                }
                history.append(row)
                accumulated.clear()
                bar.set_postfix(fvu=f"{row['fvu']:.4f}", l0=f"{row['l0']:.1f}",
                                dead=f"{row['dead_fraction']:.3f}")  # fmt: skip
            if folder is not None and (
                trainer.step_count % config.checkpoint_every == 0
                or (trainer.step_count == last and last < steps)
            ):
                elapsed = seconds + time.perf_counter() - began
                _checkpoint(folder, identity, trainer, history, elapsed)
    finally:
        bar.close()
    return seconds + time.perf_counter() - began


# -------------------------------------------------------------------------------- the folder


def _prepare_output(folder: Path, identity: str, overwrite: bool) -> tuple[Path, dict | None]:
    """Claim ``folder`` for an SAE training; return it and the finished training's record
    when the folder already holds this very training."""
    import json

    from diffprobe.io import check_output, claim_output

    check_output(folder, SAE_KIND, overwrite=overwrite)
    if not overwrite and folder.is_dir():
        recorded = None
        for path in (folder / TRAINING_JSON, folder / CHECKPOINT / STATE_JSON):
            try:
                recorded = json.loads(path.read_text())
                break
            except (OSError, ValueError):
                continue
        if recorded is not None and recorded.get("identity") != identity:
            raise SAEError(
                f"--out {folder} holds an SAE training with other settings or data; choose "
                "another folder, or pass --overwrite to replace it"
            )
        if recorded is not None and recorded.get("done"):
            return folder, recorded
    claim_output(folder, SAE_KIND, overwrite=overwrite,
                 entries=("cfg.json", "sae_weights.safetensors", TRAINING_JSON, CHECKPOINT))  # fmt: skip
    return folder, None


def _checkpoint(folder: Path, identity: str, trainer: SAETrainer, history, seconds) -> None:
    from safetensors.torch import save

    from diffprobe.io import write_bytes, write_json

    directory = folder / CHECKPOINT
    name = f"step-{trainer.step_count:09d}.safetensors"
    write_bytes(directory / name, save(trainer.state_tensors()))
    write_json(
        directory / STATE_JSON,
        {
            "identity": identity,
            "step": trainer.step_count,
            "weights": name,
            "seconds": round(seconds, 3),
            "history": history,
        },
    )
    for old in directory.glob("step-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _resume(folder: Path, identity: str, trainer: SAETrainer) -> dict | None:
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / CHECKPOINT / STATE_JSON
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        tensors = load_file(folder / CHECKPOINT / state["weights"])
        if state["identity"] != identity:
            return None
        trainer.load_state_tensors(tensors)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise SAEError(
            f"the checkpoint in {folder / CHECKPOINT} is damaged ({type(err).__name__}: "
            f"{' '.join(str(err).split())}); pass --overwrite to train again from the start"
        ) from None
    trainer.step_count = int(state["step"])
    return {"history": list(state.get("history", [])), "seconds": float(state["seconds"])}


def _drop_checkpoints(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder / CHECKPOINT, ignore_errors=True)
