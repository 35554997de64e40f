"""One hook engine: capture, edit and stop early at named sites.

Everything here is a context manager that registers plain PyTorch hooks on the native modules
and removes them on every exit path, exceptions included::

    with diffprobe.capture(model, ["unet.mid_block", "unet.up_blocks.1"]) as cache:
        model.generate("a red circle", steps=4)
    cache["unet.mid_block", "cond"]          # (denoiser calls, items, 1280, 8, 8)
    cache.view("unet.mid_block").values      # (denoiser calls, branches, items, 1280, 8, 8)

    with diffprobe.edit(model, Add("unet.mid_block", direction, branch="cond")):
        images = model.generate("a red circle", steps=4)

    images, cache = model.run_with_cache("a red circle", sites="unet.*_block*", steps=4)

Each captured value is a :class:`Record` that knows the denoiser call it came from (0-based,
counted from the start of the context), the timestep and noise level of that call, and its CFG
branch. When classifier-free guidance doubles the denoiser batch as ``[uncond, cond]`` (the
order of every diffusers pipeline), each capture is split into an ``"uncond"`` and a ``"cond"``
record, so the two halves are never mixed; reading a site with both asks for a branch. Without
CFG the whole batch is one record with branch ``"none"``. Values read outside a denoiser call
(text encoders, VAE) have ``call=None``.

The parts: :mod:`~diffprobe.hooks.session` (the denoiser-call tracker, branch layouts, the
early-stop scope), :mod:`~diffprobe.hooks.capture`, :mod:`~diffprobe.hooks.cache`,
:mod:`~diffprobe.hooks.edits` (the typed edits), :mod:`~diffprobe.hooks.editing` (applying
them), :mod:`~diffprobe.hooks.access` (a site's tensor inside a module's input or output),
:mod:`~diffprobe.hooks.sites` (names, globs).

Gradients: nothing here turns autograd off. ``capture(..., detach=False)`` keeps captured values
in the graph, also with ``stop_early`` inside ``model.denoise``; ``model.generate`` runs the
native pipeline, which is decorated with ``torch.no_grad``.
"""

from diffprobe.hooks.attention import AttentionRecord, AttentionSite, capture_attention
from diffprobe.hooks.cache import Cache, CacheError, Record, SiteView
from diffprobe.hooks.capture import capture
from diffprobe.hooks.editing import apply_edit, edit
from diffprobe.hooks.edits import (
    Ablate,
    Add,
    Apply,
    Clamp,
    Edit,
    EditContext,
    EditError,
    NoiseWindow,
    Patch,
    Replace,
    Scale,
    SiteEdit,
    TimestepProfile,
    TimestepSet,
    TimestepWindow,
)
from diffprobe.hooks.session import (
    BRANCHES,
    DENOISER_NAMES,
    BranchLayoutError,
    CallState,
    StopEarlyError,
    StopForward,
    catch_stop,
    components_of,
    forbid_stop_early,
)
from diffprobe.hooks.sites import SiteFilter, select_sites

__all__ = [
    "BRANCHES",
    "DENOISER_NAMES",
    "Ablate",
    "Add",
    "Apply",
    "AttentionRecord",
    "AttentionSite",
    "BranchLayoutError",
    "Cache",
    "CacheError",
    "CallState",
    "Clamp",
    "Edit",
    "EditContext",
    "EditError",
    "NoiseWindow",
    "Patch",
    "Record",
    "Replace",
    "Scale",
    "SiteEdit",
    "SiteFilter",
    "SiteView",
    "StopEarlyError",
    "StopForward",
    "TimestepProfile",
    "TimestepSet",
    "TimestepWindow",
    "capture",
    "capture_attention",
    "catch_stop",
    "components_of",
    "apply_edit",
    "edit",
    "forbid_stop_early",
    "select_sites",
]
