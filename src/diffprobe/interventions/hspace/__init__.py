"""h-space editing (Asyrp, Kwon et al. ICLR 2023) on any diffusers UNet through a hook on
``mid_block``: DDIM inversion, the asymmetric reverse process, Δh sources (learned f_t, free,
PCA, mean difference, file) and their training with a directional CLIP loss. See
docs/hspace.md for the maths and the measured results."""

from diffprobe.interventions.hspace.deltas import (
    ConstantDelta,
    DeltaBlock,
    FreeDelta,
    HSpaceError,
    TransformerDelta,
    build_delta,
    load_delta,
    mean_difference,
    pca_directions,
    save_delta,
)
from diffprobe.interventions.hspace.process import (
    HSpaceEdit,
    asymmetric_step,
    ddim_invert,
    decode,
    h_shape,
    mid_block,
    sample,
    schedule,
)

__all__ = [
    "ConstantDelta",
    "DeltaBlock",
    "FreeDelta",
    "HSpaceEdit",
    "HSpaceError",
    "TransformerDelta",
    "asymmetric_step",
    "build_delta",
    "ddim_invert",
    "decode",
    "h_shape",
    "load_delta",
    "mean_difference",
    "mid_block",
    "pca_directions",
    "sample",
    "save_delta",
    "schedule",
]
