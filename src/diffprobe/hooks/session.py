"""The hook session: hooks on a model's components, the denoiser-call tracker, CFG branch
layouts, the early-stop scope, and cleanup on every exit path.

Branch layout. A denoiser call whose batch is CFG-doubled holds ``[uncond, cond]`` (the order of
every diffusers pipeline). The session learns the layout of each call, in this order:

1. ``branch_layout`` given to ``capture``/``edit``: a fixed tuple, ``None`` (no CFG) or a
   callable of the batch size;
2. a diffprobe model's ``branch_layout``, set by ``Model.cfg`` around ``generate`` and
   ``denoise`` (and by adapters per call);
3. when nobody set it, while the native pipeline's ``__call__`` runs (``with capture(model, ...):
   model.pipe(...)``): its ``do_classifier_free_guidance``; a pipeline that takes a guidance
   argument but does not expose that property (IF, FLUX) is refused, since the engine cannot
   tell its branches apart; one that takes none (DDPM) has no CFG;
4. any other call (the denoiser called directly) is one batch as given: branch ``"none"``.

Early stop. ``StopForward`` may only be raised where a caller catches it: inside
:func:`catch_stop` for that component, which ``Model.denoise`` opens around its denoiser call.
A forward of a stop-early component anywhere else (``model.generate``, ``model.pipe(...)``, a
direct call) is refused before it runs (:class:`StopEarlyError`), so a with-block is never cut
short silently.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffprobe.errors import DiffprobeError
from diffprobe.hooks.compiled import make_reachable
from diffprobe.hooks.sites import Site, module_components, resolve_site

BRANCHES = ("uncond", "cond")
DENOISER_NAMES = ("unet", "transformer", "prior")
AUTO = "auto"
# pipeline arguments that may turn on classifier-free guidance
_GUIDANCE_ARGUMENTS = ("guidance_scale", "true_cfg_scale", "negative_prompt")


class StopForward(Exception):
    """Raised inside a forward pass once every requested site of that component has fired."""


class StopEarlyError(DiffprobeError):
    """``stop_early=True`` where nothing catches the stop (generate, a native pipeline call)."""


class BranchLayoutError(DiffprobeError):
    """The engine cannot tell the CFG branches of a denoiser batch apart."""


@dataclass
class CallState:
    """What the engine knows about the denoiser call in flight.

    ``timestep`` is the denoiser's own timestep argument; ``noise_level`` its noise level by the
    model's ``noise_level_of`` (None without a diffprobe model); ``layout`` is
    ``("uncond", "cond")`` when the batch is CFG-doubled. ``branch`` is set only in the copy an
    :class:`~diffprobe.hooks.edits.Apply` function receives: the branch of the rows it edits.
    """

    index: int = -1
    timestep: float | None = None
    noise_level: float | None = None
    batch: int | None = None
    layout: tuple[str, ...] | None = None
    active: bool = False
    branch: str | None = None


# Modules whose forward is inside a catch_stop scope, and the sessions that may stop early.
# Context-local (not process-global): each thread and task sees its own.
_CATCHING: ContextVar[tuple[nn.Module, ...]] = ContextVar("diffprobe_catching", default=())
_STOPPING: ContextVar[tuple[HookSession, ...]] = ContextVar("diffprobe_stopping", default=())


class _StopScope:
    stopped: bool = False


@contextlib.contextmanager
def catch_stop(module: nn.Module) -> Iterator[_StopScope]:
    """Allow an early stop in ``module``'s forwards inside the block, and catch it there.

    ``scope.stopped`` tells afterwards whether a capture stopped the forward::

        with catch_stop(model.denoiser) as scope:
            prediction = model.denoiser(**kwargs)
        if scope.stopped: ...
    """
    scope = _StopScope()
    token = _CATCHING.set((*_CATCHING.get(), module))
    try:
        yield scope
    except StopForward:
        scope.stopped = True
    finally:
        _CATCHING.reset(token)


def catches_stop(module: nn.Module) -> bool:
    return any(m is module for m in _CATCHING.get())


def forbid_stop_early(modules: Any, what: str) -> None:
    """Raise :class:`StopEarlyError` if a ``stop_early`` capture is open on any of ``modules``
    (the components ``what`` is about to run)."""
    ours = {id(m) for m in modules}
    for session in _STOPPING.get():
        for name, module in session.components.items():
            if id(module) in ours and name in session.stop_components:
                raise StopEarlyError(
                    f"capture(..., stop_early=True) on '{name}' cannot run around {what}: "
                    "only model.denoise(...) can end a forward early; drop stop_early or "
                    "call model.denoise"
                )


def components_of(model: Any) -> tuple[dict[str, nn.Module], str | None, str | None]:
    """(components, denoiser name, model name) of a diffprobe Model, a pipeline or a dict."""
    if hasattr(model, "module_components"):
        return model.module_components, model.denoiser_name, getattr(model, "name", None)
    if hasattr(model, "components") and isinstance(model.components, dict):
        comps = module_components(model.components)
    elif isinstance(model, dict):
        comps = module_components(model)
    elif isinstance(model, nn.Module):
        comps = {"model": model}
    else:
        raise DiffprobeError(
            f"cannot hook into a {type(model).__name__}; pass a diffprobe model "
            "(diffprobe.load), a diffusers pipeline or a dict of modules"
        )
    denoiser = next((n for n in DENOISER_NAMES if n in comps), None)
    return comps, denoiser, None


def _timestep_of(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        if t.numel() == 0 or t.device.type == "meta":
            return None
        return float(t.flatten()[0])
    return float(t)


def _batch_of(args: tuple, kwargs: dict) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


class _NativePipeline:
    """Branch layouts of denoiser calls made by a diffusers pipeline's own ``__call__``."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.name = type(pipe).__name__
        # __call__ of the class and its bases (a subclass may call super().__call__), unwrapped
        # from diffusers' @torch.no_grad()
        calls = [
            inspect.unwrap(c.__dict__["__call__"])
            for c in type(pipe).__mro__
            if "__call__" in c.__dict__
        ]
        self.codes = {c.__code__ for c in calls if hasattr(c, "__code__")}
        has_property = hasattr(type(pipe), "do_classifier_free_guidance")
        parameters = inspect.signature(type(pipe).__call__).parameters
        if has_property:
            self.rule = "property"
        elif any(name in parameters for name in _GUIDANCE_ARGUMENTS):
            self.rule = "refuse"
        else:
            self.rule = "never"
        self._generation: tuple[Any, int] | None = None  # (pipeline frame, largest batch)

    def calling_frame(self) -> Any:
        """The frame of the pipeline's ``__call__`` running now, or None."""
        frame = sys._getframe()
        while frame is not None:
            if frame.f_code in self.codes and frame.f_locals.get("self") is self.pipe:
                return frame
            frame = frame.f_back
        return None

    def layout(self, batch: int | None) -> tuple[str, ...] | None | str:
        """The layout of this denoiser call; ``AUTO`` when the call is not the pipeline's."""
        frame = self.calling_frame()
        if frame is None:
            return AUTO
        if self.rule == "never":
            return None
        if self.rule == "refuse":
            raise BranchLayoutError(
                f"cannot tell the CFG branches of {self.name}'s denoiser calls (it exposes no "
                "do_classifier_free_guidance): capture around model.generate(...), which labels "
                "them, or pass branch_layout=None (no CFG) or ('uncond', 'cond')"
            )
        # An extra pass on the conditional batch alone (SD3's skip-layer guidance) runs after the
        # doubled one in the same step: only the largest batch of a generation is doubled. The
        # frame is kept (not its id, which a later call could reuse) until the next generation.
        largest = batch or 0
        if self._generation is not None and self._generation[0] is frame:
            largest = max(largest, self._generation[1])
        self._generation = (frame, largest)
        if not bool(self.pipe.do_classifier_free_guidance) or (batch or 0) < largest:
            return None
        return BRANCHES


class HookSession:
    """Registers hooks, tracks denoiser calls, removes everything on close."""

    def __init__(self, model: Any, branch_layout: Any = AUTO, stop_early: bool = False) -> None:
        self.model = model
        self.components, self.denoiser, self.model_name = components_of(model)
        self.branch_layout = branch_layout
        self._native: _NativePipeline | None = None
        self.noise_level_of = getattr(model, "noise_level_of", None)
        self.state = CallState()
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.stop_components: set[str] = set()
        self.stop_early = stop_early
        if stop_early:
            _STOPPING.set((*_STOPPING.get(), self))
        if self.denoiser is not None:
            root = self.components[self.denoiser]
            self.handles.append(root.register_forward_pre_hook(self._enter_call, with_kwargs=True))
            self.handles.append(root.register_forward_hook(self._leave_call))

    def _layout(self, batch: int | None) -> tuple[str, ...] | None:
        chosen = self.branch_layout
        if callable(chosen):
            return chosen(batch)
        if chosen == AUTO:
            model_layout = getattr(self.model, "branch_layout", None)
            if model_layout is not None or getattr(self.model, "branch_layout_set", False):
                chosen = model_layout
        if chosen == AUTO and self.native() is not None:
            chosen = self._native.layout(batch)
        return None if chosen == AUTO or chosen is None else tuple(chosen)

    def native(self) -> _NativePipeline | None:
        """The pipeline whose own calls are read, built on first need (never for calls whose
        layout a model set)."""
        pipe = getattr(self.model, "pipe", self.model)
        if self._native is None and hasattr(pipe, "components"):
            self._native = _NativePipeline(pipe)
        return self._native

    def _enter_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self.state
        state.index += 1
        state.timestep = _timestep_of(args, kwargs)
        state.noise_level = (
            None
            if state.timestep is None or self.noise_level_of is None
            else float(self.noise_level_of(state.timestep))
        )
        state.batch = _batch_of(args, kwargs)
        layout = self._layout(state.batch)
        state.layout = layout if layout and state.batch and state.batch % len(layout) == 0 else None
        state.active = True

    def _leave_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.state.active = False

    def resolve(self, text: str) -> tuple[Site, nn.Module]:
        site, module = resolve_site(self.components, text, self.model_name)
        # a hook inside a compiled region would not run: split the region around it
        make_reachable(self.components[site.component], module)
        return site, module

    def in_denoiser(self, site: Site) -> bool:
        return site.component == self.denoiser and self.state.active

    def guard_stop(self, component: str) -> Callable:
        """A pre-hook on ``component`` refusing its forward outside a :func:`catch_stop`."""
        self.stop_components.add(component)
        root = self.components[component]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not catches_stop(root):
                raise StopEarlyError(
                    f"capture(..., stop_early=True) on '{component}': this forward is not a "
                    "model.denoise(...) call (model.generate, model.pipe(...) or a direct call), "
                    "so nothing would catch the stop; drop stop_early or call model.denoise"
                )

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        # A stop-early exception leaves the denoiser's post-hook unrun.
        self.state.active = False
        if self.stop_early:
            _STOPPING.set(tuple(s for s in _STOPPING.get() if s is not self))
