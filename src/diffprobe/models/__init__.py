"""Model adapters, one file per diffusers family. Importing this package registers them."""

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
