"""``diffprobe.load``: an alias, hub id or local folder -> a :class:`~diffprobe.models.Model`."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from diffprobe.errors import ModelLoadError
from diffprobe.models import Model, adapter_for_pipeline
from diffprobe.registry import ModelSpec, resolve

log = logging.getLogger(__name__)

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


def _dtype_keyword() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (0.36+); use what the installed one takes."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    except ImportError:
        return "torch_dtype"


@contextlib.contextmanager
def _no_image_processor_fallback_warning():
    """Without torchvision, transformers warns (once per process, at import) that its CLIP and
    SigLIP image processors fall back to PIL. diffusers imports them with every Stable Diffusion
    pipeline, diffprobe never uses them, and the warning says nothing about the user's model, so
    it is held back while a pipeline loads; every other transformers message still shows."""
    logger = logging.getLogger("transformers.utils.import_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _from_pretrained(spec: ModelSpec, name: str, kwargs: dict[str, Any]) -> Any:
    """The diffusers pipeline of ``spec``: a local folder, or the hub (its cache first)."""
    from diffusers import DiffusionPipeline

    if spec.local:
        folder = Path(spec.source)
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"'{name}': no diffusers pipeline at {folder} (model_index.json missing)"
                + (" — run `diffprobe train-tiny` to rebuild it" if spec.alias == "tiny" else "")
            )
        return DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    try:
        # the cache first: no network round trip when the weights are already here
        return DiffusionPipeline.from_pretrained(spec.source, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        try:
            return DiffusionPipeline.from_pretrained(spec.source, **kwargs)
        except Exception as err:  # noqa: BLE001 - hub errors come in many types
            raise _hub_failure(spec, name, err) from None


def from_pipeline(pipe: Any, spec: ModelSpec | None = None, name: str | None = None) -> Model:
    """Wrap an already built diffusers pipeline."""
    return adapter_for_pipeline(pipe)(pipe, spec, name)


def _hub_failure(spec: ModelSpec, name: str, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = (
        "offline mode is on (HF_HUB_OFFLINE) and it is not in the local cache"
        if offline
        else (f"the hub could not be reached or refused access ({type(err).__name__})")
    )
    return ModelLoadError(
        f"could not load '{name}' from the Hugging Face hub ({spec.source}): {why}. "
        f"Log in (`hf auth login`), accept the licence at https://huggingface.co/{spec.source} "
        "if it is gated, or pass a local diffusers folder: diffprobe.load('/path/to/folder')."
    )


def load(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    **pipeline_kwargs: Any,
) -> Model:
    """Load a model by alias (``diffprobe models`` lists them), hub id or local folder.

    ``dtype`` defaults to float32 (the safe choice on CPU); ``device`` to CPU.
    """
    name = str(name_or_path)
    spec = resolve(name)
    torch_dtype = parse_dtype(dtype) or torch.float32
    kwargs = {_dtype_keyword(): torch_dtype, **pipeline_kwargs}
    if spec.family in ("sd",) and spec.alias not in (None, "tiny"):
        kwargs.setdefault("safety_checker", None)
        kwargs.setdefault("requires_safety_checker", False)
    with _no_image_processor_fallback_warning():
        pipe = _from_pretrained(spec, name, kwargs)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return from_pipeline(pipe, spec, spec.alias or name)
