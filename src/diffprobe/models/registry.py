"""Which adapter class wraps which diffusers pipeline class."""

from __future__ import annotations

from diffprobe.errors import DiffprobeError

ADAPTERS: dict[str, type] = {}  # family -> Model subclass
_BY_PIPELINE: dict[str, type] = {}  # pipeline class name -> Model subclass


def register_adapter(cls: type) -> type:
    ADAPTERS[cls.family] = cls
    for name in cls.pipeline_classes:
        _BY_PIPELINE[name] = cls
    return cls


def adapter_for_pipeline(pipe: object) -> type:
    for klass in type(pipe).__mro__:
        if klass.__name__ in _BY_PIPELINE:
            return _BY_PIPELINE[klass.__name__]
    raise DiffprobeError(
        f"diffprobe has no adapter for {type(pipe).__name__}; supported pipelines: "
        f"{', '.join(sorted(_BY_PIPELINE))}"
    )
