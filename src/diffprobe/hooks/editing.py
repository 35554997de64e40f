"""Applying typed edits: :func:`edit`, the context manager, and the steps every edit shares
(branch rows, channel selection, mask), so each edit type only says how it transforms a value
(see :mod:`diffprobe.hooks.edits`)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from diffprobe.hooks.access import hook_site
from diffprobe.hooks.edits import (
    EditContext,
    EditError,
    NoiseWindow,
    SiteEdit,
    channel_axis,
    describe_shape,
)
from diffprobe.hooks.session import AUTO, HookSession
from diffprobe.hooks.sites import Site


def _position_mask(spec: SiteEdit, like: torch.Tensor) -> torch.Tensor:
    mask = spec.mask.to(device=like.device)
    shape = tuple(like.shape)
    if like.dim() == 4 and tuple(mask.shape) == shape[-2:]:
        return mask.reshape(1, 1, *shape[-2:])
    if like.dim() == 3 and mask.numel() == shape[1]:
        return mask.reshape(1, shape[1], 1)
    expected = {4: f"({shape[2]}, {shape[3]}) (height, width)", 3: f"({shape[1]},) (tokens)"}
    raise EditError(
        f"{spec.kind} at '{spec.site}': mask of shape {tuple(mask.shape)} for the value "
        f"{describe_shape(shape)}; expected "
        f"{expected.get(like.dim(), 'a value with spatial or token axes')}"
    )


def _channel_index(spec: SiteEdit, like: torch.Tensor) -> torch.Tensor:
    size = like.shape[channel_axis(like)]
    if any(not -size <= c < size for c in spec.channels):
        raise EditError(
            f"{spec.kind} at '{spec.site}': channels {list(spec.channels)} for the value "
            f"{describe_shape(tuple(like.shape))}, which has {size} channels"
        )
    return torch.tensor([c % size for c in spec.channels], device=like.device)


def _edit_rows(spec: SiteEdit, rows: torch.Tensor, context: EditContext) -> torch.Tensor:
    """The edit on the rows of one branch: channels selected, transformed, masked, put back."""
    axis = channel_axis(rows)
    index = None if spec.channels is None else _channel_index(spec, rows)
    target = rows if index is None else rows.index_select(axis, index)
    new = spec.transform(target, context).to(dtype=target.dtype)
    if spec.mask is not None:
        new = torch.where(_position_mask(spec, target), new, target)
    return new if index is None else rows.index_copy(axis, index, new)


def apply_edit(
    spec: SiteEdit, site: Site, value: torch.Tensor, session: HookSession, occurrence: int
) -> torch.Tensor | None:
    """The edited value of ``site`` in the forward running now, or None to leave it."""
    state = session.state
    in_denoiser = session.in_denoiser(site)
    if spec.window is not None and not (in_denoiser and spec.window.contains(state)):
        return None
    layout = state.layout if in_denoiser else None
    if layout and value.shape[0] != state.batch:
        if spec.branch is not None:
            raise EditError(
                f"{spec.kind} at '{spec.site}': the value {describe_shape(tuple(value.shape))} "
                f"does not hold the denoiser batch of {state.batch} on its first axis, so its "
                "CFG branches cannot be told apart; leave out branch="
            )
        layout = None
    branches = layout or ("none",)
    if not any(spec.applies_to(b) for b in branches):
        return None

    def select(tensor: torch.Tensor) -> torch.Tensor:
        if spec.channels is None:
            return tensor
        return tensor.index_select(channel_axis(tensor), _channel_index(spec, tensor))

    parts = value.chunk(len(branches)) if len(branches) > 1 else (value,)
    edited = []
    for branch, rows in zip(branches, parts, strict=True):
        if spec.applies_to(branch):
            context = EditContext(
                site.full,
                dataclasses.replace(state, branch=branch),
                in_denoiser,
                occurrence,
                select,
            )
            rows = _edit_rows(spec, rows, context)
        edited.append(rows)
    return torch.cat(edited) if len(edited) > 1 else edited[0]


@contextlib.contextmanager
def edit(
    model: Any, edits: SiteEdit | Sequence[SiteEdit], *, branch_layout: Any = AUTO
) -> Iterator[list[SiteEdit]]:
    """Apply ``edits`` to every forward pass run inside the block (see the module docstring).

    Edits of one site apply in the order given; capture hooks registered before an edit see the
    value before it, those registered after it the edited value."""
    edit_list = [edits] if isinstance(edits, SiteEdit) else list(edits)
    for spec in edit_list:
        if not isinstance(spec, SiteEdit):
            raise EditError(
                f"edit() takes edits such as Add('unet.mid_block', value=...), got {spec!r}"
            )
    session = HookSession(model, branch_layout)

    def editor(spec: SiteEdit) -> Callable[[Site, torch.Tensor], torch.Tensor | None]:
        outside = [0]  # forwards of the site outside denoiser calls so far (Patch matches them)

        def function(site: Site, value: torch.Tensor) -> torch.Tensor | None:
            occurrence = outside[0]
            if not session.in_denoiser(site):
                outside[0] += 1
            return apply_edit(spec, site, value, session, occurrence)

        return function

    try:
        for spec in edit_list:
            if isinstance(spec.window, NoiseWindow) and session.noise_level_of is None:
                raise EditError(
                    f"{spec.kind} at '{spec.site}': a NoiseWindow needs a diffprobe model to "
                    "know noise levels (diffprobe.from_pipeline(pipe)); or use TimestepWindow"
                )
            site, module = session.resolve(spec.site)
            session.handles.append(hook_site(module, site, editor(spec)))
        yield edit_list
    finally:
        session.close()
