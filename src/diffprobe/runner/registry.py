"""The stages ``diffprobe run`` knows: one entry each. Adding a stage is one entry here: its
name, its parameters (a pydantic model), the stages it reads (``depends_on``: parameter name ->
stage kind) and the library function it calls (``"module:function"``, taking a
:class:`~diffprobe.stages.steps.StageContext` and the parameters). The runner has no logic of
its own for any stage.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel

from diffprobe.stages import params as p


@dataclass(frozen=True)
class StageKind:
    name: str
    params: type[BaseModel]
    call: str
    """``"module:function"`` of the library function that does the work."""
    depends_on: dict[str, str] = field(default_factory=dict)
    """Parameter naming another stage of the spec -> the kind that stage must be."""
    uses: tuple[str, ...] = ("model", "data")
    """Parts of the spec besides its parameters that its results depend on (hashed)."""
    sharded: bool = False
    """Split into shards (``--shard i/n``, torchrun ranks, SLURM array tasks)."""
    units: str | None = None
    """``"module:function"`` giving (units in all, units done) for ``--dry-run``."""
    requires: str | None = None
    """A module the stage needs beyond its own (an optional stage is refused without it)."""
    last: bool = False
    """Reads every other stage of the spec (a report): runs after them, redone when any is."""
    help: str = ""

    def function(self) -> Callable:
        return _resolve(self.call)

    def available(self) -> bool:
        """Whether this diffprobe has the module the stage needs (optional stages)."""
        try:
            return importlib.util.find_spec(self.requires or self.call.split(":")[0]) is not None
        except ImportError:
            return False


def _resolve(reference: str) -> Callable:
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


S = "diffprobe.stages.steps:"
STAGES: dict[str, StageKind] = {
    kind.name: kind
    for kind in [
        StageKind("data", p.NoParams, S + "prepare_data", uses=("data",),
                  help="export the shapes world in the THINGS layout (data.shapes_things)"),
        StageKind("models", p.NoParams, S + "list_models", uses=(),
                  help="print the registered models"),
        StageKind("sites", p.SitesParams, S + "sites", uses=(),
                  help="site names and shapes of a model on the meta device"),
        StageKind("capture", p.CaptureParams, S + "capture", uses=("model",),
                  help="one generation with sites captured at every call"),
        StageKind("samples", p.SamplesParams, S + "samples", uses=("model",),
                  help="a captioned grid of generated images"),
        StageKind("extract", p.ExtractParams, S + "extract", sharded=True,
                  units=S + "extract_units", help="the grid engine into a store (sharded)"),
        StageKind("align", p.AlignParams, S + "align", {"input": "extract"}, uses=("data",),
                  help="odd-one-out alignment, probes, regressions, reductions"),
        StageKind("anomalies", p.AnomaliesParams, S + "anomalies", {"input": "extract"},
                  help="position probes, corner ratios, high-norm tokens"),
        StageKind("lens", p.LensParams, S + "lens", uses=("model",),
                  help="the Diffusion Lens"),
        StageKind("sae_train", p.SAETrainParams, S + "sae_train", {"input": "extract"}, uses=(),
                  help="a TopK SAE on a run's tokens"),
        StageKind("sae_eval", p.SAEEvalParams, S + "sae_eval", {"input": "sae_train"}, uses=(),
                  help="FVU, L0, dead fraction of a trained SAE"),
        # optional: available where their module is (features, steer, dream, h-space, attribution,
        # report)
        StageKind("features_capture", p.FeaturesCaptureParams, S + "features_capture",
                  uses=("model", "data"), sharded=True, requires="diffprobe.features",
                  help="channel activity over timesteps during generation (sharded)"),
        StageKind("features_analyse", p.FeaturesAnalyseParams, S + "features_analyse",
                  {"input": "features_capture"}, uses=(), requires="diffprobe.features",
                  help="active timesteps, peaks, top examples per channel"),
        StageKind("dream", p.DreamParams, S + "dream", {"sae": "sae_train"}, uses=("model",),
                  requires="diffprobe.stages.dream",
                  help="deep dream of channels or SAE latents"),
        StageKind("steer", p.SteerParams, S + "steer", {"input": "features_analyse"},
                  uses=("model",), requires="diffprobe.features",
                  help="steered generations per channel (prior: the thesis' prior stage)"),
        StageKind("hspace", p.HSpaceParams, S + "hspace", uses=("model",),
                  requires="diffprobe.stages.hspace",
                  help="h-space editing: a learned or training-free delta h, evaluated"),
        StageKind("attribution", p.AttributionParams, S + "attribution", uses=("model",),
                  requires="diffprobe.stages.attribution_run",
                  help="per-word cross-attention maps"),
        StageKind("report", p.ReportParams, S + "report", uses=(), last=True,
                  requires="diffprobe.report.build",
                  help="one self-contained HTML report of every stage"),
    ]
}  # fmt: skip
