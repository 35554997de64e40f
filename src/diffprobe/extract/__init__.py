"""Extraction: the grid engine (items × noise levels × conditions -> one denoiser pass each) and
the store it fills (zarr v3, docs/store.md).

>>> from diffprobe.extract import Condition, ExtractionPlan, extract, open_run
"""

from diffprobe.extract.engine import EXTRACT_KIND, extract, extract_arrays
from diffprobe.extract.plan import Condition, ExtractionError, ExtractionPlan
from diffprobe.extract.store import Run, StoreError, open_run

__all__ = [
    "EXTRACT_KIND",
    "Condition",
    "ExtractionError",
    "ExtractionPlan",
    "Run",
    "StoreError",
    "extract",
    "extract_arrays",
    "open_run",
]
