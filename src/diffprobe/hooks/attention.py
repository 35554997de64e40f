"""Capture attention probabilities (image queries -> text keys) at attention modules.

diffusers' attention processors call ``torch.nn.functional.scaled_dot_product_attention`` and
never form the probability matrix. :func:`capture_attention` hooks each requested attention
module (a pre-hook marks it as the module in flight, a forward hook, run also on exceptions,
unmarks it) and, for the duration of the block, wraps that one torch function: while a marked
module runs, its first SDPA call is answered by the original function as usual and, beside it,
the probabilities are formed from the very ``query``, ``key``, ``attn_mask`` and ``scale`` the
processor passed (so after q/k norms, RoPE and the joint concatenation, whatever the
processor did). Nothing the model computes changes; any other SDPA call passes straight through.

Which tokens are image and which are text is the adapter's knowledge, given per site as an
:class:`AttentionSite`:

- ``"cross"``: queries are image tokens, keys are text tokens (SD/SDXL ``attn2``);
- ``"added_kv"``: queries are image tokens, keys are ``[text, image]`` (IF);
- ``"joint"``: one sequence of image and text tokens for queries and keys, split from the
  module's own ``hidden_states`` (image) and ``encoder_hidden_states`` (text) lengths;
  ``text_first`` says the order (SD3: ``[image, text]``; FLUX double-stream: ``[text, image]``);
- ``"single"``: the module gets one ``[text, image]`` sequence (FLUX single-stream blocks);
  the text length is read off the denoiser's ``encoder_hidden_states`` of that call.

Each record keeps the image-query x text-key quadrant of the probabilities, **softmax over all
keys** (image keys included for joint attention), **averaged over heads**:
``(items, image tokens, text tokens)`` float32. With ``outputs=True`` joint and single sites
also give the ConceptAttention-style output-space scores: the SDPA outputs (heads
concatenated, before the output projection) of image tokens dotted with those of text tokens,
``(items, image tokens, text tokens)``. With ``outputs=True`` cross sites (SD/SDXL ``attn2``)
give the value-space scores instead (a UNet's text tokens have no outputs): the image tokens'
SDPA outputs and the text tokens' values, heads concatenated and both through the module's
output projection weight (``to_out[0]``, bias left out), dotted:
``(W_o o_i) · (W_o v_t)``. CFG branches are split by the hook engine's session
exactly as for :func:`~diffprobe.hooks.capture.capture`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffprobe.errors import DiffprobeError
from diffprobe.hooks.session import AUTO, HookSession

KINDS = ("cross", "added_kv", "joint", "single")
# image queries handled per step when forming probabilities (bounds the temporary logits)
_QUERY_CHUNK = 4096


@dataclass(frozen=True)
class AttentionSite:
    """An attention module whose image->text attention is read (see the module doc)."""

    site: str
    kind: str
    text_first: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DiffprobeError(f"attention kind {self.kind!r}: expected one of {KINDS}")


@dataclass
class AttentionRecord:
    """One attention module's image->text attention in one denoiser call and CFG branch.

    ``probs``: (items, image tokens, text tokens), softmax over all keys, mean over heads;
    ``outputs``: the output-space scores of the same shape (joint/single sites with
    ``outputs=True``), else None."""

    site: str
    call: int | None
    timestep: float | None
    noise_level: float | None
    branch: str
    probs: torch.Tensor
    outputs: torch.Tensor | None = None


@dataclass
class _Frame:
    site: AttentionSite
    image: slice | None = None  # positions of image tokens among the queries
    text: slice | None = None  # positions of text tokens among the keys
    done: bool = False
    projection: torch.Tensor | None = None  # cross sites with outputs: to_out[0].weight
    results: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)


_ACTIVE: ContextVar[_Frame | None] = ContextVar("diffprobe_attention", default=None)
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0
_ORIGINAL_SDPA: Callable | None = None


def _probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    image: slice,
    text: slice,
) -> torch.Tensor:
    """softmax(q_image kᵀ · scale + mask) over all keys, text columns, mean over heads:
    (batch, image tokens, text tokens) float32."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    queries = query[:, :, image].float()
    keys = key.float()
    mask = attn_mask
    if mask is not None and mask.dim() >= 2 and mask.shape[-2] == query.shape[-2]:
        mask = mask[..., image, :]
    parts = []
    for start in range(0, queries.shape[2], _QUERY_CHUNK):
        logits = queries[:, :, start : start + _QUERY_CHUNK] @ keys.transpose(-1, -2) * scale
        if mask is not None:
            chunk = mask
            if chunk.dim() >= 2 and chunk.shape[-2] == queries.shape[2]:
                chunk = chunk[..., start : start + _QUERY_CHUNK, :]
            if chunk.dtype == torch.bool:
                logits = logits.masked_fill(~chunk, float("-inf"))
            else:
                logits = logits + chunk.float()
        parts.append(logits.softmax(-1)[..., text].mean(1))
    return torch.cat(parts, dim=1)


def _output_scores(out: torch.Tensor, image: slice, text: slice) -> torch.Tensor:
    """Image-token outputs dotted with text-token outputs (heads concatenated):
    (batch, image tokens, text tokens) float32."""
    batch, heads, tokens, width = out.shape
    flat = out.transpose(1, 2).reshape(batch, tokens, heads * width).float()
    return flat[:, image] @ flat[:, text].transpose(1, 2)


def _value_scores(out: torch.Tensor, value: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Image-token outputs against text-token values, heads concatenated, both projected by
    ``projection`` (channels, heads x width): (batch, image tokens, text tokens) float32."""
    batch, heads, tokens, width = out.shape
    weight = projection.float()
    outputs = out.transpose(1, 2).reshape(batch, tokens, heads * width).float() @ weight.T
    values = value.transpose(1, 2).reshape(batch, value.shape[2], heads * width).float()
    return outputs @ (values @ weight.T).transpose(1, 2)


def _patched_sdpa(query, key, value, attn_mask=None, *args: Any, **kwargs: Any):
    out = _ORIGINAL_SDPA(query, key, value, attn_mask, *args, **kwargs)
    frame = _ACTIVE.get()
    if frame is None or frame.done or frame.image is None or query.dim() != 4:
        return out
    frame.done = True
    scale = kwargs.get("scale")
    if scale is None and len(args) >= 3:
        scale = args[2]
    with torch.no_grad():
        probs = _probabilities(query, key, attn_mask, scale, frame.image, frame.text)
        scores = None
        if frame.site.kind in ("joint", "single"):
            scores = _output_scores(out, frame.image, frame.text)
        elif frame.projection is not None and value.dim() == 4:
            scores = _value_scores(out, value, frame.projection)
    frame.results.append((probs, scores))
    return out


@contextlib.contextmanager
def _sdpa_wrapped() -> Iterator[None]:
    global _PATCH_USERS, _ORIGINAL_SDPA
    functional = torch.nn.functional
    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
            _ORIGINAL_SDPA = functional.scaled_dot_product_attention
            functional.scaled_dot_product_attention = _patched_sdpa
        _PATCH_USERS += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCH_USERS -= 1
            if _PATCH_USERS == 0:
                functional.scaled_dot_product_attention = _ORIGINAL_SDPA
                _ORIGINAL_SDPA = None


def _argument(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _tokens(tensor: torch.Tensor) -> int:
    """Sequence length of (batch, tokens, width), or height x width of (batch, C, H, W)."""
    return tensor.shape[1] if tensor.dim() == 3 else int(tensor.shape[2] * tensor.shape[3])


def _split(site: AttentionSite, args: tuple, kwargs: dict, text_length: int | None):
    """(image query positions, text key positions) of one call of the module."""
    hidden = _argument(args, kwargs, "hidden_states", 0)
    context = _argument(args, kwargs, "encoder_hidden_states", 1)
    if site.kind == "single":
        if text_length is None:
            raise DiffprobeError(
                f"{site.site}: a single-stream site needs the denoiser's encoder_hidden_states "
                "to split text from image tokens"
            )
        return slice(text_length, None), slice(0, text_length)
    if context is None:
        raise DiffprobeError(
            f"{site.site} ran without encoder_hidden_states: it is not a text-attention site"
        )
    image_tokens, text_tokens = _tokens(hidden), context.shape[1]
    if site.kind == "cross":
        return slice(0, image_tokens), slice(0, text_tokens)
    if site.kind == "added_kv":
        return slice(0, image_tokens), slice(0, text_tokens)
    if site.text_first:
        return slice(text_tokens, text_tokens + image_tokens), slice(0, text_tokens)
    return slice(0, image_tokens), slice(image_tokens, image_tokens + text_tokens)


@contextlib.contextmanager
def capture_attention(
    model: Any,
    sites: Sequence[AttentionSite],
    *,
    branches: Sequence[str] | None = None,
    outputs: bool = False,
    on_record: Callable[[AttentionRecord], None] | None = None,
    branch_layout: Any = AUTO,
) -> Iterator[list[AttentionRecord]]:
    """Record image->text attention at ``sites`` during the denoiser calls run in the block.

    ``branches``: keep only records of these CFG branches (e.g. ``("cond", "none")``: the
    conditional half under CFG, the whole batch without it); None keeps all. ``on_record``
    receives each record as it is made (to reduce or stream it) instead of the list keeping it.
    ``outputs`` adds the output-space scores (joint and single sites; value-space scores at
    cross sites, see the module doc).
    """
    if not sites:
        raise DiffprobeError("capture_attention needs at least one attention site")
    session = HookSession(model, branch_layout)
    records: list[AttentionRecord] = []
    text_length: dict[str, int | None] = {"value": None}
    keep = None if branches is None else set(branches)

    def enter_denoiser(module: nn.Module, args: tuple, kwargs: dict) -> None:
        context = kwargs.get("encoder_hidden_states")
        text_length["value"] = context.shape[1] if isinstance(context, torch.Tensor) else None

    def emit(site: AttentionSite, probs: torch.Tensor, scores: torch.Tensor | None) -> None:
        state = session.state
        active = session.denoiser is not None and state.active
        call, timestep, noise_level = (
            (state.index, state.timestep, state.noise_level) if active else (None, None, None)
        )
        if active and state.layout and probs.shape[0] == state.batch:
            parts = len(state.layout)
            pieces = zip(
                state.layout,
                probs.chunk(parts),
                scores.chunk(parts) if scores is not None else [None] * parts,
                strict=True,
            )
        else:
            pieces = [("none", probs, scores)]
        for branch, p, s in pieces:
            if keep is not None and branch not in keep:
                continue
            record = AttentionRecord(
                site.site, call, timestep, noise_level, branch, p, s if outputs else None
            )
            (on_record or records.append)(record)

    def hooks_for(site: AttentionSite) -> tuple[Callable, Callable]:
        token_holder: dict[str, Any] = {}

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            image, text = _split(site, args, kwargs, text_length["value"])
            frame = _Frame(site, image, text)
            out_projection = getattr(module, "to_out", None)
            if outputs and site.kind == "cross" and out_projection is not None:
                frame.projection = out_projection[0].weight.detach()
            token_holder["frame"] = frame
            token_holder["token"] = _ACTIVE.set(frame)

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            token = token_holder.pop("token", None)
            frame = token_holder.pop("frame", None)
            if token is not None:
                _ACTIVE.reset(token)
            if frame is None or output is None:  # None: the forward raised
                return
            if not frame.results:
                raise DiffprobeError(
                    f"{site.site}: its attention processor "
                    f"({type(getattr(module, 'processor', None)).__name__}) made no "
                    "scaled_dot_product_attention call, so its probabilities cannot be read; "
                    "use diffusers' default (SDPA) processors"
                )
            emit(site, *frame.results[0])

        return pre, post

    try:
        if session.denoiser is not None:
            root = session.components[session.denoiser]
            session.handles.append(root.register_forward_pre_hook(enter_denoiser, with_kwargs=True))
        for site in sites:
            _, module = session.resolve(site.site)
            pre, post = hooks_for(site)
            session.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            session.handles.append(
                module.register_forward_hook(post, with_kwargs=True, always_call=True)
            )
        with _sdpa_wrapped():
            yield records
    finally:
        session.close()
