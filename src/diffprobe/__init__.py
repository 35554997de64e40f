"""diffprobe: look inside diffusion models.

>>> import diffprobe
>>> model = diffprobe.load("tiny")
>>> images, cache = model.run_with_cache("a red circle in the top left", "unet.*_block*", steps=10)
>>> cache["unet.mid_block", "cond"].shape     # (denoiser calls, items, channels, height, width)
"""

from diffprobe.errors import DiffprobeError
from diffprobe.extract.store import Run, open_run
from diffprobe.hooks.engine import (
    Ablate,
    Add,
    Apply,
    Cache,
    CallState,
    Clamp,
    Edit,
    NoiseWindow,
    Patch,
    Record,
    Replace,
    Scale,
    SiteEdit,
    StopForward,
    TimestepWindow,
    capture,
    edit,
)
from diffprobe.loading import from_pipeline, load
from diffprobe.models import Conditioning, Model
from diffprobe.registry import ModelSpec, list_models

__version__ = "0.1.0"

__all__ = [
    "Ablate",
    "Add",
    "Apply",
    "Cache",
    "CallState",
    "Clamp",
    "Conditioning",
    "DiffprobeError",
    "Edit",
    "Model",
    "ModelSpec",
    "NoiseWindow",
    "Patch",
    "Record",
    "Replace",
    "Scale",
    "SiteEdit",
    "StopForward",
    "TimestepWindow",
    "capture",
    "edit",
    "from_pipeline",
    "list_models",
    "load",
    "open_run",
    "Run",
]
