"""``diffprobe run SPEC.yaml``: one experiment spec drives every stage, resumably, on a laptop,
under ``torchrun`` or on a SLURM cluster (docs/runner.md).

>>> from diffprobe.runner import load_spec, run
"""

from diffprobe.runner.api import run
from diffprobe.runner.registry import STAGES, StageKind
from diffprobe.runner.spec import ExperimentSpec, SpecError, load_spec

__all__ = ["STAGES", "ExperimentSpec", "SpecError", "StageKind", "load_spec", "run"]
