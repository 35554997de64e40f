"""Model adapters, one file per diffusers family. Importing this package registers them.

Adding a family is one adapter file and its dummy components:

1. ``diffprobe/models/<family>.py``: a :class:`Model` subclass decorated with
   ``@register_adapter`` that sets ``family``, ``pipeline_classes``, ``denoiser_name``,
   ``denoiser_classes``, ``default_guidance_scale``, ``tuple_elements``, ``default_encoder``,
   implements ``encode_images``, ``_encode_prompt``, ``encode_text``, ``denoiser_kwargs``, and
   overrides the classmethods whose base versions do not fit (``size_rule_for``,
   ``meta_denoiser_inputs``, ``t5_tokens``, ``text_towers``, ...); add its name to the list
   below.
2. ``diffprobe/testing/<family>.py``: its tiny seeded pipeline and
   ``register_dummies(family, DummyCase(...), scheduler=...)``; add it to
   ``diffprobe/testing/__init__.py``.

``tests/test_conformance.py`` then runs the whole contract on it (its toy family shows both
steps in one file).
"""

from importlib import import_module

from diffprobe.models.base import Conditioning, Model, TextEncoding, item_noise, item_seed
from diffprobe.models.geometry import SizeRule
from diffprobe.models.registry import ADAPTERS, adapter, adapter_for_pipeline, families
from diffprobe.models.towers import Tower

# one module per family; a family whose module is missing is simply not registered
for _name in ("sd", "sdxl", "sd3", "flux", "deepfloyd_if", "ddpm"):
    try:
        import_module(f"diffprobe.models.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"diffprobe.models.{_name}":
            raise

__all__ = [
    "ADAPTERS",
    "Conditioning",
    "Model",
    "SizeRule",
    "TextEncoding",
    "Tower",
    "adapter",
    "adapter_for_pipeline",
    "families",
    "item_noise",
    "item_seed",
]
