"""Training a Δh source on colour *twins* (``--objective paired``) instead of a CLIP loss.

Data: source images x0 and their target twins y (item i of both differs in the edited
attribute only, e.g. shapes-world red / blue items of one stream), both DDIM-inverted, and a
``keep`` mask (items, 1, H, W) in [0, 1] of the pixels that should not change (outside the
shape). Two places for the loss (``paired_at``):

- ``final`` (default): the whole asymmetric chain from x_T(x0) with Δh = f_t(h_t, t) at every
  t ≥ t_edit (ε̃ in P_t, ε in D_t, no clipping), back-propagated through every step (ε of the
  unedited pass is a constant, as in Asyrp; x_t is *not* detached). With X the decoded output,
  R the unedited reconstruction and Y the twin's reconstruction (its plain chain from x_T(y)):

      L = d(X, Y) + λ_recon · Σ keep·|X − R| / Σ keep

- ``pt``: Asyrp's loop (one optimiser step per timestep, x_t detached): at each t ≥ t_edit,
  L_t = d(P_t^edit, P_t^twin) + λ_recon · Σ keep·|P_t^edit − P_t^ref| / Σ keep, P_t^twin the
  twin chain's predicted x0 at the same step.

d is the mean squared error (``paired_loss="mse"``) or the mean absolute error (``"l1"``).
Targets are the twin's *reconstructions*, not its pixels, so the loss asks only for what the
model can draw. One optimiser step per batch (``final``) or per batch and timestep (``pt``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffprobe.interventions.hspace.deltas import HSpaceError
from diffprobe.interventions.hspace.process import (
    _conditioning,
    asymmetric_step,
    decode,
    denoise_pair,
    predicted_x0,
    schedule,
)
from diffprobe.interventions.hspace.training import training_setup

__all__ = ["PAIRED_AT", "PAIRED_LOSSES", "plain_chain", "train_paired"]

PAIRED_LOSSES = ("mse", "l1")
PAIRED_AT = ("final", "pt")


def _distance(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "mse":
        return lambda a, b: ((a - b) ** 2).mean()
    return lambda a, b: (a - b).abs().mean()


def _kept_l1(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    weight = keep.expand_as(a)
    return (weight * (a - b).abs()).sum() / weight.sum().clamp_min(1e-6)


@torch.no_grad()
def plain_chain(model: Any, x_T: torch.Tensor, steps: int) -> tuple[torch.Tensor, list]:
    """Unclipped plain DDIM from ``x_T``: (decoded output, [P_t in denoiser space per step])."""
    plan = schedule(model, steps)
    cond = _conditioning(model, None, len(x_T))
    x, predicted = x_T, []
    for index, timestep in enumerate(plan.timesteps):
        eps, _ = denoise_pair(model, x, timestep, cond, None, None, steps)
        x, x0 = asymmetric_step(x, eps, eps, plan.alpha(timestep),
                                plan.alpha(plan.previous(index)))  # fmt: skip
        predicted.append(x0)
    return decode(model, x), predicted


def train_paired(model: Any, source: nn.Module, x_T: torch.Tensor, twin_T: torch.Tensor,
                 keep: torch.Tensor, config: Any, *, progress: bool = True,
                 log: Callable[[dict], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train ``source`` in place so that the edited chains of ``x_T`` (items, ...) become the
    chains of their twins ``twin_T``; ``config`` a ``TrainConfig`` (steps, epochs,
    batch_size, optimizer, learning_rate, lambda_recon, t_edit, paired_loss, paired_at)."""
    if config.paired_loss not in PAIRED_LOSSES:
        raise HSpaceError(f"paired loss {config.paired_loss!r}: expected mse or l1")
    if config.paired_at not in PAIRED_AT:
        raise HSpaceError(f"paired_at {config.paired_at!r}: expected final or pt")
    if x_T.shape != twin_T.shape:
        raise HSpaceError(f"{len(x_T)} source chains but {len(twin_T)} twins of shape "
                          f"{tuple(twin_T.shape[1:])}: give one twin per source image")  # fmt: skip
    distance = _distance(config.paired_loss)
    plan = schedule(model, config.steps)
    reference, reference_pt = plain_chain(model, x_T, config.steps)
    target, target_pt = plain_chain(model, twin_T, config.steps)
    optimizer, hspace, edited, batches = training_setup(source, config, plan, len(x_T))
    per_batch = 1 if config.paired_at == "final" else len(edited)
    bar = tqdm(total=config.epochs * len(batches) * per_batch, desc=f"h-space paired {source.kind}",
               disable=not progress)  # fmt: skip
    history: list[dict[str, float]] = []
    began = time.perf_counter()

    def record(row: dict) -> None:
        history.append(row)
        if log is not None:
            log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", twin=f"{row['twin']:.4f}")

    for epoch in range(config.epochs):
        for batch in batches:
            cond = _conditioning(model, None, len(batch))
            keep_b = keep[batch]
            x = x_T[batch]
            if config.paired_at == "final":
                for index, timestep in enumerate(plan.timesteps):
                    hspace.step_index = index
                    eps, eps_edit = denoise_pair(model, x, timestep, cond, None, hspace,
                                                 config.steps, grad=True)  # fmt: skip
                    x, _ = asymmetric_step(x, eps, eps_edit, plan.alpha(timestep),
                                           plan.alpha(plan.previous(index)))  # fmt: skip
                output = decode(model, x)
                twin = distance(output, target[batch])
                recon = _kept_l1(output, reference[batch], keep_b)
                loss = twin + config.lambda_recon * recon
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                record({"epoch": epoch, "loss": loss.item(), "twin": twin.item(),
                        "recon": recon.item()})  # fmt: skip
                continue
            for index, timestep in edited:
                hspace.step_index = index
                eps, eps_edit = denoise_pair(model, x.detach(), timestep, cond, None, hspace,
                                             config.steps, grad=True)  # fmt: skip
                alpha = plan.alpha(timestep)
                p_edit = decode(model, predicted_x0(x.detach(), eps_edit, alpha, None))
                with torch.no_grad():
                    p_twin = decode(model, target_pt[index][batch])
                    p_ref = decode(model, reference_pt[index][batch])
                twin = distance(p_edit, p_twin)
                recon = _kept_l1(p_edit, p_ref, keep_b)
                loss = twin + config.lambda_recon * recon
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    x, _ = asymmetric_step(x, eps, eps_edit.detach(), alpha,
                                           plan.alpha(plan.previous(index)))  # fmt: skip
                record({"epoch": epoch, "timestep": timestep, "loss": loss.item(),
                        "twin": twin.item(), "recon": recon.item()})  # fmt: skip
    bar.close()
    source.eval()
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "optimizer_steps": len(history),
            "seconds_per_step": seconds / max(1, len(history)), "history": history,
            "edited_timesteps": [t for _, t in edited]}  # fmt: skip
