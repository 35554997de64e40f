"""Training a Δh source with Asyrp's loss, and the distance curve that picks t_edit / t_boost.

Loss at one timestep t ≥ t_edit (Asyrp ``diffusion_latent.py: run_training``):

    L = λ_CLIP · −log((1 + cos(ΔI, ΔT)) / 2) + λ_recon · w · |P_t^edit − P_t^ref|₁,
    w = cos(E_T(src), E_T(trg)) when positive (Asyrp), else 1

with ΔI = E_I(P_t^edit) − E_I(x_0) (x_0 the real image the chain was inverted from), ΔT the unit
target − source text direction averaged over prompt templates, P_t^edit the predicted x0 from
the edited noise ε̃ (decoded to pixels for latent models: the VAE decode is in the graph), and
P_t^ref the same without Δh, neither clipped (chains of inverted images, as
``sample(clip_sample=False)``). One optimiser step per timestep; the chain continues with the
asymmetric step from a detached x_t, so nothing back-propagates through the chain.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from diffprobe.interventions.hspace.clip import ClipScorer
from diffprobe.interventions.hspace.process import (
    HSpaceEdit,
    _conditioning,
    _uses_cfg,
    asymmetric_step,
    decode,
    denoise_pair,
    predicted_x0,
    schedule,
)

__all__ = [
    "OBJECTIVES",
    "PAIRED_DEFAULTS",
    "TrainConfig",
    "choose_timesteps",
    "directional_loss",
    "distance_curve",
    "train_delta",
]


@dataclass(frozen=True)
class TrainConfig:
    """Asyrp's README recipe (SGD 0.5 for the conv block, λ_CLIP 1, λ_recon 3) by default."""

    steps: int = 40  # sampling steps of the chain (Asyrp: 40)
    epochs: int = 1  # passes over the training images (Asyrp's n_iter)
    batch_size: int = 4
    optimizer: str = "sgd"  # "sgd" (Asyrp, conv) or "adamw" (the reproduction, transformer)
    learning_rate: float = 0.5
    lambda_clip: float = 1.0
    lambda_recon: float = 3.0
    t_edit: int = 500
    seed: int = 0
    objective: str = "clip"  # "clip" (Asyrp) or "paired" (colour twins: hspace/paired.py)
    paired_loss: str = "mse"  # paired: distance to the twin, "mse" or "l1"
    paired_at: str = "final"  # paired: "final" (whole chain) or "pt" (P_t, Asyrp's loop)


# the paired objective's recipe (Adam-type optimiser, whole chain: many passes at a small lr)
PAIRED_DEFAULTS = {"epochs": 150, "batch_size": 16, "optimizer": "adamw", "learning_rate": 1e-2,
                   "lambda_recon": 0.1}  # fmt: skip
OBJECTIVES = ("clip", "paired")


def directional_loss(delta_image: torch.Tensor, delta_text: torch.Tensor) -> torch.Tensor:
    """−log((1 + cos(ΔI, ΔT)) / 2) per item (items,)."""
    cosine = nn.functional.cosine_similarity(delta_image, delta_text[None].expand_as(delta_image))
    return -torch.log((1 + cosine).clamp_min(1e-6) / 2)


def training_setup(source: nn.Module, config: Any, plan: Any, items: int) -> tuple:
    """What both trainers (CLIP and paired) set up the same way: the optimiser of ``source``'s
    trainable parameters (``config.optimizer``: sgd or AdamW), the h-space edit, the edited
    (step index, timestep) pairs of ``plan`` and the batches of ``items``."""
    parameters = [p for p in source.parameters() if p.requires_grad]
    kind = torch.optim.SGD if config.optimizer == "sgd" else torch.optim.AdamW
    optimizer = kind(parameters, lr=config.learning_rate)
    hspace = HSpaceEdit([source], t_edit=config.t_edit, train_steps=config.steps)
    source.train()
    edited = [(i, t) for i, t in enumerate(plan.timesteps) if t >= config.t_edit]
    batches = [list(range(a, min(a + config.batch_size, items)))
               for a in range(0, items, config.batch_size)]  # fmt: skip
    return optimizer, hspace, edited, batches


def train_delta(model: Any, source: nn.Module, x0: torch.Tensor, x_T: torch.Tensor,
                scorer: ClipScorer, source_text: str, target_text: str, config: TrainConfig, *,
                prompts: Sequence[str] | None = None, guidance_scale: float | None = None,
                progress: bool = True,
                log: Callable[[dict], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train ``source`` in place on the chains from ``x_T`` (items, ...) of the real inputs
    ``x0`` (denoiser space, items, ...). Returns timings and the loss history."""
    plan = schedule(model, config.steps)
    delta_text = scorer.direction(source_text, target_text)
    text_cos = float(scorer.concept(source_text) @ scorer.concept(target_text))
    # Asyrp weighs the L1 term by cos(E_T(src), E_T(trg)), positive for real CLIPs; a small
    # CLIP can place the two texts apart (tiny-clip: red vs blue −0.39), where that factor would
    # reward leaving the reference: it is then 1.
    recon_weight = text_cos if text_cos > 0 else 1.0
    optimizer, hspace, edited, batches = training_setup(source, config, plan, len(x0))
    history: list[dict[str, float]] = []
    total = config.epochs * len(batches) * len(edited)
    bar = tqdm(total=total, desc=f"h-space {source.kind}", disable=not progress)
    began = time.perf_counter()
    for epoch in range(config.epochs):
        for batch in batches:
            with torch.no_grad():
                reference = scorer.images(decode(model, x0[batch]))
            cond = _conditioning(model, None if prompts is None else [prompts[i] for i in batch],
                                 len(batch), cfg=_uses_cfg(guidance_scale))  # fmt: skip
            x = x_T[batch]
            for index, timestep in edited:
                hspace.step_index = index
                eps, eps_edit = denoise_pair(model, x.detach(), timestep, cond, guidance_scale,
                                             hspace, config.steps, grad=True)  # fmt: skip
                alpha = plan.alpha(timestep)
                p_edit = decode(model, predicted_x0(x.detach(), eps_edit, alpha, None))
                with torch.no_grad():
                    p_ref = decode(model, predicted_x0(x, eps, alpha, None))
                clip_term = directional_loss(scorer.images(p_edit) - reference, delta_text).mean()
                recon = (p_edit - p_ref).abs().mean()
                loss = config.lambda_clip * clip_term + config.lambda_recon * recon_weight * recon
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    x, _ = asymmetric_step(x, eps, eps_edit.detach(), alpha,
                                           plan.alpha(plan.previous(index)))  # fmt: skip
                row = {"epoch": epoch, "timestep": timestep, "loss": loss.item(),
                       "clip": clip_term.item(), "recon": recon.item()}  # fmt: skip
                history.append(row)
                if log is not None:
                    log(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", clip=f"{row['clip']:.3f}")
    bar.close()
    source.eval()
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "optimizer_steps": len(history),
            "seconds_per_step": seconds / max(1, len(history)), "text_cosine": text_cos,
            "recon_weight": config.lambda_recon * recon_weight,
            "history": history, "edited_timesteps": [t for _, t in edited]}  # fmt: skip


@torch.no_grad()
def distance_curve(model: Any, x0: torch.Tensor, steps: int,
                   distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                   seed: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """Mean distance(x0, P_t) and distance(x0, x_t) over items at every DDIM timestep, x_t
    drawn by the forward process (seeded); pixels compared (decoded for latent models)."""
    from diffprobe.models.noise import item_noise

    plan = schedule(model, steps)
    cond = _conditioning(model, None, len(x0))
    noise = item_noise(x0.shape[1:], seed, list(range(len(x0))), device=x0.device,
                       dtype=torch.float32)  # fmt: skip
    pixels = decode(model, x0)
    rows = {"timestep": [], "d_predicted": [], "d_noisy": []}
    for timestep in sorted(plan.timesteps):
        alpha = plan.alpha(timestep)
        x_t = alpha**0.5 * x0 + (1 - alpha) ** 0.5 * noise
        eps = model.denoise(x_t, torch.full((len(x0),), float(timestep)), cond)
        p_t = predicted_x0(x_t, eps, alpha, plan.clip_sample)
        rows["timestep"].append(timestep)
        rows["d_predicted"].append(float(distance(pixels, decode(model, p_t)).mean()))
        rows["d_noisy"].append(float(distance(pixels, decode(model, x_t)).mean()))
    return {key: np.asarray(value) for key, value in rows.items()}


def choose_timesteps(curve: dict[str, np.ndarray], edit_threshold: float,
                     boost_threshold: float) -> tuple[int, int]:  # fmt: skip
    """Asyrp's rule on a distance curve: t_edit is the first timestep (increasing t) where
    d(x0, P_t) ≥ ``edit_threshold``; t_boost the first where d(x0, x_t) ≥ ``boost_threshold``
    (the last timestep when never reached; −1 turns boosting off when the threshold is ≤ 0)."""
    timesteps = curve["timestep"]
    over = np.nonzero(curve["d_predicted"] >= edit_threshold)[0]
    t_edit = int(timesteps[over[0]]) if len(over) else int(timesteps[-1])
    if boost_threshold <= 0:
        return t_edit, -1
    over = np.nonzero(curve["d_noisy"] >= boost_threshold)[0]
    t_boost = int(timesteps[over[0]]) if len(over) else int(timesteps[-1])
    return t_edit, t_boost
