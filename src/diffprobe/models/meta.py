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

Dummy inputs (batch axis removed in what is reported):

- ``UNet2DConditionModel``: ``sample`` (latent channels, size/f, size/f) where f is the VAE factor
  (1 for pixel models), a timestep, ``encoder_hidden_states`` of 77 tokens
  (``encoder_hid_dim`` wide when set, as for IF's T5 states, else ``cross_attention_dim``), SDXL's
  ``added_cond_kwargs`` (``text_embeds`` and 6 ``time_ids``) when ``addition_embed_type`` is
  ``"text_time"``.
- ``UNet2DModel``: ``sample`` and a timestep.
- ``SD3Transformer2DModel``: latent ``hidden_states``, 333 text tokens (77 CLIP + 256 T5, the
  pipeline's default ``max_sequence_length``), ``pooled_projections``, a timestep.
- ``FluxTransformer2DModel``: packed ``hidden_states`` of (size/f/2)² tokens of 4 × latent channels,
  ``img_ids``, ``txt_ids``, 256 T5 tokens (FLUX.1-schnell's maximum; 512 when the model has guidance
  embeddings, as FLUX.1-dev), ``guidance`` only when ``guidance_embeds`` is set.
- CLIP text encoders: 77 tokens. T5 encoders: 77 tokens next to a UNet (IF), 256 next to a DiT
  (SD3, FLUX.1-schnell), 512 next to a guidance-distilled FLUX.
- VAE: ``vae.encode`` on an image (3, size, size) and ``vae.decode`` on a latent, so sites are
  ``vae.encoder.*``, ``vae.quant_conv``, ``vae.post_quant_conv`` and ``vae.decoder.*``.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from diffprobe.errors import DiffprobeError, ImageSizeError
from diffprobe.hooks.elements import TUPLE_ELEMENTS, element_index

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"

# Image size (px) each alias was trained at; the default of site_shapes and the CLI.
NATIVE_SIZE: dict[str, int] = {
    "sd1.5": 512,
    "sd2.1": 768,
    "sd2.1-base": 512,
    "sd-turbo": 512,
    "sdxl": 1024,
    "sdxl-turbo": 512,
    "sd3": 1024,
    "sd3.5": 1024,
    "flux-schnell": 1024,
    "if-i": 64,
    "ddpm-celebahq": 256,
}


class ConfigError(DiffprobeError, ValueError):
    """A model, component or config diffprobe cannot build shapes from."""


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

BATCH = 2  # dummy batch; an axis 0 of this length is the batch axis and is removed
CLIP_TOKENS = 77
T5_TOKENS_UNET = 77  # DeepFloyd IF
T5_TOKENS_DIT = 256  # SD3 pipeline default max_sequence_length; FLUX.1-schnell maximum
T5_TOKENS_FLUX_GUIDED = 512  # FLUX.1-dev


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
    config = json.loads(_read_config(str(path), path.stat().st_mtime_ns))
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


def _vae_factor(source: str) -> tuple[int, int | None]:
    """(VAE scale factor, latent channels); (1, None) for pixel models."""
    if "vae" not in components(source):
        return 1, None
    vae = component_config(source, "vae")
    return 2 ** (len(vae["block_out_channels"]) - 1), int(vae["latent_channels"])


def latent_geometry(alias_or_folder: str | Path, size: int) -> dict[str, Any]:
    """How an image of ``size`` × ``size`` px enters the denoiser.

    Returns ``vae_scale_factor`` (1 for pixel models), ``latent_channels``, ``latent_size``
    (size / factor), ``multiple`` (the sizes that can be taken are its multiples), ``denoiser``
    and ``denoiser_class``, ``input_shape`` (the denoiser's per-item input: (channels, height,
    width) for UNets and SD3, (tokens, channels) for FLUX's packed latents) and ``tokens`` (image
    tokens for DiTs, else ``None``). Raises :class:`ImageSizeError` (a ``ValueError``) when the
    size cannot be taken.
    """
    source = _resolve(alias_or_folder)
    name = source if _is_alias(source) else repr(source)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ImageSizeError(
            f"--size {size!r}: the image size must be a positive integer number of pixels"
        )
    factor, latent_channels = _vae_factor(source)
    why = [f"VAE factor {factor}"] if latent_channels is not None else []
    multiple = factor
    denoiser = _denoiser(source)
    denoiser_class, input_shape, tokens, max_size = None, None, None, None
    if denoiser is not None:
        config = component_config(source, denoiser)
        denoiser_class = config["_class_name"]
        in_channels = int(config["in_channels"])
        if denoiser == "unet":
            downsamples = len(config["down_block_types"]) - 1
            multiple = factor * 2**downsamples
            why.append(f"2**{downsamples} down-samplings of the UNet")
        elif denoiser_class == "FluxTransformer2DModel":
            patch = int(config.get("patch_size", 1))
            multiple = factor * 2 * patch
            why.append("2×2 latent packing" + (f" and patch size {patch}" if patch > 1 else ""))
        else:
            patch = int(config.get("patch_size", 1))
            multiple = factor * patch
            why.append(f"patch size {patch}")
            if config.get("pos_embed_max_size"):
                max_size = int(config["pos_embed_max_size"]) * patch * factor
        if latent_channels is None:
            latent_channels = in_channels
    if size % multiple:
        lower, upper = size // multiple * multiple, (size // multiple + 1) * multiple
        choices = f"{lower} or {upper}" if lower else f"{upper}"
        raise ImageSizeError(
            f"image size {size} px cannot be taken by {name}: it must be a multiple of "
            f"{multiple} px ({' × '.join(why)}); try {choices}"
        )
    if max_size is not None and size > max_size:
        raise ImageSizeError(
            f"image size {size} px cannot be taken by {name}: its position embedding covers at "
            f"most {max_size} px (pos_embed_max_size {config['pos_embed_max_size']})"
        )
    latent_size = size // factor
    if denoiser_class == "FluxTransformer2DModel":
        tokens = (latent_size // 2) ** 2
        input_shape = (tokens, int(component_config(source, denoiser)["in_channels"]))
    elif denoiser is not None:
        input_shape = (in_channels, latent_size, latent_size)
        if denoiser == "transformer":
            tokens = (latent_size // patch) ** 2
    return {
        "image_size": size,
        "vae_scale_factor": factor,
        "latent_channels": latent_channels,
        "latent_size": latent_size,
        "multiple": multiple,
        "denoiser": denoiser,
        "denoiser_class": denoiser_class,
        "input_shape": input_shape,
        "tokens": tokens,
    }


def native_size(alias_or_folder: str | Path) -> int:
    """Default image size: :data:`NATIVE_SIZE` for aliases; for a folder, the denoiser's
    ``sample_size`` times the VAE factor, or 1024 px for a FLUX folder (its config has none)."""
    source = _resolve(alias_or_folder)
    if source in NATIVE_SIZE:
        return NATIVE_SIZE[source]
    denoiser = _denoiser(source)
    if denoiser is None:
        if "vae" in components(source):
            return int(component_config(source, "vae").get("sample_size") or 512)
        raise ConfigError(f"{source!r} has no denoiser or VAE, so no image size applies")
    sample_size = component_config(source, denoiser).get("sample_size")
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    if sample_size is None:
        return 1024
    return int(sample_size) * _vae_factor(source)[0]


# ---------------------------------------------------------------------------------------------
# dummy inputs


def _empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def _t5_tokens(source: str) -> int:
    denoiser = _denoiser(source)
    if denoiser is None:
        return T5_TOKENS_DIT
    config = component_config(source, denoiser)
    if denoiser == "unet":
        return T5_TOKENS_UNET
    if config["_class_name"] == "FluxTransformer2DModel" and config.get("guidance_embeds"):
        return T5_TOKENS_FLUX_GUIDED
    return T5_TOKENS_DIT


def _unet_condition_inputs(config: dict, geometry: dict) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "sample": _empty(BATCH, *geometry["input_shape"]),
        "timestep": _empty(BATCH),
    }
    width = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    if isinstance(width, (list, tuple)):
        width = width[0]
    inputs["encoder_hidden_states"] = _empty(BATCH, CLIP_TOKENS, int(width))
    addition = config.get("addition_embed_type")
    if addition == "text_time":
        time_ids = 6  # original size, crop top-left, target size
        text_embeds = (
            config["projection_class_embeddings_input_dim"]
            - time_ids * config["addition_time_embed_dim"]
        )
        inputs["added_cond_kwargs"] = {
            "text_embeds": _empty(BATCH, text_embeds),
            "time_ids": _empty(BATCH, time_ids),
        }
    elif addition not in (None, "text"):
        raise ConfigError(
            f"cannot make dummy inputs for a UNet with addition_embed_type {addition!r}; "
            "supported: None, 'text' (IF), 'text_time' (SDXL)"
        )
    inputs.update(_class_label_inputs(config))
    if config.get("time_cond_proj_dim"):
        inputs["timestep_cond"] = _empty(BATCH, int(config["time_cond_proj_dim"]))
    return inputs


def _class_label_inputs(config: dict) -> dict[str, Any]:
    kind = config.get("class_embed_type")
    if kind == "projection":
        return {"class_labels": _empty(BATCH, int(config["projection_class_embeddings_input_dim"]))}
    if kind == "timestep":
        return {"class_labels": _empty(BATCH)}
    if kind is None and config.get("num_class_embeds"):
        return {"class_labels": _empty(BATCH, dtype=torch.long)}
    if kind not in (None, "identity"):
        raise ConfigError(f"cannot make dummy inputs for class_embed_type {kind!r}")
    return {}


def _denoiser_inputs(source: str, denoiser: str, size: int) -> dict[str, Any]:
    config = component_config(source, denoiser)
    geometry = latent_geometry(source, size)
    cls = config["_class_name"]
    if cls == "UNet2DConditionModel":
        return _unet_condition_inputs(config, geometry)
    if cls == "UNet2DModel":
        return {
            "sample": _empty(BATCH, *geometry["input_shape"]),
            "timestep": _empty(BATCH),
            **_class_label_inputs(config),
        }
    if cls == "SD3Transformer2DModel":
        return {
            "hidden_states": _empty(BATCH, *geometry["input_shape"]),
            "encoder_hidden_states": _empty(
                BATCH, CLIP_TOKENS + T5_TOKENS_DIT, int(config["joint_attention_dim"])
            ),
            "pooled_projections": _empty(BATCH, int(config["pooled_projection_dim"])),
            "timestep": _empty(BATCH),
        }
    if cls == "FluxTransformer2DModel":
        text_tokens = _t5_tokens(source)
        inputs = {
            "hidden_states": _empty(BATCH, *geometry["input_shape"]),
            "encoder_hidden_states": _empty(BATCH, text_tokens, int(config["joint_attention_dim"])),
            "pooled_projections": _empty(BATCH, int(config["pooled_projection_dim"])),
            "timestep": _empty(BATCH),
            "img_ids": _empty(geometry["tokens"], 3),
            "txt_ids": _empty(text_tokens, 3),
        }
        if config.get("guidance_embeds"):
            inputs["guidance"] = _empty(BATCH)
        return inputs
    raise ConfigError(f"cannot make dummy inputs for denoiser class {cls!r}")


def _text_inputs(source: str, component: str) -> dict[str, Any]:
    config = component_config(source, component)
    model_type = config.get("model_type", "")
    if model_type.startswith("t5") or "T5" in config["_class_name"]:
        tokens = _t5_tokens(source)
    else:
        tokens = int(config.get("max_position_embeddings", CLIP_TOKENS))
    return {"input_ids": _empty(BATCH, tokens, dtype=torch.long)}


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
        names = TUPLE_ELEMENTS.get(class_name)
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
        image = _empty(BATCH, int(config.get("in_channels", 3)), size, size)
        latent = _empty(
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

    ``size`` is the image size in px (default: the model's native size, :data:`NATIVE_SIZE`);
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
