"""diffprobe: look inside diffusion models.

>>> import diffprobe
>>> model = diffprobe.load("tiny")
>>> with diffprobe.capture(model, ["unet.mid_block"]) as cache:
...     model.generate("a red circle in the top left", steps=10)
>>> cache.stack("unet.mid_block", branch="cond").shape
"""

from diffprobe.errors import DiffprobeError
from diffprobe.extract.store import Run, open_run
from diffprobe.hooks.engine import Cache, CallState, Edit, Record, StopForward, capture, edit
from diffprobe.loading import from_pipeline, load
from diffprobe.models import Conditioning, Model
from diffprobe.registry import ModelSpec, list_models

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "CallState",
    "Conditioning",
    "DiffprobeError",
    "Edit",
    "Model",
    "ModelSpec",
    "Record",
    "StopForward",
    "capture",
    "edit",
    "from_pipeline",
    "list_models",
    "load",
    "open_run",
    "Run",
]
