"""Image sizes: the one size rule a model is asked by, and the meta-device dummy tensors.

A family's adapter turns its component configs into a :class:`SizeRule`
(:meth:`diffprobe.models.Model.size_rule_for`); ``Model.check_size`` (a loaded pipeline) and
``diffprobe.models.meta`` (configs only, ``diffprobe sites``) both ask that rule, so a size is
refused, or taken, the same way with the same one-line :class:`ImageSizeError` everywhere.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from diffprobe.errors import DiffprobeError, ImageSizeError

BATCH = 2  # meta-device dummy batch; an axis 0 of this length is the batch axis
CLIP_TOKENS = 77  # every CLIP tokenizer of the supported pipelines pads to 77


class ConfigError(DiffprobeError, ValueError):
    """A model, component or config diffprobe cannot build shapes from."""


@dataclass(frozen=True)
class SizeRule:
    """The square image sizes (px) a model takes: positive multiples of ``multiple``, at most
    ``largest`` px when set.

    ``reasons`` say where the multiple comes from (``("VAE factor 8", "2**3 down-samplings of
    the UNet")``), ``largest_reason`` where the limit does.
    """

    multiple: int
    reasons: tuple[str, ...] = ()
    largest: int | None = None
    largest_reason: str = ""

    def accepts(self, size: Any) -> bool:
        try:
            self.check(size, "")
        except ImageSizeError:
            return False
        return True

    def check(self, size: Any, name: str, native: int | None = None) -> None:
        """Raise :class:`ImageSizeError` (one line naming ``size``, the model ``name``, the rule
        and the nearest sizes that can be taken) unless ``size`` can be taken."""
        multiple = self.multiple
        why = f" ({' × '.join(self.reasons)})" if self.reasons else ""
        at_native = f", native size {native} px" if native else ""
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ImageSizeError(
                f"--size {size!r}: the image size must be a positive integer number of pixels, "
                f"a multiple of {multiple} px for {name}{at_native}"
            )
        if size % multiple:
            lower, upper = size // multiple * multiple, (size // multiple + 1) * multiple
            choices = f"{lower} or {upper}" if lower else f"{upper}"
            raise ImageSizeError(
                f"image size {size} px (--size {size}) cannot be taken by {name}: it must be a "
                f"positive multiple of {multiple} px{why}{at_native}; try {choices}"
            )
        if self.largest is not None and size > self.largest:
            raise ImageSizeError(
                f"image size {size} px (--size {size}) cannot be taken by {name}: "
                f"{self.largest_reason or 'its limit is'} at most {self.largest} px"
                f"{at_native}; try {self.largest} or less"
            )


def vae_factor(vae_config: Mapping[str, Any] | None) -> int:
    """The VAE's down-sampling factor, ``2 ** (levels - 1)`` (what every pipeline calls
    ``vae_scale_factor``); 1 without a VAE (pixel models)."""
    if vae_config is None:
        return 1
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def unet_rule(factor: int, unet_config: Mapping[str, Any], pipeline_multiple: int = 1) -> SizeRule:
    """A UNet halves the latent at every down block but the last, so a size must be a multiple
    of ``factor × 2**(down blocks - 1)`` for its features to have the documented shapes (at
    other sizes it pads and interpolates); ``pipeline_multiple`` is what the pipeline's own
    ``check_inputs`` demands on top (8 for the Stable Diffusion pipelines)."""
    downsamples = len(unet_config["down_block_types"]) - 1
    reasons = [f"VAE factor {factor}"] if factor > 1 else []
    reasons.append(f"2**{downsamples} down-samplings of the UNet")
    multiple = factor * 2**downsamples
    if multiple % pipeline_multiple:
        reasons.append(f"the pipeline's multiple of {pipeline_multiple}")
        multiple = math.lcm(multiple, pipeline_multiple)
    return SizeRule(multiple, tuple(reasons))


def meta_empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor of ``shape`` on the meta device (no memory): a dummy input."""
    return torch.empty(*shape, device="meta", dtype=dtype)
