"""Steering with an SAE feature through the features API (docs/sae.md): the feature's decoder
row as a :class:`~diffprobe.interventions.steer.Steer` direction, with the thesis's strength
per timestep, scale 500 x the feature's max activity at that timestep."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diffprobe.hooks.edits import TimestepProfile
from diffprobe.interventions.steer import THESIS_SCALE_SAE, Steer
from diffprobe.sae.model import SAEError, TopKSAE
from diffprobe.sae.steering import decoder_direction


def sae_feature_steer(
    sae: TopKSAE,
    site: str,
    feature: int,
    max_activation: np.ndarray | Sequence[float],
    timesteps: Sequence[float],
    *,
    scale: float = THESIS_SCALE_SAE,
    **restrictions: Any,
) -> Steer:
    """A :class:`Steer` adding ``scale x max_activation[t] x W_dec[feature]`` at each timestep
    (``max_activation`` of the feature, one per timestep, e.g. ``timestep_stats`` of an
    activity run captured with the SAE's transform). ``restrictions``: window, mask, branch."""
    values = np.asarray(max_activation, dtype=np.float64).reshape(-1)
    if len(values) != len(timesteps):
        raise SAEError(
            f"{len(values)} max activations for {len(timesteps)} timesteps; give one per timestep"
        )
    if sae.metadata.get("site_semantics", "output") == "input":
        site = site if site.endswith(":input") else f"{site}:input"
    direction = decoder_direction(sae, feature).detach().cpu()
    profile = TimestepProfile(tuple(timesteps), tuple(scale * values))
    return Steer(site, direction=direction, strength=profile, **restrictions)
