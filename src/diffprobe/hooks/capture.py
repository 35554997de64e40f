"""``capture``: record the values at named sites during the forward passes of a with-block."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from diffprobe.errors import DiffprobeError
from diffprobe.hooks.access import hook_site
from diffprobe.hooks.cache import Cache, Record
from diffprobe.hooks.session import AUTO, HookSession, StopForward
from diffprobe.hooks.sites import Site, SiteFilter, select_sites


@contextlib.contextmanager
def capture(
    model: Any,
    sites: SiteFilter,
    *,
    stop_early: bool = False,
    detach: bool = True,
    reduce: Callable[[torch.Tensor], torch.Tensor]
    | Mapping[str, Callable[[torch.Tensor], torch.Tensor]]
    | None = None,
    to: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    branch_layout: Any = AUTO,
    cache: Cache | None = None,
) -> Iterator[Cache]:
    """Record the values at ``sites`` during the forward passes run inside the block.

    ``sites``: names, globs (``"unet.*_block*"``) or a callable ``name -> bool`` (see
    :func:`diffprobe.hooks.sites.select_sites`). Each value is stored as a :class:`Record` of
    (items, ...) per CFG branch (see :mod:`diffprobe.hooks.session` for how branches are told).

    ``stop_early`` ends a component's forward as soon as every requested site of that component
    has fired (the denoiser stops after its deepest requested site): legal only inside
    ``model.denoise`` (which then returns None); any other forward of that component inside the
    block (``model.generate``, ``model.pipe(...)``) is refused before it runs.

    ``detach`` (default) stores detached copies; ``detach=False`` keeps each value in the
    autograd graph, so a loss on captured values can be back-propagated to the denoiser's inputs
    (under ``torch.enable_grad``, through ``model.denoise``; ``generate`` runs without grad).
    ``reduce`` maps each value before it is stored (e.g. a spatial mean on the device, so only
    the pooled vector is kept), or a mapping site -> function to map each site its own way (a
    site missing from it is stored as it is); ``to`` and ``dtype`` move and cast it.
    """
    session = HookSession(model, branch_layout, stop_early=stop_early)
    cache = cache if cache is not None else Cache()
    required: dict[str, set[str]] = defaultdict(set)
    fired: dict[str, set[str]] = defaultdict(set)

    def store(site: Site, value: torch.Tensor) -> None:
        in_denoiser = session.in_denoiser(site)
        state = session.state
        call, timestep, noise_level = (
            (state.index, state.timestep, state.noise_level) if in_denoiser else (None, None, None)
        )
        if detach:
            value = value.detach()
        reducer = reduce.get(site.full) if isinstance(reduce, Mapping) else reduce
        if reducer is not None:
            value = reducer(value)
        moved = value.to(device=to, dtype=dtype) if (to is not None or dtype is not None) else value
        if moved is value or moved.data_ptr() == value.data_ptr():
            # the module may reuse or modify its output buffer later: keep our own copy
            moved = moved.clone()
        if in_denoiser and state.layout and moved.shape[0] == state.batch:
            for branch, half in zip(state.layout, moved.chunk(len(state.layout)), strict=True):
                cache.add(Record(site.full, half, call, timestep, branch, noise_level))
        else:
            cache.add(Record(site.full, moved, call, timestep, "none", noise_level))
        fired[site.component].add(site.full)
        if stop_early and fired[site.component] >= required[site.component]:
            raise StopForward(site.full)

    def reset_component(component: str) -> Callable:
        guard = session.guard_stop(component) if stop_early else None

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if guard is not None:
                guard(module, args, kwargs)
            fired[component].clear()

        return hook

    try:
        names = select_sites(session.components, sites, session.model_name)
        if not names:
            raise DiffprobeError("capture needs at least one site, e.g. 'unet.mid_block'")
        resolved = [session.resolve(name) for name in names]
        for site, _module in resolved:
            required[site.component].add(site.full)
        for component in required:
            # registered before the site hooks, so it also runs first on the component itself
            root = session.components[component]
            session.handles.append(
                root.register_forward_pre_hook(reset_component(component), with_kwargs=True)
            )
        for site, module in resolved:
            session.handles.append(hook_site(module, site, store))
        yield cache
    finally:
        session.close()
