"""Site names: ``component.native.dotted.path[:element]``.

A site is a module of one pipeline component, named by the component (``unet``, ``transformer``,
``text_encoder``, ``text_encoder_2``, ``vae``, ...) followed by the module's native dotted path in
diffusers or transformers (``unet.up_blocks.1.attentions.1``,
``transformer.transformer_blocks.8``, ``text_encoder.encoder.layers.5``). The optional suffix
``:element`` picks what is read or edited:

- nothing: the module's output; for tuple outputs the default element of
  :mod:`diffprobe.hooks.elements` (``hidden_states``);
- ``:input``: the module's first positional input (or its ``hidden_states`` keyword);
- ``:NAME`` or ``:INDEX``: a named or numbered element of a tuple output.

Where a list of sites is asked for, :func:`select_sites` also takes globs and callables:
``"unet.*_block*"`` selects the *outermost* modules whose names match (``*`` also crosses dots;
module lists such as ``unet.down_blocks`` are skipped, having no forward of their own, and a
match's own submodules are dropped), here ``unet.down_blocks.0`` ... ``unet.mid_block`` ...
``unet.up_blocks.3``; ``"unet.*.attn2"`` every cross-attention. A callable ``name -> bool`` is
asked about every site and keeps exactly the names it accepts.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from diffprobe.errors import UnknownSiteError, did_you_mean


@dataclass(frozen=True)
class Site:
    """A parsed site: the component, the module path inside it and the element read."""

    name: str  # as written, without the element suffix
    component: str
    path: str  # dotted path inside the component ("" for the component itself)
    element: str | None = None  # None = default output element; "input"; a name or an index

    @property
    def full(self) -> str:
        return self.name if self.element is None else f"{self.name}:{self.element}"

    @property
    def is_input(self) -> bool:
        return self.element == "input"


def parse_site(text: str) -> Site:
    """Split ``"unet.down_blocks.1:res_samples"`` into its parts (no model needed)."""
    name, _, element = text.partition(":")
    name = name.strip()
    if not name:
        raise UnknownSiteError(f"empty site name in {text!r}; expected e.g. 'unet.mid_block'")
    component, _, path = name.partition(".")
    return Site(name=name, component=component, path=path, element=element.strip() or None)


def module_components(components: dict[str, object]) -> dict[str, nn.Module]:
    """The components of a pipeline that are torch modules (drops tokenizers, schedulers)."""
    return {k: v for k, v in components.items() if isinstance(v, nn.Module)}


SiteFilter = str | Sequence[str] | Callable[[str], bool]
_GLOB = set("*?[")


def all_site_names(components: dict[str, nn.Module]) -> list[str]:
    """Every site of these components, in module registration order."""
    names = []
    for component, module in components.items():
        for path, _ in module.named_modules():
            names.append(f"{component}.{path}" if path else component)
    return names


def resolve_site(
    components: dict[str, nn.Module], text: str, model_name: str | None = None
) -> tuple[Site, nn.Module]:
    """Parse ``text`` and find its module; unknown names get a did-you-mean."""
    site = parse_site(text)
    listing = _listing(model_name)
    if site.component not in components:
        close = did_you_mean(site.component, list(components))
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UnknownSiteError(
            f"unknown site '{site.name}': no component '{site.component}'{hint} "
            f"Components: {', '.join(components)}. {listing}."
        )
    root = components[site.component]
    if not site.path:
        return site, root
    try:
        module = root.get_submodule(site.path)
    except AttributeError:
        close = did_you_mean(site.name, all_site_names({site.component: root}))
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UnknownSiteError(f"unknown site '{site.name}'{hint} {listing}.") from None
    return site, module


def _listing(model_name: str | None) -> str:
    return (
        f"`diffprobe sites {model_name}` lists all"
        if model_name
        else "model.site_names() lists all"
    )


def _glob(components: dict[str, nn.Module], pattern: str, model_name: str | None) -> list[str]:
    name_pattern, colon, element = pattern.partition(":")
    kept: list[str] = []
    names = []
    for component, root in components.items():
        for path, module in root.named_modules():
            name = f"{component}.{path}" if path else component
            names.append(name)
            if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                continue
            if not fnmatch.fnmatchcase(name, name_pattern):
                continue
            if kept and any(name.startswith(k + ".") for k in kept):
                continue
            kept.append(name)
    if not kept:
        close = did_you_mean(name_pattern.replace("*", ""), names)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UnknownSiteError(f"no site matches '{pattern}'{hint} {_listing(model_name)}.")
    return [f"{name}{colon}{element}" for name in kept]


def select_sites(
    components: dict[str, nn.Module], sites: SiteFilter, model_name: str | None = None
) -> list[str]:
    """Site names from exact names, globs (see the module doc) or a callable ``name -> bool``,
    in the order given (globs and callables: module order), each once. Exact names are checked
    later, where they are resolved."""
    if callable(sites):
        chosen = [name for name in all_site_names(components) if sites(name)]
        if not chosen:
            what = getattr(sites, "__name__", type(sites).__name__)
            raise UnknownSiteError(
                f"the site filter {what} accepted none of the sites; {_listing(model_name)}."
            )
        return chosen
    entries = [sites] if isinstance(sites, str) else list(sites)
    chosen = []
    for entry in entries:
        if not isinstance(entry, str):
            raise UnknownSiteError(
                f"site {entry!r} is a {type(entry).__name__}; expected a name such as "
                "'unet.mid_block', a glob such as 'unet.*_block*' or a callable"
            )
        if _GLOB & set(entry.partition(":")[0]):
            chosen.extend(_glob(components, entry, model_name))
        else:
            chosen.append(entry)
    return list(dict.fromkeys(chosen))
