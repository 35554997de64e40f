"""Deep dream, the lucid way: objectives × parameterisation × transforms × render loop.

    from diffprobe.interventions import dream

    objective = dream.channel("unet.up_blocks.1", [3, 7], timestep=0) \\
        - 0.5 * dream.total_variation() - 0.5 * dream.range_penalty(3.0)
    init = dream.noise_init(dream.input_shape(model), seeds=[0, 0])
    result = dream.render(model, objective, init, steps=100)   # result.images, result.stats

Parts: :mod:`.objectives` (what is maximised), :mod:`.param` (z, its start, decoding),
:mod:`.transforms` (jitter, rotate, scale, renoise; gradient filters), :mod:`.render` (the
loop and :func:`measure`). The defaults are the thesis' (see docs/dream.md).
"""

from diffprobe.interventions.dream.objectives import (
    DreamError,
    Leaf,
    Objective,
    Step,
    channel,
    direction,
    moment,
    neuron,
    range_penalty,
    sae_feature,
    total_variation,
)
from diffprobe.interventions.dream.param import decode, input_shape, load_prior, noise_init
from diffprobe.interventions.dream.render import Dream, check_timestep, measure, render
from diffprobe.interventions.dream.transforms import (
    Affine,
    Draw,
    GaussianBlur,
    Jitter,
    Renoise,
    Spectral,
    affine,
    default_filters,
    default_transforms,
    rotate,
    scale,
)


def thesis_objective(activation: Objective, sae: bool = False) -> Objective:
    """``activation`` minus the thesis' penalties: TV 0.5, range 0.5 (threshold 3), moment 0
    for raw channels; for SAE features TV 0 and moment 0.5."""
    penalties = 0.5 * range_penalty(3.0)
    penalties = penalties + (0.5 * moment() if sae else 0.5 * total_variation())
    return activation - penalties


__all__ = [
    "Affine",
    "Draw",
    "Dream",
    "DreamError",
    "GaussianBlur",
    "Jitter",
    "Leaf",
    "Objective",
    "Renoise",
    "Spectral",
    "Step",
    "affine",
    "channel",
    "check_timestep",
    "decode",
    "default_filters",
    "default_transforms",
    "direction",
    "input_shape",
    "load_prior",
    "measure",
    "moment",
    "neuron",
    "noise_init",
    "range_penalty",
    "render",
    "rotate",
    "sae_feature",
    "scale",
    "thesis_objective",
    "total_variation",
]
