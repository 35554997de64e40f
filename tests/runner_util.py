"""Helpers of the runner tests: a tiny spec (embedded `tiny`, 8 shapes items in 4 chunks, an
SAE on top) and the comparison of two run folders."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]

TINY_SPEC = """\
name: tiny-test
model: {name: tiny}
data: {source: "shapes:8:0"}
stages:
  sites: {model: sd1.5, size: 64, components: [unet]}
  extract:
    sites: [unet.mid_block]
    noise_levels: [0.1, 0.5]
    pooling: none
    chunk_items: 2
    batch_size: 2
  sae_train:
    site: unet.mid_block
    expansion: 2
    k: 4
    batch_size: 32
    device: cpu
  sae_eval: {device: cpu}
"""


def write_spec(folder: Path, text: str = TINY_SPEC, name: str = "spec.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def env(**extra: str) -> dict:
    values = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1", **extra}  # fmt: skip
    return values


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffprobe", *args]


def arrays(run: Path) -> dict[str, np.ndarray]:
    """Every array of an extract stage's store, by path."""
    from diffprobe.extract.store import open_run

    opened = open_run(run)
    return {"/".join(k): np.asarray(opened.array(*k)[:]) for k in opened.keys()}


def results(root: Path) -> dict:
    """What a tiny run computed: the store's arrays, the SAE's tensors, the evaluation."""
    from safetensors.numpy import load_file

    found = {f"extract/{k}": v for k, v in arrays(root / "extract").items()}
    for path in sorted((root / "sae_train").glob("*.safetensors")):
        for key, value in load_file(path).items():
            found[f"sae/{path.name}/{key}"] = value
    evaluation = json.loads((root / "sae_eval" / "evaluation.json").read_text())
    found["eval"] = np.array([evaluation["fvu"], evaluation["l0"]])
    return found


def assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert np.array_equal(a[key], b[key]), f"{key} differs"


def done_markers(root: Path) -> dict[str, str]:
    """Stage done markers (their text: hash, finish time) by stage."""
    return {p.name.split(".")[0]: p.read_text() for p in (root / "markers").glob("*.done.json")}


def chunk_stamps(root: Path) -> dict[str, int]:
    """The extract stage's chunk markers and their modification times (a recomputed chunk
    rewrites its marker)."""
    return {p.name: p.stat().st_mtime_ns for p in (root / "extract" / "progress").glob("*.done")}
