"""Full-size pipelines with random weights, built from the configs shipped with diffprobe.

Random weights have exactly the FLOPs and memory of the published models, so these measure
speed honestly (never quality). Every component is built from its shipped config
(:func:`diffprobe.models.meta.build_component`), the family's adapter assembles its pipeline
(:meth:`diffprobe.models.Model.assemble`), tokenizers are diffprobe's offline stand-ins (their
ids are in range of the real vocabularies) and schedulers use the published settings each
family's testing module registers.
"""

from __future__ import annotations

from typing import Any

import torch

from diffprobe import registry
from diffprobe.models import meta
from diffprobe.models.towers import tokenizer_of
from diffprobe.testing.cases import dummies
from diffprobe.testing.clip import dummy_clip_tokenizer
from diffprobe.testing.t5 import dummy_t5_tokenizer


def random_pipeline(
    alias: str, device: str = "cpu", dtype: torch.dtype = torch.float32, t5: bool = False
) -> Any:
    """A pipeline of ``alias``'s architecture with random weights on ``device`` (``"meta"``
    builds it without memory, to read its layout).

    Text encoders the family's pipeline can run without (SD3's T5-XXL, 4.7 B parameters and
    irrelevant to denoiser speed) are left out unless ``t5=True``; the pipeline then feeds
    zeros in their place, as diffusers does without them.
    """
    family = registry.resolve(alias).family
    adapter = registry.adapter(family)
    components: dict[str, Any] = {}
    for name in meta.components(alias):
        if name in adapter.optional_text_encoders and not t5:
            components[name] = components[tokenizer_of(name)] = None
            continue
        components[name] = meta.build_component(alias, name, device=device, dtype=dtype)
        if name.startswith("text_encoder"):
            is_t5 = "T5" in type(components[name]).__name__
            components[tokenizer_of(name)] = (
                dummy_t5_tokenizer() if is_t5 else dummy_clip_tokenizer()
            )
    components["scheduler"] = dummies(family).scheduler(alias)
    pipe = adapter.assemble(components)
    pipe.set_progress_bar_config(disable=True)
    return pipe
