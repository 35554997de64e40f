"""Tiny seeded components for tests, built offline (the sizes diffusers' own tests use).

One module per family (``diffprobe.testing.sd``, ``.sdxl``, ``.sd3``, ``.flux``,
``.deepfloyd_if``, ``.ddpm``) builds its random pipeline (``dummy_<family>_pipeline()``) and
registers it for its adapter (:func:`~diffprobe.testing.cases.register_dummies`), so the
conformance suite runs on every registered family: ``dummy_cases()`` lists them. Shared parts:
``dummy_clip_tokenizer()`` / ``dummy_clip_text_config()`` (:mod:`~diffprobe.testing.clip`) and
``dummy_t5_tokenizer()`` / ``dummy_t5_encoder()`` (:mod:`~diffprobe.testing.t5`). Importing
this package registers every family's dummies.
"""

from importlib import import_module

from diffprobe.testing.cases import (
    DummyCase,
    dummies,
    dummy_cases,
    plain_generate,
    register_dummies,
    registered_dummies,
)
from diffprobe.testing.clip import CLIP_TEXT, dummy_clip_text_config, dummy_clip_tokenizer
from diffprobe.testing.sd import SD_SCHEDULE, dummy_sd_components, dummy_sd_pipeline, dummy_vae

# one module per family, registered in the adapters' order
for _name in ("sdxl", "sd3", "flux", "deepfloyd_if", "ddpm"):
    import_module(f"diffprobe.testing.{_name}")

__all__ = [
    "CLIP_TEXT",
    "SD_SCHEDULE",
    "DummyCase",
    "dummies",
    "dummy_cases",
    "dummy_clip_text_config",
    "dummy_clip_tokenizer",
    "dummy_sd_components",
    "dummy_sd_pipeline",
    "dummy_vae",
    "plain_generate",
    "register_dummies",
    "registered_dummies",
]
