"""Deep-dream objectives: what a dream maximises, composable as in lucid.

An :class:`Objective` maps what one optimisation step saw to one value per item, ``(items,)``;
the render loop *maximises* the sum over items (items never interact). Objectives compose with
``+``, ``-``, unary ``-`` and ``*`` / ``/`` by plain numbers; the result is a weighted sum of
leaves, each evaluated once per step, and the render loop records every leaf's value::

    objective = channel("unet.up_blocks.1", 7, timestep=0) - 0.5 * total_variation()

Activation objectives read one site of the denoiser at a timestep (or the mean over a set of
timesteps) for a conditioning branch (``"cond"``: the render's prompt, ``"uncond"``: its negative
prompt), and reduce by the mean over space. Their channel / feature / neuron may be one number
for every item or a sequence with one entry per item (many channels dreamt in one batch).
Penalties (:func:`total_variation`, :func:`range_penalty`, :func:`moment`) read the
un-augmented parameter z, ``(items, channels, height, width)``, and are positive: subtract them.

A leaf's ``timestep`` is None when it takes the render's timestep.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch

from diffprobe.errors import DiffprobeError

BRANCHES = ("cond", "uncond")


class DreamError(DiffprobeError, ValueError):
    """A dream that cannot run as asked (channel out of range, unreachable site, ...)."""


# (site, timestep, branch) -> the captured activation (items, ...) in float32
Activations = Mapping[tuple[str, float, str], torch.Tensor]


@dataclass(frozen=True)
class Reads:
    """What one leaf needs from the step: sites read at timesteps for a branch."""

    site: str
    timesteps: tuple[float, ...] | None  # None: the render's timestep
    branch: str = "cond"


@dataclass
class Step:
    """What a step saw: ``activations`` by (site, timestep, branch), the parameter ``z``
    (items, channels, height, width) before any transform, and the render's ``timestep``."""

    activations: Activations
    z: torch.Tensor
    timestep: float


def _per_item(value: Any, name: str) -> torch.Tensor:
    """A number or a sequence (one per item) as a long tensor (1,) or (items,)."""
    tensor = torch.as_tensor(value)
    if tensor.is_floating_point() or tensor.is_complex():
        raise DreamError(f"{name} {value!r}: expected integers")
    return tensor.long().reshape(-1)


def _timesteps(timestep: float | Sequence[float] | None) -> tuple[float, ...] | None:
    if timestep is None:
        return None
    values = (timestep,) if isinstance(timestep, Real) else tuple(timestep)
    if not values:
        raise DreamError("an objective's timesteps must not be empty")
    return tuple(float(t) for t in values)


class Objective:
    """A weighted sum of leaves: ``terms`` is ((weight, leaf), ...)."""

    terms: tuple[tuple[float, Leaf], ...]

    def __call__(self, step: Step) -> torch.Tensor:
        """The value per item, ``(items,)``."""
        return self.evaluate(step)[0]

    def evaluate(self, step: Step) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(total per item, [each leaf's unweighted value per item]) of one step."""
        values = [leaf.value(step) for _, leaf in self.terms]
        total = sum(weight * value for (weight, _), value in zip(self.terms, values, strict=True))
        return total, values

    @property
    def leaves(self) -> tuple[Leaf, ...]:
        return tuple(leaf for _, leaf in self.terms)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(weight for weight, _ in self.terms)

    def reads(self) -> list[Reads]:
        return [leaf.needs for leaf in self.leaves if leaf.needs is not None]

    def __add__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return Sum(self.terms + other.terms)

    def __sub__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return self + (-1.0) * other

    def __neg__(self) -> Objective:
        return (-1.0) * self

    def __mul__(self, scale: float) -> Objective:
        if isinstance(scale, bool) or not isinstance(scale, Real):
            return NotImplemented
        return Sum(tuple((float(scale) * w, leaf) for w, leaf in self.terms))

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> Objective:
        if isinstance(scale, bool) or not isinstance(scale, Real):
            return NotImplemented
        return self * (1.0 / float(scale))

    def __repr__(self) -> str:
        parts = [f"{w:+g}*{leaf.name}" for w, leaf in self.terms]
        return " ".join(parts) if parts else "0"


@dataclass(frozen=True, eq=False)
class Sum(Objective):
    terms: tuple[tuple[float, Leaf], ...]


@dataclass(eq=False)
class Leaf(Objective):
    """One term: ``function(step) -> (items,)`` with a ``name`` for the stats."""

    name: str
    function: Callable[[Step], torch.Tensor]
    needs: Reads | None = None

    @property
    def terms(self) -> tuple[tuple[float, Leaf], ...]:  # type: ignore[override]
        return ((1.0, self),)

    def value(self, step: Step) -> torch.Tensor:
        return self.function(step)


def _site_values(step: Step, needs: Reads) -> list[torch.Tensor]:
    timesteps = needs.timesteps or (step.timestep,)
    return [step.activations[(needs.site, t, needs.branch)] for t in timesteps]


def _as_channels_first(value: torch.Tensor) -> torch.Tensor:
    """Site values as (items, channels, tokens): UNet maps (items, C, H, W) or token sequences
    (items, tokens, C) of transformer blocks (more tokens than channels is not assumed: a 3-D
    value is read as tokens × channels, the diffusers layout)."""
    if value.dim() == 4:
        return value.flatten(2)
    if value.dim() == 3:
        return value.transpose(1, 2)
    if value.dim() == 2:
        return value[:, :, None]
    raise DreamError(f"cannot read channels from a site value of shape {tuple(value.shape)}")


def _pick(values: torch.Tensor, index: torch.Tensor, what: str, site: str) -> torch.Tensor:
    """values (items, channels, ...) at ``index`` (1,) or (items,) along axis 1."""
    items, width = values.shape[:2]
    if len(index) not in (1, items):
        raise DreamError(f"{what}: {len(index)} values for a batch of {items} items")
    bad = index[(index < 0) | (index >= width)]
    if len(bad):
        raise DreamError(
            f"{what} {int(bad[0])} is out of range: '{site}' has {what}s 0 to {width - 1}"
        )
    index = index.to(values.device).expand(items)
    gather = index.view(items, 1, *([1] * (values.dim() - 2))).expand(items, 1, *values.shape[2:])
    return values.gather(1, gather).squeeze(1)


def _check_branch(branch: str) -> str:
    if branch not in BRANCHES:
        raise DreamError(f"branch {branch!r}: expected one of {', '.join(BRANCHES)}")
    return branch


def _site_leaf(name: str, site: str, timestep: float | Sequence[float] | None, branch: str,
               per_value: Callable[[torch.Tensor], torch.Tensor]) -> Leaf:  # fmt: skip
    """A leaf that reads ``site`` on ``branch`` at ``timestep`` (None: each step's own):
    ``per_value`` maps one timestep's value to ``(items,)``; the leaf is the mean over the
    timesteps read."""
    needs = Reads(site, _timesteps(timestep), _check_branch(branch))

    def value(step: Step) -> torch.Tensor:
        return torch.stack([per_value(v) for v in _site_values(step, needs)]).mean(0)

    return Leaf(name, value, needs)


def channel(
    site: str,
    channel: int | Sequence[int],
    *,
    timestep: float | Sequence[float] | None = None,
    branch: str = "cond",
) -> Leaf:
    """Mean over space of channel ``channel`` at ``site`` (one channel, or one per item)."""
    index = _per_item(channel, "channel")

    def mean(v: torch.Tensor) -> torch.Tensor:
        return _pick(_as_channels_first(v.float()), index, "channel", site).mean(-1)

    return _site_leaf(f"channel({site})", site, timestep, branch, mean)


def neuron(
    site: str,
    channel: int | Sequence[int],
    y: int,
    x: int,
    *,
    timestep: float | Sequence[float] | None = None,
    branch: str = "cond",
) -> Leaf:
    """Channel ``channel`` at one position (row ``y``, column ``x``) of a UNet map at ``site``."""
    index = _per_item(channel, "channel")

    def at(v: torch.Tensor) -> torch.Tensor:
        if v.dim() != 4:
            raise DreamError(f"neuron needs a spatial map at '{site}', got {tuple(v.shape)}")
        height, width = v.shape[-2:]
        if not (0 <= y < height and 0 <= x < width):
            raise DreamError(
                f"neuron position (y={y}, x={x}) is outside '{site}''s {height}x{width} map"
            )
        return _pick(v[:, :, y, x].float(), index, "channel", site)

    return _site_leaf(f"neuron({site},{y},{x})", site, timestep, branch, at)


def direction(
    site: str,
    vector: torch.Tensor,
    *,
    timestep: float | Sequence[float] | None = None,
    branch: str = "cond",
) -> Leaf:
    """Mean over space of the dot product of the site's channel vector with ``vector``
    ``(channels,)`` (one for every item) or ``(items, channels)``."""
    vector = torch.as_tensor(vector, dtype=torch.float32)

    def dot(v: torch.Tensor) -> torch.Tensor:
        values = _as_channels_first(v.float())
        if vector.shape[-1] != values.shape[1]:
            raise DreamError(
                f"direction of {vector.shape[-1]} values for '{site}', which has "
                f"{values.shape[1]} channels"
            )
        w = vector.to(values.device).reshape(-1, values.shape[1]).expand(values.shape[0], -1)
        return torch.einsum("ict,ic->it", values, w).mean(-1)

    return _site_leaf(f"direction({site})", site, timestep, branch, dot)


def sae_feature(
    site: str,
    sae: Any,
    feature: int | Sequence[int],
    *,
    timestep: float | Sequence[float] | None = None,
    branch: str = "cond",
) -> Leaf:
    """Mean over tokens of SAE latent ``feature``'s dense pre-activation (ReLU before the TopK,
    what the thesis scores) of the site's tokens, ``(items, tokens, d_in)`` -> ``(items,)``."""
    index = _per_item(feature, "feature")
    bad = index[(index < 0) | (index >= sae.d_sae)]
    if len(bad):
        raise DreamError(
            f"feature {int(bad[0])} is out of range: the SAE has latents 0 to {sae.d_sae - 1}"
        )

    def mean(v: torch.Tensor) -> torch.Tensor:
        tokens = _as_channels_first(v.float()).transpose(1, 2)  # (items, tokens, d_in)
        sae.check_d_in(tokens.shape[-1], site)
        codes = sae.pre_acts(tokens.to(sae.dtype)).float()  # (items, tokens, d_sae)
        return _pick(codes.transpose(1, 2), index, "feature", site).mean(-1)

    return _site_leaf(f"sae_feature({site})", site, timestep, branch, mean)


# ---------------------------------------------------------------------------------- penalties


def total_variation() -> Leaf:
    """Anisotropic L1 total variation of z per item: mean|Δ_h z| + mean|Δ_w z|."""

    def value(step: Step) -> torch.Tensor:
        z = step.z
        dh = (z[:, :, 1:, :] - z[:, :, :-1, :]).abs().flatten(1).mean(1)
        dw = (z[:, :, :, 1:] - z[:, :, :, :-1]).abs().flatten(1).mean(1)
        return dh + dw

    return Leaf("total_variation", value)


def range_penalty(threshold: float = 3.0) -> Leaf:
    """mean(relu(|z| - threshold)^2) per item: values beyond ±threshold cost quadratically."""

    def value(step: Step) -> torch.Tensor:
        return torch.relu(step.z.abs() - threshold).square().flatten(1).mean(1)

    return Leaf(f"range({threshold:g})", value)


def moment() -> Leaf:
    """|mean z| + |std z - 1| per item: keeps z's statistics near those of N(0, 1)."""

    def value(step: Step) -> torch.Tensor:
        flat = step.z.flatten(1)
        return flat.mean(1).abs() + (flat.std(1) - 1.0).abs()

    return Leaf("moment", value)
