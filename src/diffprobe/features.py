"""Monosemantic features, part 1: activity of channels (or SAE latents) over denoising
timesteps, top examples, and steering (docs/features.md). The public facade::

    import diffprobe
    from diffprobe import features

    model = diffprobe.load("tiny")
    plan = features.ActivityPlan(sites=["unet.mid_block"], seeds=[0, 1], steps=10,
                                 guidance_scale=5.0)
    run = features.open_activity(features.capture_activity(model, "shapes:16", plan, "runs/act"))
    activity = run.get("unet.mid_block")            # (items, timesteps, channels), branch cond
    frequency = features.topk_frequency(activity, k=20)          # (channels, timesteps)
    features.analyse_activity(run, "runs/act-analysis")          # tables, JSON, CSV, plots
    images = features.steer(model, "", features.Steer("unet.mid_block", channel=3, strength=8.0),
                            seed=[0, 1], steps=10, guidance_scale=1.0)

The layers: capture in :mod:`diffprobe.extract.generation`, maths in
:mod:`diffprobe.analysis.activity`, plots in :mod:`diffprobe.report.features`, steering in
:mod:`diffprobe.interventions.steer`, folders in :mod:`diffprobe.stages.features`.
"""

from diffprobe.analysis.activity import (
    active_timesteps,
    activity_peaks,
    interpolate_profile,
    nearest_steps,
    selectivity_auc,
    strength_schedule,
    timestep_stats,
    top_examples,
    topk_frequency,
    window_mask,
    window_score,
)
from diffprobe.extract.generation import (
    ACTIVITY_FORMAT,
    ACTIVITY_KIND,
    ActivityError,
    ActivityPlan,
    ActivityRun,
    Prompts,
    array_name,
    capture_activity,
    generate_batch,
    open_activity,
    read_prompts,
    reducer,
    tokens_of,
)
from diffprobe.hooks.edits import TimestepProfile, TimestepSet, TimestepWindow
from diffprobe.interventions.steer import (
    STEER_MODES,
    THESIS_SCALE,
    THESIS_SCALE_SAE,
    THESIS_SEEDS,
    Steer,
    SteerError,
    steer,
)
from diffprobe.stages.features import (
    Analysis,
    FeaturesError,
    analyse_activity,
    parse_windows,
    resolve_steer,
    steer_to_folder,
)

__all__ = [
    "ACTIVITY_FORMAT",
    "ACTIVITY_KIND",
    "STEER_MODES",
    "THESIS_SCALE",
    "THESIS_SCALE_SAE",
    "THESIS_SEEDS",
    "ActivityError",
    "ActivityPlan",
    "ActivityRun",
    "Analysis",
    "FeaturesError",
    "Prompts",
    "Steer",
    "SteerError",
    "TimestepProfile",
    "TimestepSet",
    "TimestepWindow",
    "active_timesteps",
    "activity_peaks",
    "analyse_activity",
    "array_name",
    "capture_activity",
    "generate_batch",
    "interpolate_profile",
    "nearest_steps",
    "open_activity",
    "parse_windows",
    "read_prompts",
    "reducer",
    "resolve_steer",
    "selectivity_auc",
    "steer",
    "steer_to_folder",
    "strength_schedule",
    "timestep_stats",
    "tokens_of",
    "top_examples",
    "topk_frequency",
    "window_mask",
    "window_score",
]
