"""``diffprobe features capture|analyse`` and ``diffprobe steer`` fed what users type wrong
(issue 18): each refused with exit 2, one line naming the input, nothing created. Cases that
need a model load the embedded ``tiny``; those that need an analysis read one made once."""

from __future__ import annotations

import pytest

CAPTURE = ["features", "capture", "--model", "tiny", "--out", "run", "--steps", "2"]
SITE = ["--sites", "unet.mid_block"]
PROMPTS = ["--prompts", "shapes:2"]
STEER = ["steer", "--model", "tiny", "--site", "unet.mid_block", "--out", "steered",
         "--steps", "2"]  # fmt: skip


def capture(*args: str) -> list[str]:
    extra = list(args)
    return [*CAPTURE, *([] if "--sites" in extra else SITE),
            *([] if "--prompts" in extra else PROMPTS), *extra]  # fmt: skip


CAPTURE_CASES = {
    "unknown site": (capture("--sites", "unet.midblock"), ["unet.midblock", "did you mean"]),
    "site outside the denoiser": (
        capture("--sites", "text_encoder.encoder.layers.1"),
        ["text_encoder.encoder.layers.1", "denoiser"],
    ),
    "empty prompt file": (capture("--prompts", "empty.txt"), ["empty.txt", "no prompts"]),
    "missing prompt file": (capture("--prompts", "nothere.txt"), ["nothere.txt", "no such file"]),
    "shapes without a count": (capture("--prompts", "shapes:x"), ["shapes:x", "shapes:N"]),
    "seeds not numbers": (capture("--seeds", "a,b"), ["--seeds", "'a,b'"]),
    "negative seed": (capture("--seeds", "-3"), ["--seeds"]),
    "max without mean": (capture("--reduce", "max"), ["--reduce", "mean"]),
    "unknown reduction": (capture("--reduce", "mean,median"), ["--reduce", "median"]),
    "unknown branch": (capture("--branch", "positive"), ["--branch", "positive"]),
    "uncond without cfg": (
        capture("--branch", "uncond", "--guidance", "1"),
        ["--branch uncond", "no unconditional branch"],
    ),
    "zero steps": (capture("--steps", "0"), ["--steps 0"]),
    "bad shard": (capture("--shard", "3/2"), ["--shard 3/2"]),
    "duplicate site": (capture("--sites", "unet.mid_block", "unet.mid_block"), ["twice"]),
}


def steer(*args: str) -> list[str]:
    return [*STEER, *args]


STEER_CASES = {
    "channel out of range": (steer("--channel", "999", "--strength", "1"), ["--channel 999"]),
    "unknown site": (
        [
            "steer",
            "--model",
            "tiny",
            "--site",
            "unet.midblock",
            "--channel",
            "0",
            "--strength",
            "1",
            "--out",
            "s",
        ],
        ["unet.midblock"],
    ),  # fmt: skip
    "window outside the schedule": (
        steer("--channel", "0", "--strength", "1", "--window", "2000-3000"),
        ["--window 2000-3000", "0..999"],
    ),
    "window not a range": (
        steer("--channel", "0", "--strength", "1", "--window", "early"),
        ["--window 'early'", "all, active, peaks"],
    ),
    "neither channel nor direction": (steer("--strength", "1"), ["--channel", "--direction"]),
    "unknown mode": (steer("--channel", "0", "--strength", "1", "--mode", "push"), ["push"]),
    "no strength": (steer("--channel", "0"), ["--strength", "--relative"]),
    "relative without analysis": (
        steer("--channel", "0", "--relative", "50"),
        ["--analysis"],
    ),
    "active window without analysis": (
        steer("--channel", "0", "--strength", "1", "--window", "active"),
        ["--window active", "--analysis"],
    ),
    "missing direction file": (
        steer("--direction", "nothere.safetensors", "--strength", "1"),
        ["nothere.safetensors", "no such file"],
    ),
    "channel list malformed": (steer("--channel", "x", "--strength", "1"), ["--channel 'x'"]),
    "prior with a prompt": (
        steer("--prior", "--channel", "0", "--prompt", "a red circle"),
        ["--prior", "--prompt"],
    ),
    "mask not an array": (
        steer("--channel", "0", "--strength", "1", "--mask", "empty.txt"),
        ["--mask empty.txt"],
    ),
    "analysis folder without analysis": (
        steer("--channel", "0", "--relative", "50", "--analysis", "nowhere"),
        ["--analysis nowhere", "analysis.json"],
    ),
}


def _cases(table):
    return [pytest.param(args, names, id=name) for name, (args, names) in table.items()]


@pytest.fixture
def prompt_files(sandbox):
    (sandbox / "work" / "empty.txt").write_text("\n  \n")
    return sandbox


@pytest.mark.slow
@pytest.mark.parametrize(("args", "names"), _cases(CAPTURE_CASES))
def test_features_capture_refuses(prompt_files, refused, args, names):
    refused(args, names)


@pytest.mark.slow
@pytest.mark.parametrize(("args", "names"), _cases(STEER_CASES))
def test_steer_refuses(prompt_files, refused, args, names):
    refused(args, names)


@pytest.fixture(scope="module")
def activity_run(tmp_path_factory):
    import diffprobe
    from diffprobe import features

    model = diffprobe.load("tiny")
    plan = features.ActivityPlan(sites=["unet.mid_block"], seeds=[0], steps=2,
                                 guidance_scale=1.0)  # fmt: skip
    root = tmp_path_factory.mktemp("activity") / "run"
    return features.capture_activity(model, ["a red circle", "a blue star"], plan, root,
                                     progress=False)  # fmt: skip


def test_analysing_a_run_without_feature_captures_is_refused(refused, run_dir, sandbox):
    refused(["features", "analyse", str(run_dir), "--out", "an"], [str(run_dir), "no feature"])
    (sandbox / "work" / "plain").mkdir()
    refused(["features", "analyse", "plain", "--out", "an"], ["plain", "run.json"])
    refused(["features", "analyse", "nowhere", "--out", "an"], ["nowhere", "not a folder"])


@pytest.mark.slow
def test_analyse_refuses_bad_parameters(refused, activity_run):
    run = str(activity_run)
    for args, names in (
        (["--windows", "2000-3000"], ["--windows 2000-3000", "none of the run's timesteps"]),
        (["--windows", "late"], ["--windows 'late'", "LOW-HIGH"]),
        (["--profile", "median"], ["--profile 'median'"]),
        (["--sites", "unet.up_blocks.0"], ["unet.up_blocks.0", "unet.mid_block"]),
        (["--branch", "cond"], ["--branch 'cond'", "none"]),
        (["--top-k", "0"], ["--top-k 0"]),
    ):
        refused(["features", "analyse", run, "--out", "an", *args], names)
