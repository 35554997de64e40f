"""Which adapter class wraps which family and pipeline class (kept in :mod:`diffprobe.registry`,
which the hook engine can import without the adapters)."""

from __future__ import annotations

from diffprobe.registry import (
    ADAPTERS,
    FamilyError,
    adapter,
    adapter_for_denoiser,
    adapter_for_pipeline,
    adapters,
    families,
    register_adapter,
    registered_adapter,
    unregister_adapter,
)

__all__ = [
    "ADAPTERS",
    "FamilyError",
    "adapter",
    "adapter_for_denoiser",
    "adapter_for_pipeline",
    "adapters",
    "families",
    "register_adapter",
    "registered_adapter",
    "unregister_adapter",
]
