"""Each family's dummy components, registered for its adapter so the conformance suite
(``tests/test_conformance.py``) finds them.

A family's ``diffprobe/testing/<family>.py`` builds its tiny seeded pipeline (the sizes
diffusers' own tests use) and registers one or more :class:`DummyCase` with
:func:`register_dummies`, together with the published scheduler settings its full-size random
pipelines use (:func:`diffprobe.testing.full_size.random_pipeline`). What a case states about
its family (sites, the denoiser called by hand, the CFG layout, the default guidance) is written
out independently of the adapter, so the suite checks the adapter against it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from diffprobe.errors import DiffprobeError

# call(pipe, x_t, timestep, branch) -> the denoiser's prediction, written out by hand
DenoiserCall = Callable[[Any, torch.Tensor, torch.Tensor, Mapping[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class DummyCase:
    """One tiny seeded pipeline of a family and what the conformance suite needs to know of it.

    - ``build(seed)``: the pipeline;
    - ``call_denoiser``: one denoiser call by hand (items, C, h, w) from the family's inputs;
    - ``sites``: sites to capture and edit (``:input`` and ``:element`` forms welcome);
      ``hooked``: sites (``site`` or ``site:element``) -> the index of that element in the
      module's tuple output, for a hand-written forward hook (ignored for tensor outputs); ``stop_sites`` for an early stop
      and ``later_site``, a module that must then not run;
    - ``plain_kwargs``: what a plain pipeline call needs to match ``generate``'s defaults;
    - ``cfg_kwargs``: a generation with classifier-free guidance (None: the family has none),
      laid out as ``cfg_calls``: ``"batch"`` ([uncond, cond] halves of one call per step) or
      ``"calls"`` (a conditional call, then an unconditional one); ``no_cfg_kwargs``: one
      without;
    - ``resolution``, ``size_multiple``: the native image size (px) and the multiple every
      size must be;
    - ``default_guidance_scale``: the documented default of ``generate``;
    - ``unconditional``: the pipeline takes no prompt (DDPM).
    """

    name: str
    family: str
    build: Callable[[int], Any]
    call_denoiser: DenoiserCall
    sites: tuple[str, ...]
    hooked: Mapping[str, int]
    stop_sites: tuple[str, ...]
    later_site: str
    resolution: int
    size_multiple: int
    default_guidance_scale: float | None
    plain_kwargs: Mapping[str, Any] = field(default_factory=dict)
    cfg_kwargs: Mapping[str, Any] | None = field(default_factory=lambda: {"guidance_scale": 5.0})
    cfg_calls: str = "batch"
    no_cfg_kwargs: Mapping[str, Any] = field(default_factory=lambda: {"guidance_scale": 1.0})
    unconditional: bool = False

    def __post_init__(self) -> None:
        if self.cfg_calls not in ("batch", "calls"):
            raise DiffprobeError(f"cfg_calls must be 'batch' or 'calls', got {self.cfg_calls!r}")


@dataclass(frozen=True)
class FamilyDummies:
    """The dummy cases of one family and its full-size scheduler (alias -> scheduler)."""

    family: str
    cases: tuple[DummyCase, ...]
    scheduler: Callable[[str], Any]


_DUMMIES: dict[str, FamilyDummies] = {}


def register_dummies(
    family: str, *cases: DummyCase, scheduler: Callable[[str], Any]
) -> FamilyDummies:
    """Register ``family``'s dummy cases and full-size scheduler (once per family)."""
    if not cases:
        raise DiffprobeError(f"register at least one dummy case for family {family!r}")
    wrong = [case.name for case in cases if case.family != family]
    if wrong:
        raise DiffprobeError(f"dummy cases {wrong} are not of family {family!r}")
    if family in _DUMMIES:
        raise DiffprobeError(f"family {family!r} has its dummies registered already")
    _DUMMIES[family] = FamilyDummies(family, tuple(cases), scheduler)
    return _DUMMIES[family]


@contextlib.contextmanager
def registered_dummies(
    family: str, *cases: DummyCase, scheduler: Callable[[str], Any]
) -> Iterator[FamilyDummies]:
    """:func:`register_dummies` for the duration of the block (a toy family in a test)."""
    registration = register_dummies(family, *cases, scheduler=scheduler)
    try:
        yield registration
    finally:
        del _DUMMIES[family]


def dummies(family: str) -> FamilyDummies:
    """The registered dummies of ``family``."""
    try:
        return _DUMMIES[family]
    except KeyError:
        raise DiffprobeError(
            f"family {family!r} has no dummy components registered; add them in "
            f"diffprobe/testing/<family>.py with register_dummies({family!r}, ...)"
        ) from None


def dummy_cases(family: str | None = None) -> list[DummyCase]:
    """Every registered dummy case (of ``family`` only, when given), in registration order."""
    chosen = [dummies(family)] if family is not None else list(_DUMMIES.values())
    return [case for registration in chosen for case in registration.cases]


def plain_generate(
    case: DummyCase,
    pipe: Any,
    prompts: list[str],
    *,
    steps: int,
    seed: int,
    size: int,
    **kwargs: Any,
) -> Any:
    """The pipeline called directly, no diffprobe: (items, H, W, 3) floats."""
    generator = torch.Generator("cpu").manual_seed(seed)
    if case.unconditional:
        return pipe(
            batch_size=len(prompts),
            generator=generator,
            num_inference_steps=steps,
            output_type="np",
            **kwargs,
        ).images
    return pipe(
        prompt=prompts,
        num_inference_steps=steps,
        generator=generator,
        height=size,
        width=size,
        output_type="np",
        **{**case.plain_kwargs, **kwargs},
    ).images
