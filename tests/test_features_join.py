"""The feature stages joined (issues 18, 20, 24): ``dream --peaks`` reads what ``features
analyse`` writes and ``dream --prior`` what ``steer --prior`` writes (each dream starts from its
own channel's prior latents), the inspector's views read an activity run with its analysis
(profiles, peaks, top examples, generated images, SAE latents labelled as SAE features), and the
report shows the activity run, the analysis, the steering and the dream of real outputs. The
chain itself is the session fixture ``features_like_run`` (tests/conftest.py)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffprobe.features import open_activity
from diffprobe.interventions.dream import DreamError

pytestmark = pytest.mark.slow  # the fixture generates, analyses, steers and dreams (~10 s)


def test_dream_reads_the_analysis_peaks(features_like_run):
    from diffprobe.cli.dream import _timesteps
    from diffprobe.stages.dream import read_peaks

    f = features_like_run
    peaks = json.loads((f["analysis"] / "activity_peaks.json").read_text())[f["site"]]
    for target in f["targets"]:
        expected = sorted({0.0} | {float(p["timestep"]) for p in peaks[str(target)]})
        assert f["table"][target] == expected and len(expected) > 1
    # the folder, its activity_peaks.json and the plain {target: [t]} layout read alike
    assert _timesteps("0,peaks", f["analysis"] / "activity_peaks.json", f["targets"],
                      f["site"]) == f["table"]  # fmt: skip
    assert read_peaks(f["analysis"], f["site"])[str(f["targets"][0])] == [
        p["timestep"] for p in peaks[str(f["targets"][0])]
    ]
    with pytest.raises(DreamError, match="no peaks of site 'unet.down_blocks.0'.*unet.mid_block"):
        read_peaks(f["analysis"], "unet.down_blocks.0")
    dreamt = json.loads((f["dream"] / "dream.json").read_text())
    assert dreamt["timesteps"] == {str(t): v for t, v in f["table"].items()}
    assert dreamt["objective"] == "channel(unet.mid_block) − 0.5·total_variation − 0.5·range(3)"


def test_each_dream_starts_from_its_own_channels_prior(features_like_run, sd_model):
    from conftest import dream_shape

    from diffprobe.stages.dream import read_priors

    f = features_like_run
    shape = dream_shape(sd_model)
    for target in f["targets"]:
        folder = f["prior"] / f["site"] / f"channel_{target:04d}" / "latents"
        saved = torch.stack([load_file(folder / f"prior_latent_{j}.safetensors")["latent"]
                             for j in range(2)]).float()  # fmt: skip
        for t in f["table"][target]:
            leaf = f["dream"] / f"channel_{target:04d}" / f"timestep_{int(round(t)):04d}"
            assert torch.equal(load_file(leaf / "latents.safetensors")["start"], saved)
        # one steered folder, and its latents folder, give the same latents
        assert torch.equal(read_priors(folder.parent, f["site"], [9], shape), saved)
        assert torch.equal(read_priors(folder, f["site"], [9], shape), saved)
    a, b = (f["dream"] / f"channel_{t:04d}" / "timestep_0000" / "latents.safetensors"
            for t in f["targets"])  # fmt: skip
    assert not torch.equal(load_file(a)["start"], load_file(b)["start"])  # two channels' priors
    missing = next(c for c in range(64) if c not in f["targets"])
    with pytest.raises(DreamError, match=f"no prior latents of channel {missing}"):
        read_priors(f["prior"], f["site"], [f["targets"][0], missing], shape)
    assert json.loads((f["dream"] / "dream.json").read_text())["prior_from"] == str(f["prior"])


def _views(root):
    from diffprobe.app.views import RunRef, StageRef, Views
    from diffprobe.report.discover import find_stages

    stages = find_stages(root)
    views = Views([RunRef(stages[0].root, [StageRef(s.kind, s.path, s.name) for s in stages])])
    return views, {s.kind: i for i, s in enumerate(stages)}


def test_inspector_views_read_the_activity_run_and_its_analysis(features_like_run):
    f = features_like_run
    views, ids = _views(f["root"])
    run, stage = 0, ids["features"]
    axes = views.feature_axes(run, stage)
    assert axes["units"] == {f["site"]: "channel", f["sae_site"]: "SAE feature"}
    assert axes["analysis"] == {"run": 0, "stage": "analysis"}
    assert axes["windows"] == ["overall", "t0-500"]
    activity = open_activity(f["run"])
    assert axes["levels"] == activity.timesteps.tolist() and len(axes["levels"]) == 4
    stored = activity.get(f["site"], "cond")  # (items, timesteps, channels)
    shown = views.activity(run, stage, f["site"], "cond")
    np.testing.assert_allclose(shown["mean"], stored.mean(0).T, atol=1e-5)
    peaks = json.loads((f["analysis"] / "activity_peaks.json").read_text())[f["site"]]
    assert shown["peaks"] == [[p["timestep"] for p in peaks[str(c)]] for c in range(64)]
    # top items at a stored timestep: an independent argsort; overall: the analysis' file
    channel, step = f["targets"][0], 2
    top = views.top_items(run, stage, f["site"], "cond", channel, step)
    order = sorted(range(len(stored)), key=lambda i: (-stored[i, step, channel], i))
    assert [t["item"] for t in top] == order[:8]
    overall = views.top_items(run, stage, f["site"], "cond", channel, 0, window="overall")
    listed = json.loads((f["analysis"] / "top_examples.json").read_text())
    assert [t["item"] for t in overall] == [r["item"] for r in listed[f["site"]][str(channel)]
                                            ["overall"]]  # fmt: skip
    # thumbnails are the generated images, served from inside the run
    path = views.file(run, top[0]["image"])
    assert path.read_bytes() == activity.image_path(top[0]["item"]).read_bytes()
    sae = views.activity(run, stage, f["sae_site"], "cond")
    assert sae["channels"] == 12 and sae["peaks"] is not None
    dreams = views.dreams(channel, f["site"], "channel")
    assert [d["folder"] for d in dreams] == [f"channel_{channel:04d}"]
    assert views.dreams(channel, f["site"], "feature") == []  # SAE-feature dreams only
    assert len(dreams[0]["timesteps"]) == len(f["table"][channel])
    assert views.priors(channel, f["site"])[0]["images"]


def test_inspector_keeps_run_json_image_paths_inside_the_run(features_like_run, tmp_path):
    import shutil

    f = features_like_run
    copy = tmp_path / "copy"
    shutil.copytree(f["run"], copy / "activity")
    info = json.loads((copy / "activity" / "run.json").read_text())
    (tmp_path / "secret.png").write_bytes(b"not yours")
    info["items"][0]["image"] = "../../secret.png"
    (copy / "activity" / "run.json").write_text(json.dumps(info))
    views, ids = _views(copy)
    rows = views.top_items(0, ids["features"], f["site"], "cond", 0, 0, k=6)
    assert {r["item"] for r in rows} == set(range(6))
    assert [r["image"] for r in rows if r["item"] == 0] == [None]
    assert all(r["image"] for r in rows if r["item"] != 0)


def test_report_sections_of_the_feature_stages(features_like_run):
    from diffprobe.report.build import build_report

    f = features_like_run
    document = build_report([f["root"]])

    def section(kind):
        return re.search(rf"id='s\d+-{kind}'>(.*?)</section>", document, re.S).group(1)

    def inlined(text):
        return [base64.b64decode(a) for a in re.findall(r"data:image/png;base64,([^'\"]+)", text)]

    run = section("features")
    assert "SAE features" in run and "TopKSAE.encode" in run and "1 of 1" not in run
    assert "2 of 2" in run and len(inlined(run)) == 1  # chunks done; the first images
    analysis = section("features-analysis")
    assert str(f["run"]) in analysis
    assert (f["analysis"] / "plots" / f["site"] / "heatmap.png").read_bytes() in inlined(analysis)
    steer = section("steer")
    assert "channel_" in steer and len(inlined(steer)) == 1  # the steer table and its grid
    for target in f["targets"]:
        assert re.search(rf"<td[^>]*>{target}</td>", steer)
    dream = section("dream")
    assert "− 0.5·total_variation − 0.5·range(3)" in dream and "object at 0x" not in dream
    pictures = inlined(dream)
    for target in f["targets"]:
        assert (f["dream"] / f"channel_{target:04d}" / "grid.png").read_bytes() in pictures
    rows = dream.split("Activation at the start and the end")[1].count("<tr>") - 1
    assert rows == sum(len(v) for v in f["table"].values()) * 2  # timesteps × 2 seeds


def test_capture_with_an_sae_stores_its_latents_as_sae_features(tmp_path, monkeypatch):
    """``features capture --sae``: the SAE's dense ReLU pre-activations at the site are stored
    as the channels (16 latents, not the site's 128 channels; that a transform's output equals
    it applied to a hand capture is tests/test_features.py's transform test); the run names the
    SAE, and the inspector and the report label them SAE features."""
    from diffprobe.cli import main
    from diffprobe.cli.features import _sae_transform
    from diffprobe.features import ActivityError
    from diffprobe.report.build import build_report
    from diffprobe.sae import TopKSAE
    from diffprobe.sae.formats import save_sae

    monkeypatch.chdir(tmp_path)
    save_sae(TopKSAE(128, 16, 4, seed=0), tmp_path / "sae")  # unet.mid_block of tiny: 128
    with pytest.raises(ActivityError, match="--sae sae: name the site it reads with --sae-site"):
        _sae_transform("sae", None, None, ["unet.mid_block", "unet.up_blocks.1"], "cpu")
    delta = TopKSAE(128, 16, 4, seed=0, metadata={"site_semantics": "delta"})
    save_sae(delta, tmp_path / "delta")
    with pytest.raises(ActivityError, match="reads the site's delta"):
        _sae_transform("delta", "unet.mid_block", None, ["unet.mid_block"], "cpu")
    main(["features", "capture", "--model", "tiny", "--prompts", "shapes:2", "--seeds", "0",
          "--sites", "unet.mid_block", "--steps", "2", "--guidance", "1", "--sae", "sae",
          "--out", "study/run", "--quiet"])  # fmt: skip
    run = open_activity(tmp_path / "study" / "run")
    values = run.get("unet.mid_block")
    assert values.shape == (2, 2, 16) and (values >= 0).all() and values.max() > 0
    assert run.info["transforms"] == {"unet.mid_block": "TopKSAE.pre_acts (sae)"}
    views, ids = _views(tmp_path / "study")
    assert views.feature_axes(0, ids["features"])["units"] == {"unet.mid_block": "SAE feature"}
    assert "SAE features" in build_report([tmp_path / "study"])
