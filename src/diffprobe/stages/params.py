"""The parameters of every stage ``diffprobe run`` drives, as pydantic models: what a YAML
experiment spec may write under ``model:``, ``data:`` and each entry of ``stages:``
(docs/runner.md). Unknown keys are refused (``extra="forbid"``) so a typo is never ignored.

Each model's fields mirror the keyword arguments of the library function the stage calls
(:mod:`diffprobe.stages.steps`), with the same defaults as the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _path_exists(value: str | None, what: str) -> str | None:
    if value is not None and not Path(value).expanduser().exists():
        raise ValueError(f"{what} {value!r} does not exist")
    return value


# ----------------------------------------------------------------------------- model and data


class ModelSpec(Params):
    """The model every stage that needs one loads (once per process)."""

    name: str = Field("tiny", description="alias (`diffprobe models`), hub id or local folder")
    dtype: str = "fp32"
    device: str = "cpu"

    @field_validator("name")
    @classmethod
    def _local_folder(cls, value: str) -> str:
        if value.startswith((".", "/", "~")):
            _path_exists(value, "model folder")
        return value


class ShapesThings(Params):
    """The shapes world exported in the THINGS layout into ``RUN/data`` (the ``data`` stage)."""

    images_per_concept: int = Field(12, ge=1)
    n_train: int = Field(36_000, ge=1)
    n_test: int = Field(4_000, ge=1)
    seed: int = Field(0, ge=0)


class DataSpec(Params):
    """The items of the study. ``source``: an image folder, a THINGS root, ``shapes:N[:SEED]``
    or ``things`` (the THINGS root below); ``things``: a THINGS root (odd-one-out triplets for
    ``align``); ``shapes_things``: export the shapes world in the THINGS layout and use it as
    both; ``prompts``: a prompt file (one per line) for generation stages."""

    source: str | None = None
    things: str | None = None
    shapes_things: ShapesThings | None = None
    prompts: str | None = None
    on_error: Literal["skip", "fail"] = "fail"

    @field_validator("things", "prompts")
    @classmethod
    def _exists(cls, value: str | None, info) -> str | None:
        if info.field_name == "prompts" and value is not None and value.startswith("shapes:"):
            return value  # shapes-world captions
        return _path_exists(value, info.field_name)

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: str | None) -> str | None:
        if value is None or value == "things" or value.startswith("shapes:"):
            return value
        return _path_exists(value, "data source")


# ----------------------------------------------------------------------------- stages


class NoParams(Params):
    pass


class SitesParams(Params):
    """Site names and shapes of a (full-size) model on the meta device, no weights."""

    model: str = "sd1.5"
    size: int = Field(512, ge=8)
    components: list[str] = ["unet"]


class CaptureParams(Params):
    """One generation with the spec's model, capturing ``sites`` at every denoiser call."""

    sites: list[str]
    caption: str = "a small red circle in the top left"
    steps: int = Field(20, ge=1)
    guidance_scale: float = 5.0
    seed: int = 0


class SamplesParams(Params):
    """A captioned grid of generated images for ``n`` held-out shapes-world captions."""

    n: int = Field(16, ge=1)
    steps: int = Field(25, ge=1)
    guidance_scale: float = 5.0
    seed: int = 0


class ConditionParams(Params):
    """One conditioning of an extraction (``diffprobe.extract.Condition``)."""

    name: str
    kind: Literal["empty", "template", "captions", "prompt"] = "empty"
    template: str | None = None
    guidance_scale: float = 1.0


class ExtractParams(Params):
    """The grid engine (``diffprobe extract``): sharded by chunks of ``chunk_items`` items."""

    sites: list[str] = Field(min_length=1)
    noise_levels: list[float] | None = None
    timesteps: list[float] | None = None
    conditions: list[ConditionParams] = [ConditionParams(name="empty")]
    pooling: Literal["none", "mean", "max"] = "mean"
    seed: int = Field(0, ge=0)
    image_size: int | None = None
    chunk_items: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)
    store_dtype: Literal["float32", "float16"] = "float32"
    batch_invariant: bool = False
    data: str | None = Field(None, description="items of this extraction (default: data.source)")
    captions: str | None = None


class BestStudy(Params):
    """The demo's study of the best (site, noise level) of each condition: a linear probe and a
    ridge regression onto the shapes world's factors, ``folds`` folds over objects, and the
    reductions compared where the run is unpooled."""

    folds: int = Field(5, ge=2)


class ProbeParams(Params):
    triplets: str = "train"
    reduction: str = "mean"
    folds: int = Field(3, ge=2)
    max_epochs: int = Field(500, ge=1)
    patience: int = Field(50, ge=1)
    seed: int = 0


class RegressParams(Params):
    target: str = "shapes-factors"
    triplets: str = "test"
    reduction: str = "mean"
    folds: int = Field(5, ge=2)
    metric: Literal["cosine", "euclidean", "dot"] = "cosine"
    seed: int = 0


class AlignParams(Params):
    """Odd-one-out alignment of an extract stage's run (``diffprobe align``), optionally its
    linear probes (``probe``), ridge regressions (``regress``) and the demo's best-array study."""

    input: str = "extract"
    triplets: str = "test"
    metrics: list[Literal["cosine", "euclidean", "dot"]] = ["cosine"]
    pca: int | None = None
    reductions: list[str] | None = None
    sites: list[str] | None = None
    noises: list[str] | None = None
    conditions: list[str] | None = None
    cka: bool = True
    probe: ProbeParams | None = None
    regress: RegressParams | None = None
    best: BestStudy | None = None


class AnomaliesParams(Params):
    """Position probes, corner ratios, high-norm tokens and similarity maps of an unpooled run
    (``diffprobe anomalies``)."""

    input: str = "extract"
    sites: list[str] | None = None
    noises: list[str] | None = None
    conditions: list[str] | None = None
    grid: str | None = None
    binnings: list[int] = [2, 4, 8, 16, 32]
    test_fraction: float = Field(0.5, gt=0, lt=1)
    threshold: float = 2.0
    group: int = Field(2, ge=1)
    reference: Literal["mean", "median"] = "mean"
    corner: bool = True
    corner_size: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    plots: bool = True
    seed: int = 0


class LensParams(Params):
    """The Diffusion Lens (``diffprobe lens``): one image per text-encoder layer and seed."""

    prompt: str
    layers: str = "all"
    seeds: list[int] = [0]
    steps: int = Field(25, ge=1)
    guidance_scale: float | None = None
    encoder: str | None = None
    pad: Literal["keep", "full"] = "keep"
    norm: Literal["pipeline", "final"] = "pipeline"
    pooled: Literal["full", "lens"] = "full"
    size: int | None = None
    batch_size: int = Field(8, ge=1)


class SAETrainParams(Params):
    """A TopK SAE on an unpooled run's tokens at one site (``diffprobe sae train``)."""

    input: str = "extract"
    site: str
    noise: list[str] | None = None
    condition: str | None = None
    expansion: int = Field(16, ge=1)
    k: int = Field(32, ge=1)
    lr: float = 4e-4
    batch_size: int = Field(4096, ge=1)
    epochs: int = Field(1, ge=1)
    tokens: int | None = None
    normalization: Literal["none", "layer_norm"] = "none"
    seed: int = 0
    device: str = "auto"


class SAEEvalParams(Params):
    """FVU, L0 and dead fraction of a trained SAE on its run (``diffprobe sae eval``)."""

    input: str = "sae_train"
    tokens: int | None = None
    batch_size: int = Field(4096, ge=1)
    device: str = "auto"


class FeaturesCaptureParams(Params):
    """Activity of channels over the denoising timesteps of generation (``diffprobe features
    capture``): sharded by chunks of ``chunk_items`` (prompt, seed) items."""

    sites: list[str] = Field(min_length=1)
    prompts: str | None = Field(None, description="prompt file or shapes:N (default: data.prompts)")
    seeds: list[int] = [0]
    steps: int = Field(25, ge=1)
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    reductions: list[Literal["mean", "max"]] = ["mean"]
    branches: Literal["cond", "uncond", "both"] = "cond"
    size: int | None = None
    chunk_items: int = Field(16, ge=1)
    batch_size: int = Field(8, ge=1)
    store_dtype: Literal["float32", "float16"] = "float32"


class FeaturesAnalyseParams(Params):
    """Per-channel activity over timesteps, active timesteps, peaks and top examples of a
    features_capture stage (``diffprobe features analyse``)."""

    input: str = "features_capture"
    sites: list[str] | None = None
    branch: str | None = None
    top_k: int = Field(20, ge=1)
    examples: int = Field(9, ge=1)
    windows: list[tuple[float, float]] = []
    profile: Literal["frequency", "mean", "max"] = "frequency"
    threshold: float = 0.0
    peak_height: float = 0.0
    peak_distance: int = Field(100, ge=1)
    peak_count: int = Field(3, ge=1)
    plot_channels: int = Field(8, ge=0)


class DreamParams(Params):
    """Deep dream of channels (or, with ``sae``, the latents of a sae_train stage) at a site
    (``diffprobe dream``; the loop's defaults are the thesis')."""

    site: str
    targets: list[int] = Field(min_length=1)
    timesteps: list[float] = [500.0]
    seeds: list[int] = [0]
    sae: str | None = Field(None, description="a sae_train stage: dream its latents")
    steps: int = Field(100, ge=1)
    lr: float = 0.05
    tv: float = 0.5
    renoise: bool = True
    spectral: bool = True
    prompt: str = ""
    batch_size: int = Field(16, ge=1)
    size: int | None = None


class AttributionParams(Params):
    """Cross-attention attribution maps of generated prompts (``diffprobe attribution``)."""

    prompts: list[str] = Field(min_length=1)
    words: list[str] | None = None
    seed: int = 0
    steps: int = Field(25, ge=1)
    guidance_scale: float | None = None
    size: int | None = None
    layers: list[str] | None = None
    timesteps: list[str] | None = None
    store: bool = False
    masks: Literal["reader"] | None = None
    threshold: float = Field(0.4, gt=0, lt=1)


class ReportParams(Params):
    """One self-contained HTML report of the run folder (``diffprobe report``)."""

    title: str | None = None


def dumped(params: BaseModel) -> dict[str, Any]:
    """The parameters as plain JSON values (what a stage's hash is computed over)."""
    return params.model_dump(mode="json")


class SteerParams(Params):
    """Steering of channels at a site during generation (``diffprobe steer``); with ``prior``
    the thesis' prior stage (empty prompt, no CFG, its five seeds, × 50 max activation)."""

    site: str
    channels: list[int] = Field(min_length=1)
    input: str | None = Field(
        None,
        description="a features_analyse stage (for relative strengths and active/peaks windows)",
    )
    mode: Literal["add", "scale", "clamp"] = "add"
    strength: float | None = None
    relative: float | None = None
    window: str = "all"
    branch: str | None = None
    prompts: list[str] = [""]
    seeds: list[int] = [0]
    steps: int = Field(25, ge=1)
    guidance_scale: float | None = None
    size: int | None = None
    prior: bool = False


class HSpaceParams(Params):
    """h-space editing (``diffprobe hspace train`` then ``hspace eval``): a Δh from ``source``
    to ``target`` colour, learned (conv, transformer, free) or training-free (mean-difference,
    pca), evaluated over a strength sweep."""

    source: str
    target: str
    method: Literal["conv", "transformer", "free", "mean-difference", "pca"] = "conv"
    items: int = Field(16, ge=1)
    eval_items: int = Field(16, ge=1)
    strengths: list[float] = [-2.0, -1.0, 0.0, 1.0, 2.0]
    steps: int = Field(40, ge=2)
    clip: str = "tiny-clip"
    seed: int = 0
