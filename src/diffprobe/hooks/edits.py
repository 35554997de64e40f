"""Typed edits: one small config dataclass per intervention, applied by ``diffprobe.edit``
(:mod:`diffprobe.hooks.editing`).

Each edit names a site and computes a new value from the old one:

- :class:`Add` ``(site, value)``: old + value;
- :class:`Scale` ``(site, factor)``: old × factor;
- :class:`Replace` ``(site, value)``: value in place of the old one;
- :class:`Ablate` ``(site)``: zeros;
- :class:`Clamp` ``(site, min=, max=)``: ``torch.clamp(old, min, max)``;
- :class:`Patch` ``(site, source)``: the value recorded at the same site, denoiser call and
  branch in ``source`` (a :class:`~diffprobe.hooks.cache.Cache`), as in activation patching;
- :class:`Apply` ``(site, fn)``: ``fn(old, state)``, any function of the value and the
  :class:`~diffprobe.hooks.session.CallState` (SAE splicing, a Δh that depends on h and t).

``value``, ``factor``, ``min`` and ``max`` are numbers or tensors: a 1-D tensor is a channel
vector (broadcast over space for (items, channels, height, width) maps, over tokens for
(items, tokens, channels)); any other tensor must broadcast to the edited value, (items, ...)
of one CFG branch. They may also be a :class:`TimestepProfile`: a number per denoiser timestep
(linearly interpolated between the given timesteps), optionally times a vector, as steering
with a strength relative to each timestep's maximum activation needs.

Every edit takes the same keyword restrictions, all optional:

- ``window``: :class:`NoiseWindow` ``(low, high)`` in noise levels or :class:`TimestepWindow`
  ``(low, high)`` in the denoiser's timestep units, both inclusive, or :class:`TimestepSet`
  ``(timesteps)``, a set of timesteps: only denoiser calls inside;
- ``mask``: bool (or 0/1) ``(height, width)`` for spatial maps, ``(tokens,)`` for token
  sequences (or ``(height, width)`` when tokens = height × width, row-major): only there;
- ``branch``: ``"cond"`` or ``"uncond"``: only that CFG half (without CFG the single pass
  counts as the conditional one: a ``"cond"`` edit applies to it, an ``"uncond"`` edit not);
- ``channels``: an index or indices on the channel axis (axis 1 of 4-D maps, the last axis
  otherwise): the edit sees and changes only those channels.

The edit computes on one CFG branch at a time, (items, ...), restricted to ``channels``; the
mask then keeps the old value outside it. A new kind of edit subclasses :class:`SiteEdit` and
implements ``transform``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from diffprobe.errors import DiffprobeError
from diffprobe.hooks.cache import Cache
from diffprobe.hooks.session import BRANCHES, CallState
from diffprobe.hooks.sites import parse_site


class EditError(DiffprobeError, ValueError):
    """An edit that cannot be built or cannot apply to its site's value."""


# -- windows ------------------------------------------------------------------------------------


def _check_bounds(kind: str, low: Any, high: Any, unit: str) -> None:
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, numbers.Real):
            raise EditError(f"{kind}({low!r}, {high!r}): bounds must be numbers ({unit})")
    if low > high:
        raise EditError(
            f"{kind}({low!r}, {high!r}): low must not exceed high; try {kind}({high}, {low})"
        )


@dataclass(frozen=True)
class NoiseWindow:
    """Denoiser calls whose noise level lies in [low, high], 0 <= low <= high <= 1.

    A call's noise level is the model's ``noise_level_of`` its timestep (t / T for DDPM-type
    schedules of T steps, sigma for rectified flow), the inverse of ``add_noise(noise_level=)``.
    """

    low: float
    high: float

    def __post_init__(self) -> None:
        _check_bounds("NoiseWindow", self.low, self.high, "noise levels in [0, 1]")
        if not 0 <= self.low <= self.high <= 1:
            raise EditError(
                f"NoiseWindow({self.low}, {self.high}): noise levels lie in [0, 1]; for "
                f"scheduler timesteps use TimestepWindow({self.low}, {self.high})"
            )

    def contains(self, state: CallState) -> bool:
        level = state.noise_level
        return level is not None and self.low <= level <= self.high


@dataclass(frozen=True)
class TimestepWindow:
    """Denoiser calls whose timestep argument lies in [low, high] (the denoiser's own units:
    0 .. T-1 for DDPM-type schedules, sigma × 1000 for SD3, sigma for FLUX)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        _check_bounds("TimestepWindow", self.low, self.high, "denoiser timesteps")

    def contains(self, state: CallState) -> bool:
        t = state.timestep
        return t is not None and self.low <= t <= self.high


@dataclass(frozen=True)
class TimestepSet:
    """Denoiser calls whose timestep argument is one of ``timesteps`` (within ``tolerance``,
    in the denoiser's own units): e.g. a channel's active timesteps, or the scheduler steps
    nearest its activity peaks."""

    timesteps: tuple[float, ...]
    tolerance: float = 0.5

    def __post_init__(self) -> None:
        values = (
            list(self.timesteps) if isinstance(self.timesteps, (list, tuple, np.ndarray)) else None
        )
        if not values or any(
            isinstance(v, bool) or not isinstance(v, (numbers.Real, np.number)) for v in values
        ):
            raise EditError(
                f"TimestepSet({self.timesteps!r}): give a non-empty list of denoiser timesteps"
            )
        object.__setattr__(self, "timesteps", tuple(sorted(float(v) for v in values)))
        if not (isinstance(self.tolerance, numbers.Real) and self.tolerance >= 0):
            raise EditError(f"TimestepSet: tolerance={self.tolerance!r} must be a number >= 0")

    def contains(self, state: CallState) -> bool:
        t = state.timestep
        if t is None:
            return False
        index = int(np.searchsorted(self.timesteps, t))
        near = self.timesteps[max(index - 1, 0) : index + 1]
        return any(abs(t - v) <= self.tolerance for v in near)


Window = NoiseWindow | TimestepWindow | TimestepSet


@dataclass(frozen=True, eq=False)
class TimestepProfile:
    """An edit operand that depends on the denoiser call's timestep: ``values`` (numbers) at
    ``timesteps``, linearly interpolated between them and held constant beyond the ends
    (``numpy.interp``), times ``vector`` when given (a direction, e.g. an SAE decoder row).

    ``Add(site, TimestepProfile(ts, 50 * max_activation, vector=direction))`` adds at each call
    the direction scaled by that call's strength."""

    timesteps: tuple[float, ...]
    values: tuple[float, ...]
    vector: torch.Tensor | None = None

    def __post_init__(self) -> None:
        ts = np.asarray(self.timesteps, dtype=np.float64).reshape(-1)
        vs = np.asarray(self.values, dtype=np.float64).reshape(-1)
        if ts.size == 0 or ts.size != vs.size or not np.isfinite(ts).all():
            raise EditError(
                f"TimestepProfile: {ts.size} timesteps and {vs.size} values; give as many "
                "values as timesteps, at least one, all finite"
            )
        order = np.argsort(ts)
        object.__setattr__(self, "timesteps", tuple(ts[order].tolist()))
        object.__setattr__(self, "values", tuple(vs[order].tolist()))
        if self.vector is not None:
            object.__setattr__(self, "vector", torch.as_tensor(self.vector))

    def at(self, timestep: float | None, where: str) -> Any:
        if timestep is None:
            raise EditError(
                f"{where}: a TimestepProfile needs a denoiser call's timestep; this forward is "
                "not a denoiser call"
            )
        scale = float(np.interp(timestep, self.timesteps, self.values))
        return scale if self.vector is None else self.vector * scale


# -- the edits -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditContext:
    """What an edit's ``transform`` knows: the site, the call (``state.branch`` is the branch of
    the rows being edited), whether it is a denoiser call, how often the site ran outside
    denoiser calls before, and ``select``, which applies the edit's channel selection."""

    site: str
    state: CallState
    in_denoiser: bool
    occurrence: int
    select: Callable[[torch.Tensor], torch.Tensor]


def describe_shape(shape: tuple[int, ...]) -> str:
    names = {
        4: "(items, channels, height, width)",
        3: "(items, tokens, channels)",
        2: "(items, channels)",
    }.get(len(shape), "(items, ...)")
    return f"{names} = {shape}"


def channel_axis(value: torch.Tensor) -> int:
    """Axis 1 of (items, channels, height, width) maps, the last axis otherwise."""
    return 1 if value.dim() == 4 else value.dim() - 1


def _as_tensor_or_number(edit: SiteEdit, name: str, given: Any) -> Any:
    if isinstance(given, TimestepProfile):
        return given
    if isinstance(given, np.ndarray):
        return torch.as_tensor(given)
    if isinstance(given, torch.Tensor) or (
        isinstance(given, numbers.Real) and not isinstance(given, bool)
    ):
        return given
    raise EditError(
        f"{edit.kind} at '{edit.site}': {name} must be a number or a tensor, got "
        f"{type(given).__name__}"
    )


def _as_mask(edit: SiteEdit, mask: Any) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.dim() not in (1, 2):
        raise EditError(
            f"{edit.kind} at '{edit.site}': mask of shape {tuple(mask.shape)}; expected "
            "(height, width) for spatial maps or (tokens,) for token sequences"
        )
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise EditError(
                f"{edit.kind} at '{edit.site}': mask of dtype {mask.dtype} holds values other "
                "than 0 and 1; give a bool mask (use Apply for soft weights)"
            )
        mask = mask != 0
    return mask


def _as_channels(edit: SiteEdit, channels: Any) -> tuple[int, ...]:
    if isinstance(channels, torch.Tensor):
        channels = channels.tolist()
    if isinstance(channels, numbers.Integral) and not isinstance(channels, bool):
        channels = [channels]
    chosen = list(channels) if isinstance(channels, Sequence) else None
    if (
        not chosen
        or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) for c in chosen)
        or len(set(chosen)) != len(chosen)
    ):
        raise EditError(
            f"{edit.kind} at '{edit.site}': channels={channels!r}; expected an index or distinct "
            "indices of channels, e.g. channels=[3, 17]"
        )
    return tuple(int(c) for c in chosen)


@dataclass(frozen=True, eq=False)
class SiteEdit:
    """The restrictions every edit shares (see the module docstring)."""

    site: str
    _: KW_ONLY
    window: Window | None = None
    mask: torch.Tensor | None = None
    branch: str | None = None
    channels: int | Sequence[int] | None = None

    kind: ClassVar[str] = "SiteEdit"

    def __post_init__(self) -> None:
        if not isinstance(self.site, str):
            raise EditError(
                f"{self.kind}: site must be a name such as 'unet.mid_block', got {self.site!r}"
            )
        parse_site(self.site)
        if self.branch not in (None, *BRANCHES):
            raise EditError(
                f"{self.kind} at '{self.site}': branch must be None, 'cond' or 'uncond', "
                f"not {self.branch!r}"
            )
        if self.window is not None and not isinstance(
            self.window, (NoiseWindow, TimestepWindow, TimestepSet)
        ):
            pair = isinstance(self.window, tuple) and len(self.window) == 2
            low, high = self.window if pair else ("low", "high")
            raise EditError(
                f"{self.kind} at '{self.site}': window={self.window!r} does not say its unit; "
                f"pass NoiseWindow({low}, {high}) for noise levels or TimestepWindow({low}, "
                f"{high}) for denoiser timesteps"
            )
        if self.mask is not None:
            object.__setattr__(self, "mask", _as_mask(self, self.mask))
        if self.channels is not None:
            object.__setattr__(self, "channels", _as_channels(self, self.channels))
        self._check()

    def _check(self) -> None:
        """Validate the edit's own fields (subclasses)."""

    def transform(self, value: torch.Tensor, context: EditContext) -> torch.Tensor:
        """The new value of the edited rows and channels (same shape as ``value``)."""
        raise NotImplementedError

    def applies_to(self, branch: str) -> bool:
        """Whether the rows of ``branch`` ("uncond", "cond" or "none") are edited."""
        if self.branch is None or self.branch == branch:
            return True
        return branch == "none" and self.branch == "cond"

    def fit(
        self, name: str, operand: Any, like: torch.Tensor, context: EditContext | None = None
    ) -> Any:
        """``operand`` (a number, tensor or :class:`TimestepProfile`, resolved at the call's
        timestep) made to broadcast onto ``like``, or an error naming the site, the expected and
        the given shapes."""
        if isinstance(operand, TimestepProfile):
            timestep = (
                context.state.timestep if context is not None and context.in_denoiser else None
            )
            operand = operand.at(timestep, f"{self.kind} at '{self.site}'")
        if not isinstance(operand, torch.Tensor):
            return operand
        operand = operand.to(device=like.device, dtype=like.dtype)
        if operand.numel() == 1:
            return operand.reshape(())
        if operand.dim() == 1 and like.dim() >= 2:
            shape = [1] * like.dim()
            shape[channel_axis(like)] = -1
            if operand.shape[0] == like.shape[channel_axis(like)]:
                return operand.view(shape)
        else:
            try:
                if torch.broadcast_shapes(operand.shape, like.shape) == like.shape:
                    return operand
            except RuntimeError:
                pass
        channels = like.shape[channel_axis(like)] if like.dim() >= 2 else None
        vector = f"a ({channels},) channel vector or " if channels else ""
        raise EditError(
            f"{self.kind} at '{self.site}': {name} of shape {tuple(operand.shape)} does not fit "
            f"the site's value per CFG branch {describe_shape(tuple(like.shape))}; give a "
            f"number, {vector}a tensor that broadcasts to {tuple(like.shape)}"
        )


@dataclass(frozen=True, eq=False)
class Add(SiteEdit):
    """old + ``value``."""

    value: torch.Tensor | float
    kind: ClassVar[str] = "Add"

    def _check(self) -> None:
        object.__setattr__(self, "value", _as_tensor_or_number(self, "value", self.value))

    def transform(self, value: torch.Tensor, context: EditContext) -> torch.Tensor:
        return value + self.fit("value", self.value, value, context)


@dataclass(frozen=True, eq=False)
class Scale(SiteEdit):
    """old × ``factor``."""

    factor: torch.Tensor | float
    kind: ClassVar[str] = "Scale"

    def _check(self) -> None:
        object.__setattr__(self, "factor", _as_tensor_or_number(self, "factor", self.factor))

    def transform(self, value: torch.Tensor, context: EditContext) -> torch.Tensor:
        return value * self.fit("factor", self.factor, value, context)


@dataclass(frozen=True, eq=False)
class Replace(SiteEdit):
    """``value`` in place of the old value."""

    value: torch.Tensor | float
    kind: ClassVar[str] = "Replace"

    def _check(self) -> None:
        object.__setattr__(self, "value", _as_tensor_or_number(self, "value", self.value))

    def transform(self, value: torch.Tensor, context: EditContext) -> torch.Tensor:
        new = self.fit("value", self.value, value, context)
        if not isinstance(new, torch.Tensor):
            return torch.full_like(value, new)
        return new.expand_as(value).clone()


@dataclass(frozen=True, eq=False)
class Ablate(SiteEdit):
    """Zeros in place of the old value (for a mean ablation, :class:`Replace` by the mean)."""

    kind: ClassVar[str] = "Ablate"

    def transform(self, value: torch.Tensor, context: EditContext) -> torch.Tensor:
        return torch.zeros_like(value)


@dataclass(frozen=True, eq=False)
class Clamp(SiteEdit):
    """``torch.clamp(old, min, max)``; give at least one bound."""

    min: torch.Tensor | float | None = None
    max: torch.Tensor | float | None = None
    kind: ClassVar[str] = "Clamp"

    def _check(self) -> None:
        if self.min is None and self.max is None:
            raise EditError(f"Clamp at '{self.site}' needs min=, max= or both")
        for name in ("min", "max"):
            if getattr(self, name) is not None:
                bound = _as_tensor_or_number(self, name, getattr(self, name))
                object.__setattr__(self, name, bound)
        both = (self.min, self.max)
        if all(isinstance(b, numbers.Real) for b in both) and self.min > self.max:
            raise EditError(f"Clamp at '{self.site}': min={self.min} exceeds max={self.max}")

    def transform(self, value: torch.Tensor, context: EditContext) -> torch.Tensor:
        bounds = [None if b is None else self.fit(n, b, value, context) for n, b in self._bounds()]
        if any(isinstance(b, torch.Tensor) for b in bounds):
            # torch.clamp takes a tensor bound only with the other one a tensor (or None) too
            bounds = [None if b is None else torch.as_tensor(b).to(value) for b in bounds]
        return torch.clamp(value, *bounds)

    def _bounds(self) -> tuple[tuple[str, Any], tuple[str, Any]]:
        return ("min", self.min), ("max", self.max)


@dataclass(frozen=True, eq=False)
class Patch(SiteEdit):
    """The value ``source`` recorded at the same site, denoiser call and branch.

    Calls are matched by index within their contexts; a source recorded without CFG (branch
    "none") serves either branch; outside denoiser calls the n-th forward of the site gets the
    n-th record."""

    source: Cache
    kind: ClassVar[str] = "Patch"

    def _check(self) -> None:
        if not isinstance(self.source, Cache):
            raise EditError(
                f"Patch at '{self.site}': source must be a Cache from diffprobe.capture, got "
                f"{type(self.source).__name__}"
            )

    def _record(self, context: EditContext) -> torch.Tensor:
        if context.site not in self.source:
            raise EditError(
                f"Patch at '{self.site}': the source cache holds no record of it (it holds "
                f"{', '.join(self.source.sites) or 'nothing'}); capture the site in the source run"
            )
        if not context.in_denoiser:
            found = [r for r in self.source.records(context.site) if r.call is None]
            if context.occurrence < len(found):
                return found[context.occurrence].value
            raise EditError(
                f"Patch at '{self.site}': the source has {len(found)} records outside denoiser "
                f"calls; forward {context.occurrence + 1} needs one more"
            )
        call = context.state.index
        found = self.source.records(context.site, call=call)
        wanted = context.state.branch
        if wanted == "none" and self.branch is not None:
            wanted = self.branch
        for candidates in (
            [r for r in found if r.branch == wanted],
            [r for r in found if r.branch == "none"],
        ):
            if len(candidates) == 1:
                return candidates[0].value
        held = ", ".join(r.branch for r in found) or "nothing"
        raise EditError(
            f"Patch at '{self.site}': the source has no {wanted!r} record for denoiser call "
            f"{call} (it has {held}); record it with the same guidance, or restrict the patch "
            "with branch="
        )

    def transform(self, value: torch.Tensor, context: EditContext) -> torch.Tensor:
        source = context.select(self._record(context).to(device=value.device, dtype=value.dtype))
        if source.shape != value.shape:
            raise EditError(
                f"Patch at '{self.site}': the source value {describe_shape(tuple(source.shape))} "
                f"does not match the value {describe_shape(tuple(value.shape))}"
            )
        return source


@dataclass(frozen=True, eq=False)
class Apply(SiteEdit):
    """``fn(old, state) -> new`` of the same shape; ``state`` is the call's
    :class:`~diffprobe.hooks.session.CallState` with ``branch`` set to the edited rows'."""

    fn: Callable[[torch.Tensor, CallState], torch.Tensor]
    kind: ClassVar[str] = "Apply"

    def _check(self) -> None:
        if not callable(self.fn):
            raise EditError(
                f"Apply at '{self.site}': fn must be callable, got {type(self.fn).__name__}"
            )

    def transform(self, value: torch.Tensor, context: EditContext) -> torch.Tensor:
        new = self.fn(value, context.state)
        if not isinstance(new, torch.Tensor) or new.shape != value.shape:
            given = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise EditError(
                f"Apply at '{self.site}': fn returned {given} for the value "
                f"{describe_shape(tuple(value.shape))}; it must return a tensor of the same shape"
            )
        return new


# -- the stringly typed constructor of earlier versions -----------------------------------------

EDITS: dict[str, type[SiteEdit]] = {
    "add": Add,
    "scale": Scale,
    "replace": Replace,
    "ablate": Ablate,
    "clamp": Clamp,
    "patch": Patch,
    "fn": Apply,
}
_SHARED = {f.name for f in dataclasses.fields(SiteEdit)}


def Edit(
    site: str, op: str = "add", *, timesteps: tuple[float, float] | None = None, **fields: Any
) -> SiteEdit:  # noqa: N802 - the constructor name of earlier versions
    """``Edit(site, "scale", factor=2)`` -> ``Scale(site, factor=2)``: the typed edit of ``op``.

    ``timesteps=(low, high)`` is ``window=TimestepWindow(low, high)``. Fields the op does not
    take are an error, not ignored."""
    if op not in EDITS:
        raise EditError(f"unknown edit op {op!r} at '{site}'; expected one of {', '.join(EDITS)}")
    cls = EDITS[op]
    given = {k: v for k, v in fields.items() if v is not None}
    if timesteps is not None:
        if "window" in given:
            raise EditError(f"Edit at '{site}': give window= or timesteps=, not both")
        given["window"] = TimestepWindow(*timesteps)
    own = {f.name: f for f in dataclasses.fields(cls) if f.name not in _SHARED}
    for name in given:
        if name not in own and name not in _SHARED:
            takes = ", ".join(own) or "no fields of its own"
            raise EditError(
                f"Edit op {op!r} at '{site}' takes {takes}, not {name}; the typed form is "
                f"{cls.__name__}('{site}', ...)"
            )
    for name, spec_field in own.items():
        required = spec_field.default is dataclasses.MISSING
        if required and name not in given:
            raise EditError(f"Edit op {op!r} at '{site}' needs a {name} ({name}=...)")
    return cls(site, **given)
