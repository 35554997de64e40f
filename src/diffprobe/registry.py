"""The registries: the families diffprobe wraps, and the aliases of the published models.

**Families.** A family is one adapter class (a :class:`diffprobe.models.Model` subclass, one file
per family in ``diffprobe/models/``), registered with :func:`register_adapter`. The adapter is
the one place that knows its family; everything else asks it: :func:`adapter` (by family name),
:func:`adapter_for_pipeline` (by diffusers pipeline class), :func:`adapter_for_denoiser` (by a
denoiser config, for the meta device), :func:`tuple_elements` (names of block outputs).
``families()`` lists them in registration order.

**Aliases.** Each alias records its family, its hub id, native resolution and prediction type.
``list_models()`` gives them all; ``resolve()`` turns an alias, a hub id or a local diffusers
folder into a :class:`ModelSpec`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from diffprobe.errors import DiffprobeError, UnknownModelError, did_you_mean

ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class ModelSpec:
    """What diffprobe knows about a model before loading it."""

    alias: str | None
    family: str  # sd, sdxl, sd3, flux, if, ddpm
    source: str  # hub id or local folder
    resolution: int
    prediction_type: str  # epsilon, v_prediction, flow
    description: str = ""
    local: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        return asdict(self)


class FamilyError(DiffprobeError, ValueError):
    """An unknown family, or an adapter that clashes with a registered one."""


# ---------------------------------------------------------------------------------- families

_ADAPTERS: dict[str, type] = {}  # family -> adapter class, in registration order
_BY_PIPELINE: dict[str, type] = {}  # diffusers pipeline class name -> adapter class
ADAPTERS: Mapping[str, type] = MappingProxyType(_ADAPTERS)  # read-only view, family -> class


def register_adapter(cls: type) -> type:
    """Register an adapter class (usable as a class decorator).

    Refuses a second adapter for the same family, a pipeline class another family wraps, and a
    block class whose tuple elements another family names differently."""
    if not cls.family:
        raise FamilyError(f"{cls.__name__} names no family (set the class attribute family)")
    if cls.family in _ADAPTERS and _ADAPTERS[cls.family] is not cls:
        raise FamilyError(
            f"family {cls.family!r} is already registered by {_ADAPTERS[cls.family].__name__}; "
            "pick another family name"
        )
    for name in cls.pipeline_classes:
        other = _BY_PIPELINE.get(name)
        if other is not None and other is not cls:
            raise FamilyError(
                f"{cls.__name__} wraps {name}, which {other.__name__} ({other.family}) wraps "
                "already; wrap a subclass of the pipeline instead"
            )
    for block, names in cls.tuple_elements.items():
        known = tuple_elements(block)
        if known is not None and tuple(known) != tuple(names):
            raise FamilyError(
                f"{cls.__name__} names the elements of {block} {tuple(names)}, another family "
                f"{tuple(known)}; one block class has one set of names"
            )
    _ADAPTERS[cls.family] = cls
    for name in cls.pipeline_classes:
        _BY_PIPELINE[name] = cls
    return cls


def unregister_adapter(cls: type) -> None:
    """Remove an adapter registered with :func:`register_adapter` (tests of toy families)."""
    if _ADAPTERS.get(cls.family) is cls:
        del _ADAPTERS[cls.family]
    for name in [n for n, c in _BY_PIPELINE.items() if c is cls]:
        del _BY_PIPELINE[name]


@contextlib.contextmanager
def registered_adapter(cls: type) -> Iterator[type]:
    """Register ``cls`` for the duration of the block, then remove it again."""
    register_adapter(cls)
    try:
        yield cls
    finally:
        unregister_adapter(cls)


def families() -> list[str]:
    """The registered families, in registration order (``sd``, ``sdxl``, ...)."""
    return list(_ADAPTERS)


def adapters() -> list[type]:
    """The registered adapter classes, in registration order."""
    return list(_ADAPTERS.values())


def adapter(family: str) -> type:
    """The adapter class of ``family``; :class:`FamilyError` naming the known ones otherwise."""
    try:
        return _ADAPTERS[family]
    except KeyError:
        close = did_you_mean(str(family), list(_ADAPTERS))
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FamilyError(
            f"unknown family {family!r}.{hint} Registered families: {', '.join(_ADAPTERS)}"
        ) from None


def adapter_for_pipeline(pipe: object) -> type:
    """The adapter of a diffusers pipeline (instance or class), by its class or a base class."""
    klass = pipe if isinstance(pipe, type) else type(pipe)
    for base in klass.__mro__:
        if base.__name__ in _BY_PIPELINE:
            return _BY_PIPELINE[base.__name__]
    raise DiffprobeError(
        f"diffprobe has no adapter for {klass.__name__}; supported pipelines: "
        f"{', '.join(sorted(_BY_PIPELINE))}"
    )


def adapter_for_pipeline_name(name: str) -> type | None:
    """The adapter wrapping the pipeline class called ``name`` (``model_index.json``'s
    ``_class_name``), or None."""
    return _BY_PIPELINE.get(name)


def adapter_for_denoiser(config: Mapping[str, Any], family: str | None = None) -> type | None:
    """The adapter that builds meta-device inputs for a denoiser ``config`` (a dict with
    ``_class_name``): ``family``'s when it claims the config, else the first registered adapter
    that does (:meth:`Model.claims_denoiser`), else None."""
    if family in _ADAPTERS and _ADAPTERS[family].claims_denoiser(config):
        return _ADAPTERS[family]
    return next((cls for cls in _ADAPTERS.values() if cls.claims_denoiser(config)), None)


def tuple_elements(class_name: str) -> tuple[str, ...] | None:
    """Names of the tuple elements a block class returns, as its family's adapter declares
    them (:attr:`Model.tuple_elements`); None for classes no adapter names."""
    for cls in _ADAPTERS.values():
        names = cls.tuple_elements.get(class_name)
        if names is not None:
            return tuple(names)
    return None


# ----------------------------------------------------------------------------------- aliases

_MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.alias is None:
        raise DiffprobeError(f"a registered model needs an alias; {spec.source} has none")
    _MODELS[spec.alias] = spec
    return spec


for _spec in [
    ModelSpec(
        "tiny",
        "sd",
        str(ASSETS / "tiny"),
        64,
        "epsilon",
        "diffprobe's own SD trained on the shapes world (embedded, offline)",
        local=True,
    ),
    ModelSpec(
        "sd1.5",
        "sd",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        512,
        "epsilon",
        "Stable Diffusion 1.5",
    ),
    ModelSpec(
        "sd2.1",
        "sd",
        "stabilityai/stable-diffusion-2-1",
        768,
        "v_prediction",
        "Stable Diffusion 2.1, 768 px, v-prediction",
    ),
    ModelSpec(
        "sd2.1-base",
        "sd",
        "stabilityai/stable-diffusion-2-1-base",
        512,
        "epsilon",
        "Stable Diffusion 2.1 base, 512 px",
    ),
    ModelSpec(
        "sd-turbo",
        "sd",
        "stabilityai/sd-turbo",
        512,
        "epsilon",
        "SD-Turbo (adversarial distillation of SD 2.1), 1-4 steps, no CFG",
    ),
    ModelSpec(
        "sdxl",
        "sdxl",
        "stabilityai/stable-diffusion-xl-base-1.0",
        1024,
        "epsilon",
        "Stable Diffusion XL base 1.0",
    ),
    ModelSpec(
        "sdxl-turbo",
        "sdxl",
        "stabilityai/sdxl-turbo",
        512,
        "epsilon",
        "SDXL-Turbo, 1-4 steps, no CFG",
    ),
    ModelSpec(
        "sd3",
        "sd3",
        "stabilityai/stable-diffusion-3-medium-diffusers",
        1024,
        "flow",
        "Stable Diffusion 3 medium (MMDiT, rectified flow)",
    ),
    ModelSpec(
        "sd3.5",
        "sd3",
        "stabilityai/stable-diffusion-3.5-large",
        1024,
        "flow",
        "Stable Diffusion 3.5 large (MMDiT, rectified flow)",
    ),
    ModelSpec(
        "flux-schnell",
        "flux",
        "black-forest-labs/FLUX.1-schnell",
        1024,
        "flow",
        "FLUX.1 schnell (timestep-distilled, 1-4 steps, no CFG)",
    ),
    ModelSpec(
        "if-i",
        "if",
        "DeepFloyd/IF-I-XL-v1.0",
        64,
        "epsilon",
        "DeepFloyd IF stage I (pixel space, T5-XXL)",
    ),
    ModelSpec(
        "ddpm-celebahq",
        "ddpm",
        "google/ddpm-celebahq-256",
        256,
        "epsilon",
        "pixel DDPM UNet2DModel on CelebA-HQ 256 (the Asyrp setting)",
    ),
    ModelSpec(
        "tiny-ddpm",
        "ddpm",
        str(ASSETS / "tiny-ddpm"),
        32,
        "epsilon",
        "diffprobe's own pixel DDPM (UNet2DModel) on the shapes world, 32 px (embedded, offline)",
        local=True,
    ),
]:
    register_model(_spec)


def list_models() -> list[ModelSpec]:
    """Every registered alias, in registration order."""
    return list(_MODELS.values())


def resolve(name_or_path: str | Path) -> ModelSpec:
    """Turn an alias, a local diffusers folder or a hub id into a :class:`ModelSpec`.

    The family of a folder or hub id is unknown until it is loaded (``family="auto"``).
    """
    name = str(name_or_path)
    if name in _MODELS:
        return _MODELS[name]
    if not name.strip():
        raise UnknownModelError(
            f"--model {name!r} names no model; give an alias (`diffprobe models` lists them: "
            f"{', '.join(_MODELS)}), a hub id ('org/name') or a local diffusers folder"
        )
    path = Path(name).expanduser()
    if path.exists():
        _check_pipeline_folder(name, path)
        return ModelSpec(None, "auto", str(path.resolve()), 0, "auto", local=True)
    if _looks_like_path(name):
        raise UnknownModelError(
            f"no such folder: '{name}' ({path.absolute()} does not exist); pass an existing "
            "diffusers pipeline folder, an alias or a hub id ('org/name')"
        )
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ModelSpec(None, "auto", name, 0, "auto")
    close = did_you_mean(name, list(_MODELS))
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model '{name}'.{hint} Known aliases: {', '.join(_MODELS)}. "
        "Also accepted: a hub id ('org/name') or a local diffusers folder. "
        "`diffprobe models` lists the aliases."
    )


def _looks_like_path(name: str) -> bool:
    """A name a hub id cannot be: it starts like a path, or has more than one '/'."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _check_pipeline_folder(name: str, path: Path) -> None:
    """Raise :class:`UnknownModelError` unless ``path`` is a folder with a readable
    ``model_index.json`` naming a pipeline class (what ``save_pretrained`` writes)."""
    how = "pass a folder written by `pipeline.save_pretrained(...)`"
    if not path.is_dir():
        raise UnknownModelError(
            f"'{name}' is a file, not a diffusers pipeline folder; {how}, an alias or a hub id"
        )
    index = path / "model_index.json"
    if not index.is_file():
        raise UnknownModelError(
            f"'{name}' is a path but not a diffusers pipeline folder (no model_index.json "
            f"in it); {how}"
        )
    try:
        config = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UnknownModelError(
            f"'{name}': its model_index.json cannot be read as JSON ({type(err).__name__}: "
            f"{err}); {how}"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
        raise UnknownModelError(
            f"'{name}': its model_index.json names no pipeline class (no _class_name); {how}"
        )
