"""One hook engine: capture, edit and stop early at named sites.

Everything here is a context manager that registers plain PyTorch hooks on the native modules
and removes them on every exit path, exceptions included::

    with diffprobe.capture(model, ["unet.mid_block", "unet.up_blocks.1"]) as cache:
        model.generate("a red circle", steps=4)
    cache.stack("unet.mid_block", branch="cond")   # (denoiser calls, items, 1280, 8, 8)

    with diffprobe.edit(model, Edit("unet.mid_block", "add", value=direction, branch="cond")):
        images = model.generate("a red circle", steps=4)

Each captured value is a :class:`Record` that knows the denoiser call it came from (0-based,
counted from the start of the context), the timestep of that call, and its CFG branch. When
classifier-free guidance doubles the denoiser batch as ``[uncond, cond]`` (the order of every
diffusers pipeline), each capture is split into an ``"uncond"`` and a ``"cond"`` record, so the
two halves are never mixed. Without CFG the whole batch is one record with branch ``"none"``.
Values read outside a denoiser call (text encoders, VAE) have ``call=None``.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffprobe.errors import DiffprobeError
from diffprobe.hooks.elements import element_index
from diffprobe.hooks.sites import Site, module_components, resolve_site

BRANCHES = ("uncond", "cond")
DENOISER_NAMES = ("unet", "transformer", "prior")


class StopForward(Exception):
    """Raised inside a forward pass once every requested site of that component has fired."""


@dataclass
class Record:
    """One captured value."""

    site: str
    value: torch.Tensor
    call: int | None  # denoiser call index within the context; None outside denoiser calls
    timestep: float | None
    branch: str  # "uncond", "cond" or "none"


@dataclass
class CallState:
    """What the engine knows about the denoiser call in flight."""

    index: int = -1
    timestep: float | None = None
    batch: int | None = None
    layout: tuple[str, ...] | None = None  # ("uncond", "cond") when the batch is CFG-doubled
    active: bool = False


class Cache:
    """Captured records by site, in the order they were recorded."""

    def __init__(self) -> None:
        self._records: dict[str, list[Record]] = defaultdict(list)

    def add(self, record: Record) -> None:
        self._records[record.site].append(record)

    @property
    def sites(self) -> list[str]:
        return list(self._records)

    def records(
        self, site: str, branch: str | None = None, call: int | None = None
    ) -> list[Record]:
        """Records of ``site``, optionally only one CFG branch and/or one denoiser call."""
        if site not in self._records:
            raise KeyError(f"nothing captured at '{site}'; captured: {', '.join(self.sites)}")
        return [
            r
            for r in self._records[site]
            if (branch is None or r.branch == branch) and (call is None or r.call == call)
        ]

    def stack(self, site: str, branch: str | None = None) -> torch.Tensor:
        """Values of ``site`` stacked on a new leading axis: (records, items, ...)."""
        found = self.records(site, branch)
        if not found:
            raise KeyError(f"no record of '{site}' with branch {branch!r}")
        return torch.stack([r.value for r in found])

    def last(self, site: str, branch: str | None = None) -> torch.Tensor:
        """The most recent value of ``site`` (items, ...)."""
        found = self.records(site, branch)
        if not found:
            raise KeyError(f"no record of '{site}' with branch {branch!r}")
        return found[-1].value

    def __getitem__(self, site: str) -> torch.Tensor:
        return self.stack(site)

    def __contains__(self, site: str) -> bool:
        return site in self._records

    def __len__(self) -> int:
        return sum(len(v) for v in self._records.values())

    def clear(self) -> None:
        self._records.clear()


@dataclass
class Edit:
    """One intervention at a site.

    ``op`` is one of:
      - ``"add"``: output + ``value`` (a per-item tensor, or a (channels,) vector broadcast over
        space for (items, channels, height, width) maps);
      - ``"replace"``: ``value`` in place of the output;
      - ``"scale"``: output × ``factor``;
      - ``"ablate"``: zeros;
      - ``"patch"``: the value recorded at the same site, denoiser call and branch in ``source``
        (a :class:`Cache`), as in activation patching;
      - ``"fn"``: ``fn(value, call_state) -> value``, any function.
    Restrictions, all optional: ``timesteps=(low, high)`` applies only to denoiser calls whose
    timestep lies in [low, high]; ``mask`` (bool or 0/1, (height, width) or (tokens,)) applies
    only at those positions; ``branch`` ("cond" or "uncond") applies only to that CFG half.
    Without CFG the single pass counts as the conditional one: a ``"cond"`` edit applies to it,
    an ``"uncond"`` edit does not.
    """

    site: str
    op: str = "add"
    value: torch.Tensor | float | None = None
    factor: float = 1.0
    source: Cache | None = None
    fn: Callable[[torch.Tensor, CallState], torch.Tensor] | None = None
    timesteps: tuple[float, float] | None = None
    mask: torch.Tensor | None = None
    branch: str | None = None

    OPS = ("add", "replace", "scale", "ablate", "patch", "fn")

    def __post_init__(self) -> None:
        if self.op not in self.OPS:
            raise DiffprobeError(f"unknown edit op {self.op!r}; expected one of {self.OPS}")
        if self.op in ("add", "replace") and self.value is None:
            raise DiffprobeError(f"edit op {self.op!r} at '{self.site}' needs a value")
        if self.op == "patch" and self.source is None:
            raise DiffprobeError(f"edit op 'patch' at '{self.site}' needs source=<Cache>")
        if self.op == "fn" and self.fn is None:
            raise DiffprobeError(f"edit op 'fn' at '{self.site}' needs fn=callable")
        if self.branch not in (None, *BRANCHES):
            raise DiffprobeError(f"branch must be None, 'cond' or 'uncond', not {self.branch!r}")


# ---------------------------------------------------------------------------------------------
# reading and writing one element of a module's output


def _is_model_output(value: Any) -> bool:
    return hasattr(value, "to_tuple") and hasattr(value, "keys")


def _element_key(module: nn.Module, output: Any, element: str | None) -> Any:
    """Where the requested tensor sits inside ``output``: None (the output itself), an index or
    a key of a ModelOutput."""
    if isinstance(output, torch.Tensor):
        if element not in (None, "0", "-1"):
            raise DiffprobeError(
                f"element {element!r} does not exist: {type(module).__name__} returns one tensor"
            )
        return None
    if _is_model_output(output):
        keys = list(output.keys())
        if element is None:
            return keys[0]
        if element in keys:
            return element
        if element.lstrip("-").isdigit():
            return keys[int(element)]
        raise DiffprobeError(
            f"element {element!r} does not exist for {type(module).__name__}; "
            f"its output has {', '.join(keys)}"
        )
    if isinstance(output, (tuple, list)):
        try:
            return element_index(type(module).__name__, element, len(output))
        except KeyError as err:
            raise DiffprobeError(str(err.args[0])) from None
    raise DiffprobeError(f"{type(module).__name__} returned {type(output).__name__}, not a tensor")


def _get_element(output: Any, key: Any, module: nn.Module, site: Site) -> torch.Tensor:
    value = output if key is None else output[key]
    if not isinstance(value, torch.Tensor):
        # e.g. a down block's res_samples: a tuple of tensors has no single value to read
        what = (
            f"a tuple of {len(value)} tensors"
            if isinstance(value, (tuple, list))
            else type(value).__name__
        )
        raise DiffprobeError(
            f"site '{site.full}' reads {what} from {type(module).__name__}, not one tensor; "
            "read the submodule that makes the tensor you want instead (for a down "
            "block's res_samples: its resnets.N, attentions.N or downsamplers.0)"
        )
    return value


def _set_element(output: Any, key: Any, value: torch.Tensor) -> Any:
    if key is None:
        return value
    if _is_model_output(output):
        output[key] = value
        return output
    items = list(output)
    items[key] = value
    return type(output)(items) if isinstance(output, tuple) else items


def _input_location(args: tuple, kwargs: dict) -> tuple[str, Any]:
    if args and isinstance(args[0], torch.Tensor):
        return "arg", 0
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return "kwarg", "hidden_states"
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return "kwarg", key
    raise DiffprobeError("this module received no tensor input to read")


# ---------------------------------------------------------------------------------------------
# the session: hooks on the components, the denoiser call tracker, cleanup


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


def _layout_getter(model: Any, branch_layout: Any) -> Callable[[], tuple[str, ...] | None]:
    """How the engine learns whether the denoiser batch is CFG-doubled."""
    if branch_layout not in ("auto", None) and not callable(branch_layout):
        fixed = tuple(branch_layout)
        return lambda: fixed
    if callable(branch_layout):
        return branch_layout
    if branch_layout is None:
        return lambda: None
    if hasattr(model, "branch_layout"):
        return lambda: model.branch_layout

    def from_pipeline() -> tuple[str, ...] | None:
        try:
            return BRANCHES if bool(model.do_classifier_free_guidance) else None
        except (AttributeError, TypeError):
            return None

    return from_pipeline


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


class _Session:
    """Registers hooks, tracks denoiser calls, removes everything on close."""

    def __init__(self, model: Any, branch_layout: Any = "auto") -> None:
        self.components, self.denoiser, self.model_name = components_of(model)
        self.layout = _layout_getter(model, branch_layout)
        self.state = CallState()
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        if self.denoiser is not None:
            root = self.components[self.denoiser]
            self.handles.append(root.register_forward_pre_hook(self._enter_call, with_kwargs=True))
            self.handles.append(root.register_forward_hook(self._leave_call))

    def _enter_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self.state
        state.index += 1
        state.timestep = _timestep_of(args, kwargs)
        state.batch = _batch_of(args, kwargs)
        layout = self.layout()
        state.layout = layout if layout and state.batch and state.batch % len(layout) == 0 else None
        state.active = True

    def _leave_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.state.active = False

    def resolve(self, text: str) -> tuple[Site, nn.Module]:
        return resolve_site(self.components, text, self.model_name)

    def in_denoiser(self, site: Site) -> bool:
        return site.component == self.denoiser and self.state.active

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        # A stop-early exception leaves the denoiser's post-hook unrun.
        self.state.active = False


# ---------------------------------------------------------------------------------------------
# capture


@contextlib.contextmanager
def capture(
    model: Any,
    sites: str | Sequence[str],
    *,
    stop_early: bool = False,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    to: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    branch_layout: Any = "auto",
    cache: Cache | None = None,
) -> Iterator[Cache]:
    """Record the values at ``sites`` during the forward passes run inside the block.

    ``stop_early`` ends a component's forward as soon as every requested site of that component
    has fired (the denoiser stops after its deepest requested site; a text encoder after its
    deepest requested layer); the raised :class:`StopForward` is caught by ``model.denoise`` and
    by this context manager. ``reduce`` maps each value before it is stored (e.g. spatial mean,
    on the device, so only the pooled vector is kept); ``to`` and ``dtype`` move and cast it.
    Values are detached copies: ``(items, ...)`` per record.
    """
    names = [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise DiffprobeError("capture needs at least one site")
    session = _Session(model, branch_layout)
    cache = cache if cache is not None else Cache()
    required: dict[str, set[str]] = defaultdict(set)
    fired: dict[str, set[str]] = defaultdict(set)

    def store(site: Site, value: torch.Tensor) -> None:
        in_denoiser = session.in_denoiser(site)
        state = session.state
        call = state.index if in_denoiser else None
        timestep = state.timestep if in_denoiser else None
        value = value.detach()
        if reduce is not None:
            value = reduce(value)
        moved = value.to(device=to, dtype=dtype) if (to is not None or dtype is not None) else value
        if moved is value or moved.data_ptr() == value.data_ptr():
            moved = moved.clone()
        if in_denoiser and state.layout and moved.shape[0] == state.batch:
            for branch, half in zip(state.layout, moved.chunk(len(state.layout)), strict=True):
                cache.add(Record(site.full, half, call, timestep, branch))
        else:
            cache.add(Record(site.full, moved, call, timestep, "none"))
        fired[site.component].add(site.full)
        if stop_early and fired[site.component] >= required[site.component]:
            raise StopForward(site.full)

    def output_hook(site: Site) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            key = _element_key(module, output, site.element)
            store(site, _get_element(output, key, module, site))

        return hook

    def input_hook(site: Site) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kind, key = _input_location(args, kwargs)
            store(site, args[key] if kind == "arg" else kwargs[key])

        return hook

    def reset_component(component: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            fired[component].clear()

        return hook

    try:
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
            if site.is_input:
                handle = module.register_forward_pre_hook(input_hook(site), with_kwargs=True)
            else:
                handle = module.register_forward_hook(output_hook(site))
            session.handles.append(handle)
        try:
            yield cache
        except StopForward:
            pass
    finally:
        session.close()


# ---------------------------------------------------------------------------------------------
# edit


def _broadcast_value(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)
    value = value.to(device=like.device, dtype=like.dtype)
    if like.dim() == 4 and value.dim() == 1 and value.shape[0] == like.shape[1]:
        value = value.view(1, -1, 1, 1)  # a channel direction over a spatial map
    return value


def _position_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    mask = mask.to(device=like.device).bool()
    if like.dim() == 4:  # (items, channels, height, width)
        return mask.reshape(1, 1, *like.shape[-2:])
    if like.dim() == 3:  # (items, tokens, channels)
        return mask.reshape(1, like.shape[1], 1)
    raise DiffprobeError(f"a spatial mask needs a 3-D or 4-D value, got shape {tuple(like.shape)}")


@contextlib.contextmanager
def edit(
    model: Any, edits: Edit | Sequence[Edit], *, branch_layout: Any = "auto"
) -> Iterator[list[Edit]]:
    """Apply ``edits`` to every forward pass run inside the block (see :class:`Edit`)."""
    edit_list = [edits] if isinstance(edits, Edit) else list(edits)
    session = _Session(model, branch_layout)

    def apply(spec: Edit, site: Site, old: torch.Tensor) -> torch.Tensor:
        state = session.state
        in_denoiser = session.in_denoiser(site)
        if spec.timesteps is not None:
            if not in_denoiser or state.timestep is None:
                return old
            low, high = spec.timesteps
            if not low <= state.timestep <= high:
                return old
        layout = state.layout if in_denoiser else None
        if spec.branch == "uncond" and not layout:
            return old
        if spec.branch is not None and layout and spec.branch not in layout:
            return old  # a denoiser call that runs only the other branch
        if spec.op == "add":
            new = old + _broadcast_value(spec.value, old)
        elif spec.op == "replace":
            new = _broadcast_value(spec.value, old).expand_as(old).clone()
        elif spec.op == "scale":
            new = old * spec.factor
        elif spec.op == "ablate":
            new = torch.zeros_like(old)
        elif spec.op == "patch":
            call = state.index if in_denoiser else None
            found = spec.source.records(site.full, call=call)
            if not found:
                raise DiffprobeError(
                    f"patch at '{site.full}': the source cache has no record for call {call}"
                )
            new = torch.cat([r.value for r in found]).to(device=old.device, dtype=old.dtype)
        else:
            new = spec.fn(old, state)
        keep = None
        if spec.branch is not None and layout:
            which = layout.index(spec.branch)
            half = old.shape[0] // len(layout)
            keep = torch.zeros(old.shape[0], dtype=torch.bool, device=old.device)
            keep[which * half : (which + 1) * half] = True
            keep = keep.view(-1, *([1] * (old.dim() - 1)))
        if spec.mask is not None:
            where = _position_mask(spec.mask, old)
            keep = where if keep is None else keep & where
        return new if keep is None else torch.where(keep, new, old)

    def output_hook(spec: Edit, site: Site) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            key = _element_key(module, output, site.element)
            value = _get_element(output, key, module, site)
            return _set_element(output, key, apply(spec, site, value))

        return hook

    def input_hook(spec: Edit, site: Site) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
            kind, key = _input_location(args, kwargs)
            if kind == "arg":
                args = (apply(spec, site, args[0]), *args[1:])
            else:
                kwargs = {**kwargs, key: apply(spec, site, kwargs[key])}
            return args, kwargs

        return hook

    try:
        for spec in edit_list:
            site, module = session.resolve(spec.site)
            if site.is_input:
                handle = module.register_forward_pre_hook(input_hook(spec, site), with_kwargs=True)
            else:
                handle = module.register_forward_hook(output_hook(spec, site))
            session.handles.append(handle)
        yield edit_list
    finally:
        session.close()
