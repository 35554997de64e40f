"""``diffprobe sae train | eval | info`` fed bad SAE files and options (issue 19): a checkpoint
whose d_in does not match the site, an unknown layout, a damaged safetensors file, k > d_sae,
and the generation options. Each is refused with exit 2, one line naming the input, and
nothing is created or changed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.fixture
def files(sandbox):
    """~/work/sae (SAELens layout, d_in 12), ~/work/acts12.npy, ~/work/acts8.npy and broken
    folders beside them."""
    from diffprobe.sae import TopKSAE, save_sae

    work = sandbox / "work"
    save_sae(TopKSAE(12, 24, 4, seed=0, metadata={"site": "unet.mid_block"}), work / "sae")
    rng = np.random.default_rng(0)
    np.save(work / "acts12.npy", rng.standard_normal((512, 12)).astype(np.float32))
    np.save(work / "acts8.npy", rng.standard_normal((512, 8)).astype(np.float32))
    (work / "unknown").mkdir()
    (work / "unknown" / "weights.bin").write_bytes(b"\0" * 64)
    (work / "notes.txt").write_text("not an SAE\n")
    corrupt = work / "corrupt"
    corrupt.mkdir()
    (corrupt / "cfg.json").write_text((work / "sae" / "cfg.json").read_text())
    data = (work / "sae" / "sae_weights.safetensors").read_bytes()
    (corrupt / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    big_k = work / "bigk"
    big_k.mkdir()
    cfg = json.loads((work / "sae" / "cfg.json").read_text())
    (big_k / "cfg.json").write_text(json.dumps({**cfg, "k": 100}))
    (big_k / "sae_weights.safetensors").write_bytes(data)
    return work


ACTS12 = ["--activations", "acts12.npy"]
TRAIN = ["sae", "train", "--out", "new", "--device", "cpu", "--quiet"]
GEN = ["--model", "tiny", "--site", "unet.up_blocks.1", "--steps", "1"]

CASES = {
    "d_in of the checkpoint differs from the activations": (
        ["sae", "eval", "sae", "--activations", "acts8.npy", "--quiet"],
        ["12", "8"],
    ),
    "unknown layout": (["sae", "info", "unknown"], ["unknown", "cfg.json"]),
    "a file, not an SAE folder": (["sae", "info", "notes.txt"], ["notes.txt"]),
    "missing folder": (["sae", "info", "nowhere"], ["nowhere"]),
    "layout not one of the three": (["sae", "info", "sae", "--layout", "lens"], ["lens"]),
    "layout that does not match the files": (
        ["sae", "info", "sae", "--layout", "openai"],
        ["openai"],
    ),
    "corrupt safetensors": (["sae", "info", "corrupt"], ["sae_weights.safetensors"]),
    "k larger than d_sae in the file": (["sae", "info", "bigk"], ["100", "24"]),
    "k larger than d_sae in training": (
        [*TRAIN, *ACTS12, "--expansion", "1", "--k", "100", "--batch-size", "256"],
        ["100", "12"],
    ),
    "zero k": ([*TRAIN, *ACTS12, "--k", "0"], ["k"]),
    "two activation sources": (
        [*TRAIN, *ACTS12, *GEN, "--prompts", "shapes:2"],
        ["--run", "--activations", "--model"],
    ),
    "model without prompts": ([*TRAIN, *GEN], ["--prompts"]),
    "model without site": (
        [*TRAIN, "--model", "tiny", "--prompts", "shapes:2"],
        ["--site"],
    ),
    "zero shapes prompts": ([*TRAIN, *GEN, "--prompts", "shapes:0"], ["shapes:0"]),
    "prompts file missing": ([*TRAIN, *GEN, "--prompts", "prompts.txt"], ["prompts.txt"]),
    "unknown site semantics": (
        [*TRAIN, *GEN, "--prompts", "shapes:2", "--site-semantics", "diff"],
        ["diff", "output"],
    ),
    "unknown branch": ([*TRAIN, *GEN, "--prompts", "shapes:2", "--branch", "both2"], ["both2"]),
    "zero steps": (
        [
            "sae",
            "train",
            "--out",
            "new",
            "--model",
            "tiny",
            "--site",
            "unet.up_blocks.1",
            "--prompts",
            "shapes:2",
            "--steps",
            "0",
            "--quiet",
        ],
        ["--steps"],
    ),  # fmt: skip
    "splice without a model": (["sae", "eval", "sae", *ACTS12, "--splice"], ["--splice"]),
    "d_in of the checkpoint differs from the generated site": (
        ["sae", "eval", "sae", *GEN, "--prompts", "shapes:1", "--quiet"],
        ["12", "64", "unet.up_blocks.1"],
    ),
}


SLOW = {"d_in of the checkpoint differs from the generated site"}  # loads tiny, generates


@pytest.mark.parametrize(
    ("args", "names"),
    [pytest.param(*case, id=name, marks=[pytest.mark.slow] if name in SLOW else [])
     for name, case in CASES.items()],
)  # fmt: skip
def test_sae_refuses(files, refused, args, names):
    torch.set_num_threads(1)
    refused(args, names)
