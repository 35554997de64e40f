"""The feature commands as a researcher runs them on ``tiny``: capture -> analyse -> steer
--prior (the thesis' stages), with the files each promises."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.mark.slow
def test_capture_analyse_and_prior_on_tiny(tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    from diffprobe import features
    from diffprobe.cli import main

    monkeypatch.chdir(tmp_path)
    main(["features", "capture", "--model", "tiny", "--prompts", "shapes:3", "--seeds", "0,1",
          "--sites", "unet.mid_block", "--steps", "3", "--guidance", "4", "--reduce", "mean,max",
          "--out", "run", "--quiet"])  # fmt: skip
    run = features.open_activity("run")
    assert run.get("unet.mid_block").shape == (6, 3, 128) and run.branches == ["cond"]
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 6
    main(["features", "analyse", "run", "--top-k", "8", "--examples", "2", "--peak-distance",
          "50", "--plot-channels", "1", "--quiet"])  # fmt: skip
    analysis = features.Analysis("run-analysis")
    peaks = json.loads((tmp_path / "run-analysis" / "activity_peaks.json").read_text())
    channel = next(int(c) for c, found in peaks["unet.mid_block"].items() if found)
    main(["steer", "--prior", "--model", "tiny", "--site", "unet.mid_block", "--channel",
          str(channel), "--analysis", "run-analysis", "--window", "peaks", "--steps", "3",
          "--out", "prior", "--quiet"])  # fmt: skip
    folder = tmp_path / "prior" / "unet.mid_block" / f"channel_{channel:04d}"
    assert len(list((folder / "images").glob("prior_image_*.png"))) == 5
    latent = load_file(str(folder / "latents" / "prior_latent_0.safetensors"))["latent"]
    assert latent.shape == (4, 16, 16) and np.isfinite(latent).all()
    record = json.loads((tmp_path / "prior" / "steer.json").read_text())
    assert record["seeds"] == list(features.THESIS_SEEDS) and record["guidance_scale"] == 1.0
    steer = record["runs"][1]["steers"][0]
    assert steer["window"]["kind"] == "TimestepSet"
    top = analysis.table("unet.mid_block", "max")[channel]
    np.testing.assert_allclose(steer["strength"]["values"][::-1], 50 * top, rtol=1e-5)
