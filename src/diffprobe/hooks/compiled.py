"""Regional compilation that keeps the hook engine exact.

``compile_regions(denoiser)`` compiles the *forward* of each repeated block of a denoiser (every
element of its top-level ``ModuleList``\\ s — UNet down/up blocks, DiT transformer blocks — and
its ``mid_block``) with :func:`torch.compile`. Only ``forward`` is replaced, on the instance, so
``nn.Module.__call__`` stays eager: the hooks of a compiled block itself (a site at a block
boundary: ``unet.down_blocks.1``, ``transformer.transformer_blocks.3``) run outside the compiled
code and see exactly what they see without compilation.

A hook *inside* a compiled block would not run: dynamo traces the block's submodules once and
does not re-check their hooks. So every site the hook engine resolves passes through
:func:`make_reachable`, which restores the eager forward of each compiled region that strictly
contains the site's module and compiles that region's children instead (recursively, down to the
site): the site is then again a boundary. A region split once stays split.

Compilation changes rounding (fused kernels), not semantics: captured values of a compiled run
differ from the eager run's by float rounding only (docs/performance.md states by how much).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["compile_regions", "compiled_regions", "is_compiled", "make_reachable", "uncompile"]

# module -> the arguments it was compiled with; kept on the root module
_ATTRIBUTE = "_diffprobe_compiled"
log = logging.getLogger(__name__)


def _state(root: nn.Module) -> dict[str, Any] | None:
    return root.__dict__.get(_ATTRIBUTE)


# the repeated blocks of diffusers' UNets, DiTs and VAEs (encoder and decoder)
_BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")


def repeated_blocks(root: nn.Module) -> list[nn.Module]:
    """The regions compiled by default: each element of every ``down_blocks``, ``up_blocks``,
    ``transformer_blocks`` and ``single_transformer_blocks`` list and every ``mid_block``
    (UNet and DiT denoisers; a VAE's encoder and decoder), outermost first."""
    regions: list[nn.Module] = []
    inside: set[int] = set()
    for path, module in root.named_modules():
        name = path.rpartition(".")[2]
        if id(module) in inside:
            continue
        chosen: list[nn.Module] = []
        if isinstance(module, nn.ModuleList) and name in _BLOCK_LISTS:
            chosen = [m for m in module if _has_parameters(m)]
        elif name == "mid_block" and _has_parameters(module):
            chosen = [module]
        for region in chosen:
            regions.append(region)
            inside.update(id(m) for m in region.modules())
    return regions


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _compile_one(module: nn.Module, options: dict[str, Any]) -> None:
    if "forward" in module.__dict__:  # compiled already (or a user's own override): leave it
        return
    module.forward = torch.compile(type(module).forward.__get__(module), **options)


# inductor settings diffusers' speed guide gives for UNets (1x1 convolutions as matmuls,
# coordinate-descent tuning of the generated kernels); longer compiles
TUNED_INDUCTOR = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}


def compile_regions(
    denoiser: nn.Module,
    *,
    regions: Callable[[nn.Module], list[nn.Module]] = repeated_blocks,
    channels_last: bool = False,
    tuned: bool = False,
    **options: Any,
) -> list[str]:
    """Compile the repeated blocks of ``denoiser`` in place (``options`` go to
    :func:`torch.compile`, e.g. ``mode="max-autotune-no-cudagraphs"``, ``backend="eager"`` for a
    test without a compiler); returns the compiled regions' paths. Calling it again is a no-op
    for regions already compiled. ``channels_last`` stores the convolution weights channels-last
    first; ``tuned`` compiles with :data:`TUNED_INDUCTOR` (not with ``mode``)."""
    state = _state(denoiser)
    if state is None:
        if tuned:
            if "mode" in options:
                raise ValueError("tuned=True sets inductor options, which torch.compile does "
                                 "not take together with mode=; pass one of them")  # fmt: skip
            options["options"] = {**TUNED_INDUCTOR, **options.get("options", {})}
        if channels_last:
            denoiser.to(memory_format=torch.channels_last)
        _allow_recompiles()
        # static shapes: a new batch size or resolution compiles its own graph, which is faster
        # than dynamo's automatic dynamic-shape graph after the second shape
        state = {"options": {"dynamic": False, **options}, "regions": {}}
        denoiser.__dict__[_ATTRIBUTE] = state
    paths = {id(m): p for p, m in denoiser.named_modules()}
    foreign = []
    for module in regions(denoiser):
        if id(module) in state["regions"]:
            continue
        if "forward" in module.__dict__:  # another tool's wrapper (nnsight patches forwards)
            foreign.append(paths[id(module)])
            continue
        _compile_one(module, state["options"])
        state["regions"][id(module)] = module
    if foreign:
        log.warning("%d blocks stay eager: their forward is replaced on the instance already "
                    "(another tool's wrapper, e.g. nnsight): %s", len(foreign),
                    ", ".join(foreign[:4]) + (" ..." if len(foreign) > 4 else ""))  # fmt: skip
    return sorted(paths[id(m)] for m in state["regions"].values())


def _allow_recompiles() -> None:
    """Raise dynamo's recompile limits (process-wide). Dynamo keeps one cache per code object:
    every instance of a block class (SD1.5's three CrossAttnDownBlock2D of 320, 640 and 1280
    channels) shares it, and each channel count, input shape and grad mode (``no_grad`` in
    diffusers pipelines, ``inference_mode`` in extraction) is an entry. At the default limit of
    8 the later blocks silently ran eager (seen on the GPU: no speed-up at all)."""
    import torch._dynamo  # here, not at import: it costs every `diffprobe` process ~2 s

    config = torch._dynamo.config
    for name, floor in (("recompile_limit", 64), ("cache_size_limit", 64),
                        ("accumulated_recompile_limit", 2048),
                        ("accumulated_cache_size_limit", 2048)):  # fmt: skip
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), floor))


def is_compiled(root: nn.Module) -> bool:
    """Whether ``compile_regions`` was applied to ``root``."""
    return _state(root) is not None


def compiled_regions(root: nn.Module) -> list[str]:
    """Paths (inside ``root``) of the regions whose forward is compiled now."""
    state = _state(root)
    if state is None:
        return []
    paths = {id(m): p for p, m in root.named_modules()}
    return sorted(paths[i] for i in state["regions"] if i in paths)


def make_reachable(root: nn.Module, target: nn.Module) -> None:
    """Make a hook on ``target`` (a submodule of ``root``) run under compilation: every compiled
    region strictly containing ``target`` goes back to its eager forward and its children are
    compiled instead, down to ``target``."""
    state = _state(root)
    if state is None or target is root:
        return
    regions: dict[int, nn.Module] = state["regions"]
    while True:
        holder = next(
            (
                m
                for m in regions.values()
                if m is not target and any(sub is target for sub in m.modules())
            ),
            None,
        )
        if holder is None:
            return
        del holder.forward  # the class's forward again: eager, hooks of its children run
        del regions[id(holder)]
        for child in holder.children():
            if _has_parameters(child) or any(sub is target for sub in child.modules()):
                _compile_one(child, state["options"])
                regions[id(child)] = child


def uncompile(root: nn.Module) -> None:
    """Restore every compiled region's eager forward."""
    state = root.__dict__.pop(_ATTRIBUTE, None)
    if state is None:
        return
    for module in state["regions"].values():
        module.__dict__.pop("forward", None)
