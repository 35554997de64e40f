"""Activity over timesteps (issue 18): capture during generation against hand-written hooks on
each CFG half and without CFG, the run format and its resume/shards, the analysis against
independent computations, and steering built on the typed edits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffprobe import features
from diffprobe.hooks.edits import TimestepProfile, TimestepSet, TimestepWindow

SITES = ["unet.mid_block", "unet.up_blocks.1"]
PROMPTS = ["a red circle", "a blue square", "a green star"]
NEGATIVE = "a yellow heart on white"


def hand_capture(model, site, prompts, seeds, steps, guidance, negative=None):
    """The reference: a plain forward hook on the module, the output's spatial mean and max,
    split into the pipeline's [uncond, cond] halves by hand when the batch is doubled."""
    module = model.module(site)
    seen = []

    def hook(module, args, output):
        value = output[0] if isinstance(output, tuple) else output
        seen.append((value.float().mean((2, 3)), value.float().amax((2, 3))))

    handle = module.register_forward_hook(hook)
    try:
        images = model.generate(
            prompts, steps=steps, guidance_scale=guidance, seed=seeds, size=32,
            **({"negative_prompt": [negative] * len(prompts)} if negative else {}),
        )  # fmt: skip
    finally:
        handle.remove()
    mean = torch.stack([m for m, _ in seen], 1)  # (batch, timesteps, channels)
    peak = torch.stack([x for _, x in seen], 1)
    return images, mean.numpy(), peak.numpy()


@pytest.fixture(scope="module")
def cfg_run(sd_model, tmp_path_factory):
    plan = features.ActivityPlan(
        size=32, sites=SITES, seeds=[0, 5], steps=3, guidance_scale=5.0, negative_prompt=NEGATIVE,
        reductions=("mean", "max"), branches="both", chunk_items=4,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("act") / "run"
    features.capture_activity(sd_model, PROMPTS, plan, root, batch_size=3, progress=False)
    return features.open_activity(root)


@pytest.mark.slow
def test_each_cfg_branch_equals_a_hand_hook_on_its_half(sd_model, cfg_run):
    assert cfg_run.branches == ["uncond", "cond"]
    n = len(cfg_run.items)
    prompts = cfg_run.prompts
    seeds = [item["seed"] for item in cfg_run.items]
    assert prompts == [p for p in PROMPTS for _ in (0, 5)] and seeds == [0, 5] * 3
    for site in SITES:
        _, mean, peak = hand_capture(sd_model, site, prompts, seeds, 3, 5.0, NEGATIVE)
        assert mean.shape[0] == 2 * n  # the doubled batch: [uncond x n, cond x n]
        for branch, rows in (("uncond", slice(0, n)), ("cond", slice(n, 2 * n))):
            np.testing.assert_allclose(cfg_run.get(site, branch), mean[rows], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(cfg_run.get(site, branch, "max"), peak[rows], rtol=1e-5,
                                       atol=1e-5)  # fmt: skip
        # the negative prompt differs from the prompts, so the halves really differ
        assert np.abs(cfg_run.get(site, "cond") - cfg_run.get(site, "uncond")).max() > 1e-3
    assert len(cfg_run.timesteps) == 3 and np.all(np.diff(cfg_run.timesteps) < 0)


def test_images_are_kept_and_equal_plain_generation(sd_model, cfg_run):
    item = cfg_run.items[3]
    image = sd_model.generate([item["prompt"]], steps=3, guidance_scale=5.0, seed=item["seed"], size=32,
                              negative_prompt=[NEGATIVE])  # fmt: skip
    pixels = np.clip(image[0] * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(cfg_run.images([3])[0].astype(int) - pixels).max() <= 1


def test_without_cfg_the_whole_batch_is_stored_as_none(sd_model, tmp_path):
    plan = features.ActivityPlan(size=32, sites=SITES[:1], seeds=[1], steps=2, guidance_scale=1.0)
    root = features.capture_activity(sd_model, PROMPTS, plan, tmp_path / "r", progress=False)
    run = features.open_activity(root)
    assert run.branches == ["none"] and run.info["schedule"]["cfg"] is False
    _, mean, _ = hand_capture(sd_model, SITES[0], PROMPTS, [1, 1, 1], 2, 1.0)
    assert mean.shape[0] == 3
    np.testing.assert_allclose(run.get(SITES[0]), mean, rtol=1e-5, atol=1e-5)
    with pytest.raises(features.ActivityError, match="no unconditional branch"):
        bad = features.ActivityPlan(
            size=32, sites=SITES[:1], steps=2, guidance_scale=1.0, branches="both"
        )
        features.capture_activity(sd_model, PROMPTS, bad, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_shards_and_resume_give_the_same_arrays(sd_model, tmp_path):
    plan = features.ActivityPlan(size=32, sites=SITES[:1], seeds=[0], steps=2, guidance_scale=3.0,
                                 chunk_items=1)  # fmt: skip
    whole = features.capture_activity(sd_model, PROMPTS, plan, tmp_path / "a", progress=False)
    for i in (1, 0):
        features.capture_activity(sd_model, PROMPTS, plan, tmp_path / "b", shard=(i, 2),
                                  progress=False)  # fmt: skip
    split = features.open_activity(tmp_path / "b")
    assert split.complete
    np.testing.assert_array_equal(features.open_activity(whole).get(SITES[0]), split.get(SITES[0]))
    marker = tmp_path / "b" / "progress" / "chunk-000001.done"
    before = marker.stat().st_mtime_ns
    features.capture_activity(sd_model, PROMPTS, plan, tmp_path / "b", progress=False)
    assert marker.stat().st_mtime_ns == before  # resumed: nothing recomputed


def test_transform_stores_features_of_tokens(sd_model, tmp_path):
    weight = torch.randn(64, 7, generator=torch.Generator().manual_seed(0))

    def encode(tokens):  # (items, tokens, channels) -> (items, tokens, features)
        return torch.relu(tokens @ weight)

    site = "unet.mid_block"
    plan = features.ActivityPlan(size=32, sites=[site], seeds=[0], steps=2, guidance_scale=1.0)
    root = features.capture_activity(sd_model, PROMPTS[:2], plan, tmp_path / "t",
                                     transforms={site: encode},
                                     transform_names={site: "relu-7"}, progress=False)  # fmt: skip
    run = features.open_activity(root)
    assert run.info["transforms"] == {site: "relu-7"}
    values = []
    with torch.no_grad():
        with features_capture(sd_model, site) as cache:
            sd_model.generate(PROMPTS[:2], steps=2, guidance_scale=1.0, seed=[0, 0], size=32)
    for record in cache.records(site):
        tokens = record.value.flatten(2).transpose(1, 2)
        values.append(encode(tokens).mean(1))
    expected = torch.stack(values, 1).numpy()
    assert run.get(site).shape == (2, 2, 7)
    np.testing.assert_allclose(run.get(site), expected, rtol=1e-5, atol=1e-5)


def features_capture(model, site):
    import diffprobe

    return diffprobe.capture(model, [site])


# -- analysis ------------------------------------------------------------------------------------


def test_top_examples_equal_an_independent_argsort():
    rng = np.random.default_rng(0)
    activity = rng.normal(size=(30, 5, 6))
    timesteps = np.array([900.0, 700.0, 500.0, 300.0, 100.0])
    for window in (None, (250.0, 750.0)):
        scores = features.window_score(activity, timesteps, window)
        index, values = features.top_examples(scores, k=4)
        inside = [
            t for t, v in enumerate(timesteps) if window is None or window[0] <= v <= window[1]
        ]
        for c in range(6):
            reference = sorted(range(30), key=lambda i: -np.mean(activity[i, inside, c]))[:4]
            assert index[c].tolist() == reference
            np.testing.assert_allclose(
                values[c], [activity[i, inside, c].mean() for i in reference]
            )


def test_topk_frequency_counts_each_samples_top_channels():
    rng = np.random.default_rng(1)
    activity = rng.normal(size=(12, 3, 8))
    frequency = features.topk_frequency(activity, k=3)
    for t in range(3):
        counts = np.zeros(8)
        for item in range(12):
            for c in sorted(range(8), key=lambda c: -activity[item, t, c])[:3]:
                counts[c] += 1
        np.testing.assert_allclose(frequency[:, t], counts / 12)
    assert np.allclose(frequency.sum(0), 3)


def test_profile_active_timesteps_and_planted_peaks():
    timesteps = np.arange(980, -1, -20.0)
    bumps = np.exp(-(((timesteps - 700) / 40) ** 2)) + 0.5 * np.exp(
        -(((timesteps - 200) / 40) ** 2)
    )
    table = np.stack([bumps, np.zeros_like(bumps)])
    grid, profile = features.interpolate_profile(table, timesteps, 1000)
    assert profile.shape == (2, 1001) and profile[0, 981:].max() == 0
    peaks = features.activity_peaks(profile, grid, height=0.1, distance=100, top=3)
    assert [p["timestep"] for p in peaks[0]] == [700, 200] and peaks[1] == []
    active = features.active_timesteps(profile, grid, threshold=0.25)
    assert 700 in active[0] and 500 not in active[0] and len(active[1]) == 0


def test_selectivity_auc_matches_pairwise_counting():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(40, 3))
    labels = rng.random(40) < 0.3
    scores[labels, 0] += 3  # a planted selective channel
    auc = features.selectivity_auc(scores, labels)
    pos, neg = scores[labels], scores[~labels]
    reference = [((pos[:, None, c] > neg[None, :, c]).mean()
                  + 0.5 * (pos[:, None, c] == neg[None, :, c]).mean()) for c in range(3)]  # fmt: skip
    np.testing.assert_allclose(auc, reference)
    assert auc[0] > 0.9


@pytest.mark.slow
def test_analyse_writes_tables_that_match_the_run(cfg_run, tmp_path):
    out = features.analyse_activity(cfg_run, tmp_path / "an", windows=[(0, 500)], examples=3,
                                    top_k=4, peak_distance=50, plot_channels=1)  # fmt: skip
    analysis = features.Analysis(out)
    activity = cfg_run.get("unet.mid_block", "cond")
    np.testing.assert_allclose(analysis.table("unet.mid_block", "max"), activity.max(0).T)
    np.testing.assert_allclose(analysis.table("unet.mid_block", "frequency"),
                               features.topk_frequency(activity, 4))  # fmt: skip
    tops = json.loads((out / "top_examples.json").read_text())["unet.mid_block"]
    for c in (0, 5):
        order = np.argsort(-activity[:, :, c].mean(1), kind="stable")[:3]
        assert [row["item"] for row in tops[str(c)]["overall"]] == order.tolist()
    assert (out / "plots" / "unet.mid_block" / "heatmap.png").is_file()
    assert len(list((out / "plots" / "unet.mid_block").glob("top_c*.png"))) == 1


# -- steering ------------------------------------------------------------------------------------


def test_strength_zero_is_bit_identical_and_outside_the_window_changes_nothing(sd_model):
    plain = sd_model.generate("", steps=3, guidance_scale=1.0, seed=4, size=32)
    for steer in (
        features.Steer("unet.mid_block", channel=2, strength=0.0),
        features.Steer("unet.mid_block", channel=2, strength=50.0,
                       window=TimestepWindow(2000, 3000)),
        features.Steer("unet.mid_block", direction=torch.ones(64), strength=50.0,
                       window=TimestepSet([1500.0])),
    ):  # fmt: skip
        assert np.array_equal(features.steer(sd_model, "", steer, steps=3, guidance_scale=1.0,
                                             seed=4, size=32), plain)  # fmt: skip
    pushed = features.steer(sd_model, "", features.Steer("unet.mid_block", channel=2,
                            strength=50.0), steps=3, guidance_scale=1.0, seed=4, size=32)  # fmt: skip
    assert np.abs(pushed - plain).max() > 1e-3


def test_steer_edits_the_channel_and_direction_as_specified(sd_model):
    site = "unet.mid_block"
    direction = torch.randn(64, generator=torch.Generator().manual_seed(3))
    unit = direction / direction.norm()
    cases = {
        "add channel": (features.Steer(site, channel=1, strength=2.5),
                        lambda v: v + 2.5 * torch.eye(64)[1].view(1, -1, 1, 1)),
        "clamp channel": (features.Steer(site, channel=1, mode="clamp", strength=-1.0),
                          lambda v: torch.cat([v[:, :1], torch.full_like(v[:, 1:2], -1.0),
                                               v[:, 2:]], 1)),
        "scale direction": (features.Steer(site, direction=direction, mode="scale", strength=3.0),
                            lambda v: v + 2.0 * (v * unit.view(1, -1, 1, 1)).sum(1, keepdim=True)
                            * unit.view(1, -1, 1, 1)),
    }  # fmt: skip
    import diffprobe

    for name, (steer, expected) in cases.items():
        with (
            diffprobe.capture(sd_model, [site]) as before,
            diffprobe.edit(sd_model, steer.to_edit()),
        ):
            with diffprobe.capture(sd_model, [site]) as after:
                sd_model.generate("", steps=1, guidance_scale=1.0, seed=0, size=32)
        torch.testing.assert_close(after.last(site), expected(before.last(site)), msg=name)


def test_relative_strength_follows_the_timestep_profile(sd_model):
    import diffprobe

    site = "unet.mid_block"
    profile = TimestepProfile((0.0, 1000.0), (0.0, 10.0))  # strength = t / 100
    steer = features.Steer(site, channel=0, strength=profile)
    with diffprobe.capture(sd_model, [site]) as before, diffprobe.edit(sd_model, steer.to_edit()):
        with diffprobe.capture(sd_model, [site]) as after:
            sd_model.generate("", steps=2, guidance_scale=1.0, seed=0, size=32)
    for b, a in zip(before.records(site), after.records(site), strict=True):
        delta = (a.value - b.value)[:, 0]
        torch.testing.assert_close(delta, torch.full_like(delta, b.timestep / 100), atol=1e-4,
                                   rtol=1e-4)  # fmt: skip


def test_timestep_set_and_profile_refuse_bad_input():
    from diffprobe.hooks.edits import EditError

    with pytest.raises(EditError, match="non-empty list"):
        TimestepSet([])
    with pytest.raises(EditError, match="as many values"):
        TimestepProfile((1.0, 2.0), (1.0,))
    with pytest.raises(features.SteerError, match="channel or a direction"):
        features.Steer("unet.mid_block")
