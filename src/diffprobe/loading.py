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
from diffprobe.registry import ModelSpec, adapter, families, resolve

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
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(
            f"--dtype {dtype!r} is not a dtype diffprobe loads models in; use one of "
            f"{', '.join(_DTYPES)}"
        ) from None


class DeviceError(ModelLoadError):
    """A device torch does not know, or one this machine does not have."""


def available_devices() -> list[str]:
    """The devices this machine has: ``cpu``, then ``cuda:0`` ..., ``mps``, ``xpu:0`` ..."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found += [f"xpu:{i}" for i in range(xpu.device_count())]
    return found


def parse_device(device: str | torch.device | None) -> torch.device | None:
    """``"cuda:1"`` -> ``torch.device("cuda:1")``, refused with :class:`DeviceError` (naming the
    devices this machine has) unless the device is here; None stays None."""
    if device is None:
        return None
    here = available_devices()
    hint = f"the devices available here: {', '.join(here)}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(
            f"--device {str(device)!r} is not a device torch knows; use one of {hint}"
        ) from None
    if parsed.type == "cpu":
        return parsed
    present = [d for d in here if d.split(":")[0] == parsed.type]
    if parsed.type == "mps":
        ok = bool(present) and parsed.index in (None, 0)
    else:
        ok = bool(present) and (parsed.index is None or f"{parsed.type}:{parsed.index}" in here)
    if not ok:
        what = "no such device" if present else f"no {parsed.type} device"
        raise DeviceError(f"--device {str(device)!r}: this machine has {what}; use one of {hint}")
    return parsed


def _dtype_keyword() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (0.36+); use what the installed one takes."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    except ImportError:
        return "torch_dtype"


@contextlib.contextmanager
def _quiet_loading():
    """Loading says nothing a user needs while a pipeline is built: diffusers' "Loading pipeline
    components" bar and transformers' "Loading weights" bars (repeated through every command) are
    off, and so are diffusers' "Couldn't connect to the Hub ... will try the local cache"
    warnings (a failed hub load ends in diffprobe's own error, which says what to do). Without
    torchvision, transformers also warns once per process that its CLIP and SigLIP image
    processors fall back to PIL; diffusers imports them with every Stable Diffusion pipeline
    and diffprobe never uses them, so that is held back too. Errors still show."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    image_logger = logging.getLogger("transformers.utils.import_utils")
    image_level = image_logger.level
    bars = diffusers_logging.is_progress_bar_enabled()
    weight_bars = transformers_logging.is_progress_bar_enabled()
    verbosity = diffusers_logging.get_verbosity()
    image_logger.setLevel(logging.ERROR)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # its "Loading weights" bar, once per component
    diffusers_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        image_logger.setLevel(image_level)
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            diffusers_logging.enable_progress_bar()
        if weight_bars:
            transformers_logging.enable_progress_bar()


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
    torch_dtype = parse_dtype(dtype) or torch.float32
    parse_device(device)  # a missing device fails before the weights are read
    spec = resolve(name)
    kwargs = {_dtype_keyword(): torch_dtype, **pipeline_kwargs}
    if spec.family in families():  # a registered alias: its family's loading options
        kwargs = {**adapter(spec.family).load_kwargs(spec), **kwargs}
    with _quiet_loading():
        pipe = _from_pretrained(spec, name, kwargs)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return from_pipeline(pipe, spec, spec.alias or name)
