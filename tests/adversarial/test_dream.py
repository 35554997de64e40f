"""``diffprobe dream`` fed what users really type wrong: exit 2, one line naming the input,
no traceback, nothing created. Cases past the option checks load ``tiny`` (about 1 s)."""

from __future__ import annotations

import json

import pytest

DREAM = ["dream", "--model", "tiny", "--site", "unet.up_blocks.1", "--out", "dreams"]


def dream(*args: str) -> list[str]:
    extra = list(args)
    target = (
        [] if any(a in extra for a in ("--channel", "--feature", "--sae")) else ["--channel", "0"]
    )
    return [*DREAM, *target, "--steps", "1", *extra]


CASES = {
    "channel out of range": (dream("--channel", "64"), ["64", "out of range", "0 to 63"]),
    "one channel of many out of range": (dream("--channel", "3,700"), ["700", "0 to 63"]),
    "negative channel": (dream("--channel", "-1"), ["--channel", ">= 0"]),
    "channel not a number": (dream("--channel", "red"), ["--channel", "red"]),
    "channel twice": (dream("--channel", "3,3"), ["3", "twice"]),
    "timestep past the schedule": (dream("--timesteps", "1000"), ["1000", "outside", "0..999"]),
    "negative timestep": (dream("--timesteps", "-5"), ["-5", "outside"]),
    "fractional timestep": (dream("--timesteps", "2.5"), ["2.5", "integer"]),
    "timestep not a number": (dream("--timesteps", "zero"), ["--timesteps", "zero"]),
    "timesteps empty": (dream("--timesteps", ""), ["--timesteps"]),
    "peaks without a file": (dream("--timesteps", "0,peaks"), ["peaks", "--peaks FILE"]),
    "peaks file missing": (
        dream("--timesteps", "peaks", "--peaks", "nope.json"),
        ["--peaks", "nope.json"],
    ),
    "site in the VAE": (
        dream("--site", "vae.decoder.mid_block"),
        ["vae.decoder.mid_block", "denoiser pass"],
    ),
    "site unknown": (dream("--site", "unet.midblock"), ["unet.midblock", "mid_block"]),
    "neither channel nor feature": (
        [*DREAM, "--steps", "1"],
        ["--channel", "--feature"],
    ),
    "feature without an SAE": (dream("--feature", "3"), ["--feature", "--sae"]),
    "SAE folder missing": (dream("--sae", "nosae", "--feature", "3"), ["nosae"]),
    "zero steps": (dream("--steps", "0"), ["--steps", "0"]),
    "negative learning rate": (dream("--lr", "-1"), ["--lr", "-1"]),
    "nan tv weight": (dream("--tv", "nan"), ["--tv", "nan"]),
    "zoom below one": (dream("--scale", "0.5"), ["--scale", "0.5"]),
    "zero snapshot interval": (dream("--snapshot-every", "0"), ["--snapshot-every"]),
    "prior missing": (dream("--prior", "p.safetensors"), ["--prior", "p.safetensors"]),
    "misspelled model": (
        ["dream", "--model", "tiny2", "--site", "unet.mid_block", "--channel", "0"],
        ["tiny2", "tiny"],
    ),
}


@pytest.mark.parametrize(
    ("args", "names"), [pytest.param(a, n, id=k) for k, (a, n) in CASES.items()]
)
def test_dream_refuses(refused, args, names):
    refused(args, names)


def test_dream_refuses_a_bad_peaks_file_and_a_foreign_folder(sandbox, refused):
    (sandbox / "work" / "peaks.json").write_text(json.dumps({"0": ["high"]}))
    refused(dream("--timesteps", "peaks", "--peaks", "peaks.json"), ["peaks.json", "target 0"])
    (sandbox / "work" / "dreams").mkdir()
    (sandbox / "work" / "dreams" / "notes.txt").write_text("mine")
    refused(dream(), ["dreams", "did not write"])


@pytest.mark.slow
def test_dream_writes_its_folder(sandbox, cli):
    (sandbox / "work" / "peaks.json").write_text(json.dumps({"5": [300]}))
    outcome = cli(*DREAM, "--channel", "2,5", "--timesteps", "0,peaks", "--peaks",
                  "peaks.json", "--seeds", "0,1", "--steps", "2", "--snapshot-every", "1",
                  "--quiet")  # fmt: skip
    assert outcome.code == 0, outcome.err
    out = sandbox / "work" / "dreams"
    info = json.loads((out / "dream.json").read_text())
    assert info["targets"] == [2, 5] and info["timesteps"] == {"2": [0.0], "5": [0.0, 300.0]}
    assert len(info["summary"]) == 2 * 2 + 2
    for leaf in ("channel_0002/timestep_0000", "channel_0005/timestep_0300"):
        folder = out / leaf
        for name in ("seed_0.png", "seed_1.png", "latents.safetensors", "stats.json",
                     "stats.csv", "snapshots/seed_1_step_0002.png"):  # fmt: skip
            assert (folder / name).is_file(), name
        stats = json.loads((folder / "stats.json").read_text())
        assert len(stats) == 2 * 2 and {"total", "total_variation"} <= set(stats[0])
    assert (out / "channel_0005" / "grid.png").is_file()
    # --overwrite clears diffprobe's earlier dream output before writing the new one
    again = cli(*DREAM, "--channel", "2", "--steps", "1", "--quiet", "--overwrite")
    assert again.code == 0, again.err
    assert not (out / "channel_0005").exists()


@pytest.fixture
def sae_folders(sandbox):
    """A random SAELens-layout SAE of tiny's ``unet.up_blocks.1`` (64 channels), and one of
    the wrong width."""
    from diffprobe.sae import TopKSAE, save_sae

    save_sae(TopKSAE(64, 96, 8, seed=0), sandbox / "work" / "sae")
    save_sae(TopKSAE(32, 96, 8, seed=0), sandbox / "work" / "sae32")
    return sandbox


def test_dream_refuses_bad_sae_features(sae_folders, refused):
    refused(dream("--sae", "sae", "--feature", "96"), ["96", "0 to 95"])
    refused(dream("--sae", "sae32", "--feature", "3"), ["32", "64"])
    refused(dream("--sae", "sae", "--channel", "3"), ["--sae", "--feature"])


@pytest.mark.slow
def test_dream_of_sae_features_writes_its_folder(sae_folders, cli):
    outcome = cli(*DREAM, "--sae", "sae", "--feature", "7,40", "--steps", "2", "--quiet")
    assert outcome.code == 0, outcome.err
    info = json.loads((sae_folders / "work" / "dreams" / "dream.json").read_text())
    # the thesis' SAE settings: no TV, moment 0.5, no blur
    assert info["kind"] == "feature" and info["settings"]["tv"] == 0
    assert info["settings"]["moment"] == 0.5 and info["settings"]["sigma"] == 0
    assert "sae_feature" in info["leaves"][0] and "moment" in info["leaves"]
    assert (sae_folders / "work" / "dreams" / "feature_00040" / "grid.png").is_file()
