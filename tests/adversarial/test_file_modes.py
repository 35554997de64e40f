"""Every file diffprobe writes is readable by colleagues on a shared cluster: 0644 files and
0755 folders under the usual umask 022, for every writing command (issue 16). The fixtures'
THINGS export and runs count too: they are written by the same code."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest


def modes(root: Path) -> dict[str, int]:
    """{relative path: permission bits} of every entry under ``root``, itself included."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return found


def wrong(root: Path, itself: bool = True) -> dict[str, str]:
    return {
        name: oct(mode)
        for name, mode in modes(root).items()
        if mode != (0o755 if (root / name).is_dir() else 0o644) and (itself or name != ".")
    }


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.slow
def test_every_written_file_is_0644(umask_022, cli, sandbox, things_root, run_dir,
                                    spatial_run_dir):  # fmt: skip
    work = sandbox / "work"
    commands = [
        ["align", run_dir, "--things", things_root, "--out", "aligned", "-q"],
        ["probe", run_dir, "--things", things_root, "--out", "probed", "--max-epochs", "5", "-q"],
        ["regress", run_dir, "--things", things_root, "--target", "shapes-factors", "--out",
         "regressed", "-q"],
        ["anomalies", spatial_run_dir, "--no-corner", "--out", "anomalies", "-q"],
        ["extract", "--model", "tiny", "--data", "shapes:4", "--sites", "unet.mid_block",
         "--noise", "0.1", "--out", "extracted", "-q"],
        ["lens", "--model", "tiny", "--prompt", "a red circle", "--layers", "0,-1", "--steps",
         "2", "--out", "lensed", "-q"],
        ["attribution", "--model", "tiny", "--prompt", "a red circle", "--steps", "2",
         "--store", "--masks", "reader", "--out", "attributed", "-q"],
    ]  # fmt: skip
    for command in commands:
        outcome = cli(*command)
        assert outcome.code == 0, (command, outcome.err)
    # pytest made the export's folder itself (0700), diffprobe everything in it
    assert wrong(things_root, itself=False) == {}
    for root in [run_dir, spatial_run_dir] + [work / c[c.index("--out") + 1] for c in commands]:
        assert len(modes(root)) > 2, root
        assert wrong(root) == {}, root


def test_save_pretrained_and_safetensors_files_are_0644(umask_022, tmp_path):
    """safetensors' ``save_file`` (and so ``save_pretrained``) makes its files 0600; the tiny-model
    recipes' exported pipelines and the reader's weights must come out 0644 all the same."""
    import torch
    from safetensors.torch import save_file

    from diffprobe.io import atomic_path
    from diffprobe.train.ddpm import DDPMConfig, train_tiny_ddpm

    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    assert stat.S_IMODE((tmp_path / "plain.safetensors").stat().st_mode) == 0o600  # the cause
    with atomic_path(tmp_path / "ours" / "weights.safetensors") as temporary:
        save_file({"a": torch.zeros(1)}, str(temporary))
    assert wrong(tmp_path / "ours") == {}
    out = tmp_path / "ddpm"
    train_tiny_ddpm(out, config=DDPMConfig.small(), progress=False)
    assert len(modes(out / "pipeline")) > 4
    assert wrong(out) == {}
