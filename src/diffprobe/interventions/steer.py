"""Steering: push a channel (or a direction, e.g. an SAE decoder row) at a site during
generation, built on the typed edits of :mod:`diffprobe.hooks.edits`.

A :class:`Steer` says what to push and how:

- ``mode="add"``: add ``strength`` to the channel at every spatial position / token (the
  thesis' ``ChannelSteeringHook``), or ``strength × direction`` (unit-normalised) to every
  token (its ``VectorSteeringHook``): :class:`~diffprobe.hooks.edits.Add`;
- ``mode="scale"``: multiply the channel by ``strength`` (:class:`~diffprobe.hooks.edits.Scale`),
  or the component along the direction (``x + (strength - 1)(x·d)d``);
- ``mode="clamp"``: set the channel to ``strength`` everywhere
  (:class:`~diffprobe.hooks.edits.Replace`), or the component along the direction
  (``x + (strength - x·d)d``).

``strength`` is a number or a :class:`~diffprobe.hooks.edits.TimestepProfile` (a strength per
denoiser timestep, e.g. 50 × the channel's maximum activation there, as the thesis);
``window`` (``TimestepWindow``, ``TimestepSet`` of active or peak timesteps, ``NoiseWindow``),
``mask`` and ``branch`` restrict it as for every edit. ``strength=0`` with ``add`` reproduces
the plain generation bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.hooks.edits import (
    Add,
    Apply,
    CallState,
    Replace,
    Scale,
    SiteEdit,
    TimestepProfile,
    Window,
    channel_axis,
)
from diffprobe.hooks.engine import edit

STEER_MODES = ("add", "scale", "clamp")
# the thesis' prior stage: these seeds, the empty prompt, no CFG
THESIS_SEEDS = (1024, 1111, 4359, 3248, 1026)
THESIS_SCALE = 50.0
THESIS_SCALE_SAE = 500.0


class SteerError(DiffprobeError):
    """A steer that cannot be built."""


@dataclass(frozen=True, eq=False)
class Steer:
    """One push at ``site``: ``channel`` (an index) or ``direction`` (a vector of the site's
    channel size), ``mode`` add | scale | clamp, ``strength`` (number or TimestepProfile of
    numbers), and the edit restrictions ``window``, ``mask``, ``branch``."""

    site: str
    channel: int | None = None
    direction: Any = None
    mode: str = "add"
    strength: float | TimestepProfile = 0.0
    window: Window | None = None
    mask: Any = None
    branch: str | None = None

    def __post_init__(self) -> None:
        if (self.channel is None) == (self.direction is None):
            raise SteerError(f"steer at '{self.site}': give a channel or a direction, not both")
        if self.mode not in STEER_MODES:
            raise SteerError(f"steer mode {self.mode!r}: expected one of {', '.join(STEER_MODES)}")
        if self.channel is not None and (
            isinstance(self.channel, bool) or not isinstance(self.channel, int) or self.channel < 0
        ):
            raise SteerError(f"steer at '{self.site}': channel {self.channel!r} is not an index")
        if self.direction is not None:
            direction = torch.as_tensor(self.direction, dtype=torch.float32).reshape(-1)
            norm = float(direction.norm())
            if direction.numel() == 0 or not norm > 0 or not torch.isfinite(direction).all():
                raise SteerError(
                    f"steer at '{self.site}': the direction must be a non-zero finite vector"
                )
            object.__setattr__(self, "direction", direction / norm)
        if isinstance(self.strength, TimestepProfile):
            if self.strength.vector is not None:
                raise SteerError("give the direction as direction=, the profile as numbers")
        elif isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise SteerError(f"steer strength {self.strength!r}: a number or a TimestepProfile")

    def to_edit(self) -> SiteEdit:
        """The typed edit that performs this steer."""
        common = {"window": self.window, "mask": self.mask, "branch": self.branch}
        if self.channel is not None:
            cls = {"add": Add, "scale": Scale, "clamp": Replace}[self.mode]
            return cls(self.site, self.strength, channels=self.channel, **common)
        if self.mode == "add":
            value = (
                TimestepProfile(self.strength.timesteps, self.strength.values, self.direction)
                if isinstance(self.strength, TimestepProfile)
                else self.direction * float(self.strength)
            )
            return Add(self.site, value, **common)
        return Apply(self.site, _along(self.direction, self.mode, self.strength), **common)


def _along(direction: torch.Tensor, mode: str, strength: Any):
    """The function of an Apply edit scaling or clamping the component along ``direction``."""

    def fn(value: torch.Tensor, state: CallState) -> torch.Tensor:
        s = (
            strength.at(state.timestep, "steer")
            if isinstance(strength, TimestepProfile)
            else strength
        )
        axis = channel_axis(value)
        if value.shape[axis] != direction.numel():
            raise SteerError(
                f"steer direction of {direction.numel()} channels for a value with "
                f"{value.shape[axis]} channels"
            )
        shape = [1] * value.dim()
        shape[axis] = -1
        d = direction.to(device=value.device, dtype=value.dtype).view(shape)
        component = (value * d).sum(axis, keepdim=True)
        target = component * s if mode == "scale" else torch.full_like(component, float(s))
        return value + (target - component) * d

    return fn


def steer(
    model,
    prompts: str | Sequence[str],
    steers: Steer | Sequence[Steer],
    *,
    seed: int | Sequence[int] = 0,
    steps: int = 25,
    guidance_scale: float | None = None,
    size: int | None = None,
    output_type: str = "np",
    **pipeline_kwargs: Any,
) -> Any:
    """``model.generate(prompts, ...)`` with every steer applied (see the module docstring)."""
    steers = [steers] if isinstance(steers, Steer) else list(steers)
    with edit(model, [s.to_edit() for s in steers]):
        return model.generate(
            prompts, steps=steps, guidance_scale=guidance_scale, seed=seed, size=size,
            output_type=output_type, **pipeline_kwargs,
        )  # fmt: skip
