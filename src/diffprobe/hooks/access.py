"""Reading and writing the tensor a site names inside a module's input or output.

:func:`hook_site` registers one PyTorch hook that hands the site's tensor to a function: the
output (or the ``:element`` of a tuple / ModelOutput) for plain sites, the first tensor input
(positional, else ``hidden_states``, else the first tensor keyword) for ``:input`` sites. When
the function returns a tensor, that tensor takes the old one's place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffprobe.errors import DiffprobeError
from diffprobe.hooks.elements import element_index
from diffprobe.hooks.sites import Site

# (site, tensor) -> None to leave the value, or a tensor to put in its place
SiteFunction = Callable[[Site, torch.Tensor], torch.Tensor | None]


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


def hook_site(module: nn.Module, site: Site, function: SiteFunction) -> Any:
    """Register ``function`` on ``module`` for ``site``; returns the removable handle."""
    if site.is_input:

        def input_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            kind, key = _input_location(args, kwargs)
            new = function(site, args[key] if kind == "arg" else kwargs[key])
            if new is None:
                return None
            if kind == "arg":
                return (new, *args[1:]), kwargs
            return args, {**kwargs, key: new}

        return module.register_forward_pre_hook(input_hook, with_kwargs=True)

    def output_hook(module: nn.Module, args: tuple, output: Any) -> Any:
        key = _element_key(module, output, site.element)
        new = function(site, _get_element(output, key, module, site))
        return None if new is None else _set_element(output, key, new)

    return module.register_forward_hook(output_hook)
