"""Full-size architectures without weights, and the output shape of every site, on the meta device.

The published configs of every supported model ship with the package under ``configs/<alias>/``,
one JSON file per component (``unet``, ``transformer``, ``vae``, ``text_encoder``, ...). A file is
the component's own ``config.json`` from its hub repository plus ``_class_name`` and ``_library``
(``"diffusers"`` or ``"transformers"``). A local folder in diffusers layout
(``<folder>/<component>/config.json``) works wherever an alias does.

:func:`site_shapes` builds each component on the meta device, runs it once on meta tensors of the
right form with a forward hook on every named submodule, and reports what each one returned. No
weights are read and nothing is computed, so even FLUX (12 B parameters) takes about a second::

    >>> shapes = site_shapes("sd1.5")                        # 512 px, the native size
    >>> shapes["unet.mid_block"].shape
    (1280, 8, 8)
    >>> shapes["unet.down_blocks.1"].elements["res_samples"]
    ((640, 32, 32), (640, 32, 32), (640, 16, 16))

Dummy inputs (batch axis removed in what is reported) come from the family's adapter: the
adapter of the alias's family, of the folder's pipeline class (``model_index.json``), or the
registered adapter that claims the denoiser config (:meth:`~diffprobe.models.Model.claims_denoiser`);
each documents its inputs in ``meta_denoiser_inputs``. The size rule is the adapter's too
(:meth:`~diffprobe.models.Model.size_rule_for`), the one ``Model.check_size`` asks. Text encoders
get 77 tokens (CLIP) or the family's T5 length (:meth:`~diffprobe.models.Model.t5_tokens`: 77 for
IF, 256 for SD3 and FLUX.1-schnell, 512 for a guidance-distilled FLUX). The VAE runs
``vae.encode`` on an image (3, size, size) and ``vae.decode`` on a latent, so sites are
``vae.encoder.*``, ``vae.quant_conv``, ``vae.post_quant_conv`` and ``vae.decoder.*``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from diffprobe import registry
from diffprobe.hooks.elements import element_index, element_names
from diffprobe.models.base import Model
from diffprobe.models.geometry import (
    BATCH,
    CLIP_TOKENS,
    ConfigError,
    SizeRule,
    meta_empty,
    vae_factor,
)

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


DENOISERS = ("unet", "transformer")
# Components that get sites, in the order they are reported; others in a folder (scheduler,
# tokenizer, safety_checker, feature_extractor) are not networks we look inside.
_COMPONENT_ORDER = (
    "unet",
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
)
_COMPONENT_NAME = re.compile(r"^(unet|transformer|vae|text_encoder(_\d+)?)$")

# T5 tokens of a text-encoder-only folder, whose family is unknown (the SD3 pipeline default)
T5_TOKENS_DEFAULT = 256


@dataclass(frozen=True)
class SiteShape:
    """Output shape of one site, per item (batch axis removed).

    ``shape`` is the shape of the *default element* (see :mod:`diffprobe.hooks.elements`); for a
    site that returns a tuple, ``elements`` maps each element name (or its index as a string, for
    classes without names) to its shape. An element that is itself a tuple of tensors (a down
    block's ``res_samples``) has a tuple of shapes. A tensor without a batch axis (FLUX's rotary
    embeddings, T5's position bias) keeps its full shape. ``calls`` is how often the module ran in
    one forward pass; ``shape`` is from its first call.
    """

    site: str
    module_class: str
    shape: tuple
    elements: Mapping[str, tuple] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    calls: int = 1


# ---------------------------------------------------------------------------------------------
# configs


def available_configs() -> list[str]:
    """Aliases whose configs ship with the package."""
    return sorted(p.name for p in CONFIG_ROOT.iterdir() if p.is_dir() and any(p.glob("*.json")))


def _is_alias(source: str) -> bool:
    return (CONFIG_ROOT / source).is_dir() and not Path(source).is_absolute()


def _resolve(alias_or_folder: str | Path) -> str:
    """The alias itself, or the absolute path of a diffusers folder; raises for anything else."""
    source = str(alias_or_folder)
    if source in available_configs():
        return source
    folder = Path(source).expanduser()
    if folder.is_dir():
        if not _folder_components(folder.resolve()):
            raise ConfigError(
                f"folder {source!r} has no component folders with a config.json "
                f"(expected diffusers layout, e.g. {source}/unet/config.json)"
            )
        return str(folder.resolve())
    aliases = available_configs()
    close = difflib.get_close_matches(source, aliases, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"unknown model {source!r}: {hint}known aliases are {', '.join(aliases)}, "
        "or give a local folder in diffusers layout (shapes come from the configs shipped "
        "with diffprobe or in the folder: a hub model is read from its downloaded folder)"
    )


def _folder_components(folder: Path) -> list[str]:
    return [
        p.name
        for p in folder.iterdir()
        if p.is_dir() and _COMPONENT_NAME.match(p.name) and (p / "config.json").is_file()
    ]


def _ordered(names: list[str]) -> list[str]:
    def key(name: str) -> tuple[int, str]:
        return (
            _COMPONENT_ORDER.index(name) if name in _COMPONENT_ORDER else len(_COMPONENT_ORDER),
            name,
        )

    return sorted(names, key=key)


def components(alias: str | Path) -> list[str]:
    """Components of an alias or folder, denoiser first: e.g. ``['unet', 'vae', 'text_encoder']``."""
    source = _resolve(alias)
    if _is_alias(source):
        return _ordered([p.stem for p in (CONFIG_ROOT / source).glob("*.json")])
    return _ordered(_folder_components(Path(source)))


_all_components = components  # site_shapes has a parameter of the same name


# transformers configs saved without a model (no "architectures"): the encoder class by model_type
_TEXT_ENCODER_CLASS = {
    "clip_text_model": "CLIPTextModel",
    "t5": "T5EncoderModel",
    "umt5": "UMT5EncoderModel",
}


@functools.lru_cache(maxsize=256)
def _read_config(path: str, mtime_ns: int) -> str:
    return Path(path).read_text()


def component_config(alias: str | Path, component: str) -> dict:
    """The config dict of one component, with ``_class_name`` and ``_library`` always set."""
    source = _resolve(alias)
    available = components(source)
    if component not in available:
        raise ConfigError(
            f"{source!r} has no component {component!r}; it has {', '.join(available)}"
        )
    if _is_alias(source):
        path = CONFIG_ROOT / source / f"{component}.json"
    else:
        path = Path(source) / component / "config.json"
    try:
        config = json.loads(_read_config(str(path), path.stat().st_mtime_ns))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(
            f"{path} cannot be read as a JSON config ({type(err).__name__}: {err}); give a "
            "folder written by save_pretrained"
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} holds no config object (a JSON dict of settings)")
    if "_class_name" not in config:
        architectures = config.get("architectures") or []
        class_name = (
            architectures[0] if architectures else _TEXT_ENCODER_CLASS.get(config.get("model_type"))
        )
        if class_name is None:
            raise ConfigError(
                f"{path} names no class (no _class_name, architectures or known model_type)"
            )
        config["_class_name"] = class_name
        config.setdefault("_library", "transformers")
    config.setdefault("_library", "diffusers")
    return config


def _model_class(config: dict) -> type[torch.nn.Module]:
    library = config["_library"]
    if library not in ("diffusers", "transformers"):
        raise ConfigError(f"unknown _library {library!r}; expected 'diffusers' or 'transformers'")
    module = importlib.import_module(library)
    try:
        return getattr(module, config["_class_name"])
    except AttributeError:
        raise ConfigError(f"{library} has no class {config['_class_name']!r}") from None


def build_component(
    alias: str | Path,
    component: str,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """Build one component from its config, without weights, in eval mode.

    On ``device="meta"`` (the default) no memory is allocated, so any size builds in well under a
    second. On a real device the weights are randomly initialised.
    """
    config = component_config(alias, component)
    cls = _model_class(config)
    arguments = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device(device):
        if config["_library"] == "diffusers":
            model = cls.from_config(arguments)
        else:
            model = cls(cls.config_class.from_dict(arguments))
    if dtype != torch.float32:
        _cast(model, dtype)
    return model.eval().requires_grad_(False)


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point weights to ``dtype``, keeping the modules the class marks as needing
    float32 (``_keep_in_fp32_modules``, e.g. T5's ``wo``) in float32, as ``from_pretrained`` does."""
    torch.nn.Module.to(model, dtype=dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(part in keep for part in name.split(".")):
            torch.nn.Module.to(module, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# geometry


def _denoiser(source: str) -> str | None:
    names = components(source)
    return next((name for name in DENOISERS if name in names), None)


def _latent_channels(source: str) -> int | None:
    if "vae" not in components(source):
        return None
    return int(component_config(source, "vae")["latent_channels"])


def _family(source: str) -> str | None:
    """The family of an alias (its registry entry) or of a folder (its ``model_index.json``
    pipeline class), or None when the folder does not say."""
    if _is_alias(source):
        return registry.resolve(source).family
    index = Path(source) / "model_index.json"
    if not index.is_file():
        return None
    try:
        pipeline = json.loads(index.read_text()).get("_class_name")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    adapter = registry.adapter_for_pipeline_name(str(pipeline))
    return adapter.family if adapter is not None else None


def _adapter(source: str, denoiser_config: Mapping[str, Any], strict: bool) -> type[Model]:
    """The adapter that knows this denoiser: the one of the source's family when it claims the
    config, else the registered one that does. With ``strict=False`` (geometry only) an
    adapter of the same denoiser class will do, and the base rule when none is."""
    found = registry.adapter_for_denoiser(denoiser_config, _family(source))
    if found is not None:
        return found
    class_name = denoiser_config["_class_name"]
    if strict:
        raise ConfigError(
            f"cannot make dummy inputs for the {class_name} of {_name(source)}: no registered "
            f"family builds this config (families: {', '.join(registry.families())})"
        )
    same_class = [a for a in registry.adapters() if class_name in a.denoiser_classes]
    return same_class[0] if same_class else Model


def _configs(source: str) -> dict[str, dict]:
    """The configs a size rule reads: the denoiser's and the VAE's (if any)."""
    names = components(source)
    return {name: component_config(source, name) for name in (*DENOISERS, "vae") if name in names}


def _name(source: str) -> str:
    """How errors name the model: its alias (also a registered local one, such as ``tiny``),
    else the folder."""
    if _is_alias(source):
        return source
    for spec in registry.list_models():
        if spec.local and str(Path(spec.source).resolve()) == source:
            return str(spec.alias)
    return repr(source)


@contextlib.contextmanager
def _complete(source: str) -> Iterator[None]:
    """A config without a setting its family reads is a :class:`ConfigError` naming both."""
    try:
        yield
    except KeyError as err:
        raise ConfigError(
            f"a component config of {_name(source)} has no {err.args[0]!r}, which its "
            "family's configs have; is the folder written by save_pretrained?"
        ) from None


def size_rule(alias_or_folder: str | Path) -> SizeRule:
    """The image sizes a model takes: its family's rule on its configs (the rule
    ``Model.check_size`` asks for the loaded pipeline)."""
    source = _resolve(alias_or_folder)
    configs = _configs(source)
    denoiser = _denoiser(source)
    with _complete(source):
        if denoiser is None:
            return Model.size_rule_for(configs)
        return _adapter(source, configs[denoiser], strict=False).size_rule_for(configs)


def latent_geometry(alias_or_folder: str | Path, size: int) -> dict[str, Any]:
    """How an image of ``size`` × ``size`` px enters the denoiser.

    Returns ``vae_scale_factor`` (1 for pixel models), ``latent_channels``, ``latent_size``
    (size / factor), ``multiple`` (the sizes that can be taken are its multiples), ``denoiser``
    and ``denoiser_class``, ``input_shape`` (the denoiser's per-item input: (channels, height,
    width) for UNets and SD3, (tokens, channels) for FLUX's packed latents) and ``tokens`` (image
    tokens for DiTs, else ``None``). Raises :class:`ImageSizeError` (a ``ValueError``) when the
    size cannot be taken: the family's size rule, the one ``Model.check_size`` asks.
    """
    source = _resolve(alias_or_folder)
    configs = _configs(source)
    factor = vae_factor(configs.get("vae"))
    denoiser = _denoiser(source)
    try:  # only for the error message: a folder may give no default size
        native = native_size(source) if denoiser is not None or "vae" in configs else None
    except ConfigError:
        native = None
    rule = size_rule(source)
    rule.check(size, _name(source), native=native)
    latent_size = size // factor
    latent_channels = _latent_channels(source)
    denoiser_class, input_shape, tokens = None, None, None
    if denoiser is not None:
        config = configs[denoiser]
        denoiser_class = config["_class_name"]
        with _complete(source):
            adapter = _adapter(source, config, strict=False)
            input_shape, tokens = adapter.denoiser_input(config, latent_size)
            if latent_channels is None:
                latent_channels = int(config["in_channels"])
    return {
        "image_size": size,
        "vae_scale_factor": factor,
        "latent_channels": latent_channels,
        "latent_size": latent_size,
        "multiple": rule.multiple,
        "denoiser": denoiser,
        "denoiser_class": denoiser_class,
        "input_shape": input_shape,
        "tokens": tokens,
    }


def native_size(alias_or_folder: str | Path) -> int:
    """Default image size: the registry's resolution for aliases; for a folder, what its
    family's adapter reads from the configs (the denoiser's ``sample_size`` times the VAE
    factor; 1024 px for a FLUX folder, whose config has none)."""
    source = _resolve(alias_or_folder)
    if _is_alias(source):
        return registry.resolve(source).resolution
    denoiser = _denoiser(source)
    configs = _configs(source)
    if denoiser is None:
        if "vae" in configs:
            return int(configs["vae"].get("sample_size") or 512)
        raise ConfigError(f"{source!r} has no denoiser or VAE, so no image size applies")
    with _complete(source):
        try:
            return _adapter(source, configs[denoiser], strict=False).native_size_for(configs)
        except ConfigError as err:
            raise ConfigError(f"{_name(source)}: {err}") from None


# ---------------------------------------------------------------------------------------------
# dummy inputs


def _t5_tokens(source: str) -> int:
    denoiser = _denoiser(source)
    if denoiser is None:
        return T5_TOKENS_DEFAULT
    config = component_config(source, denoiser)
    return _adapter(source, config, strict=False).t5_tokens(config) or T5_TOKENS_DEFAULT


def _denoiser_inputs(source: str, denoiser: str, size: int) -> dict[str, Any]:
    config = component_config(source, denoiser)
    geometry = latent_geometry(source, size)
    with _complete(source):
        return _adapter(source, config, strict=True).meta_denoiser_inputs(config, geometry)


def _text_inputs(source: str, component: str) -> dict[str, Any]:
    config = component_config(source, component)
    model_type = config.get("model_type", "")
    if model_type.startswith("t5") or "T5" in config["_class_name"]:
        tokens = _t5_tokens(source)
    else:
        tokens = int(config.get("max_position_embeddings", CLIP_TOKENS))
    return {"input_ids": meta_empty(BATCH, tokens, dtype=torch.long)}


# ---------------------------------------------------------------------------------------------
# shapes


def _per_item(shape: torch.Size) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    return shape[1:] if shape and shape[0] == BATCH else shape


def _describe(value: Any) -> Any:
    """Per-item shape of a tensor, tuple of shapes for a tuple of tensors, ``None`` otherwise."""
    if isinstance(value, torch.Tensor):
        return _per_item(value.shape)
    if isinstance(value, (tuple, list)) and value:
        parts = tuple(_describe(v) for v in value)
        return parts if any(p is not None for p in parts) else None
    return None


def _record(class_name: str, output: Any) -> tuple[tuple, dict[str, tuple]] | None:
    """(default shape, elements) of one module output, or ``None`` when it holds no tensor."""
    if isinstance(output, torch.Tensor):
        return _per_item(output.shape), {}
    if isinstance(output, Mapping):  # ModelOutput / BaseOutput dataclasses
        described = {k: _describe(v) for k, v in output.items()}
        elements = {k: v for k, v in described.items() if v is not None}
        if not elements:
            return None
        return next(iter(elements.values())), elements
    if isinstance(output, (tuple, list)) and output:
        described = [_describe(v) for v in output]
        if all(d is None for d in described):
            return None
        names = element_names(class_name)
        if names is None or len(names) != len(described):
            names = tuple(str(i) for i in range(len(described)))
        elements = {n: d for n, d in zip(names, described, strict=True) if d is not None}
        default = described[element_index(class_name, None, len(described))]
        if default is None:
            default = next(d for d in described if d is not None)
        return default, elements
    return None


def _run_with_hooks(prefix: str, model: torch.nn.Module, run) -> dict[str, SiteShape]:
    first: dict[str, tuple[str, tuple, dict]] = {}
    calls: dict[str, int] = {}
    handles = []

    def hook_for(site: str):
        def hook(module, args, output):
            calls[site] = calls.get(site, 0) + 1
            if site not in first:
                recorded = _record(type(module).__name__, output)
                if recorded is not None:
                    first[site] = (type(module).__name__, *recorded)

        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(hook_for(f"{prefix}.{name}")))
        with torch.no_grad():
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    return {
        site: SiteShape(site, module_class, shape, MappingProxyType(elements), calls[site])
        for site, (module_class, shape, elements) in first.items()
    }


def _component_sites(source: str, component: str, size: int | None) -> dict[str, SiteShape]:
    model = build_component(source, component)
    if component in DENOISERS:
        inputs = _denoiser_inputs(source, component, size)
        return _run_with_hooks(component, model, lambda m: m(**inputs, return_dict=False))
    if component == "vae":
        geometry = latent_geometry(source, size)
        config = component_config(source, "vae")
        image = meta_empty(BATCH, int(config.get("in_channels", 3)), size, size)
        latent = meta_empty(
            BATCH, geometry["latent_channels"], geometry["latent_size"], geometry["latent_size"]
        )

        def run(vae):
            vae.encode(image)
            vae.decode(latent)

        return _run_with_hooks(component, model, run)
    inputs = _text_inputs(source, component)
    return _run_with_hooks(component, model, lambda m: m(**inputs))


def _needs_size(component: str) -> bool:
    return component in DENOISERS or component == "vae"


@functools.lru_cache(maxsize=64)
def _site_shapes_cached(
    source: str, size: int, selected: tuple[str, ...], stamp: tuple
) -> Mapping[str, SiteShape]:
    shapes: dict[str, SiteShape] = {}
    for component in selected:
        shapes.update(_component_sites(source, component, size))
    return MappingProxyType(shapes)


def _stamp(source: str) -> tuple:
    """Changes when a folder's configs change, so the cache never serves stale shapes."""
    if _is_alias(source):
        return ()
    folder = Path(source)
    return tuple(
        (name, (folder / name / "config.json").stat().st_mtime_ns)
        for name in _folder_components(folder)
    )


def site_shapes(
    alias_or_folder: str | Path,
    size: int | None = None,
    components: list[str] | None = None,
) -> dict[str, SiteShape]:
    """Output shape of every named site, found by one forward pass per component on meta tensors.

    ``size`` is the image size in px (default: the model's native size, :func:`native_size`);
    ``components`` restricts the components run (default: all). Sites are the dotted diffusers /
    transformers module paths prefixed by component (``unet.mid_block``,
    ``transformer.transformer_blocks.8``, ``text_encoder.encoder.layers.5``,
    ``vae.encoder.down_blocks.0``) of every submodule that returned a tensor or tuple of tensors.
    Results are cached per (model, size, components).
    """
    source = _resolve(alias_or_folder)
    available = _all_components(source)
    selected = tuple(available if components is None else components)
    unknown = [c for c in selected if c not in available]
    if unknown:
        raise ConfigError(
            f"{source!r} has no component {unknown[0]!r}; it has {', '.join(available)}"
        )
    if size is None:
        size = native_size(source) if any(_needs_size(c) for c in selected) else 0
    elif any(_needs_size(c) for c in selected):
        latent_geometry(source, size)  # raises ImageSizeError naming the size
    return dict(_site_shapes_cached(source, size, selected, _stamp(source)))


def parameter_count(module: torch.nn.Module) -> int:
    """Number of parameters (shared parameters counted once); works on meta modules."""
    return sum(math.prod(p.shape) for p in module.parameters())
