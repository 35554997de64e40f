"""Fidelity to the originals (issue 17): every preset reproduces the original's definition on a
hand-built case computed independently here; no fit ever sees a held-out concept; the real
THINGS layout; the lens's empty pooled vector."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from diffprobe.analysis import probing
from diffprobe.analysis.alignment import ooo_accuracy, ooo_correct
from diffprobe.analysis.anomalies import detect_high_norm, norm_maps
from diffprobe.analysis.anomaly_paper import (
    crop_without_resize,
    group_similarity,
    label_window,
    rel_norm_at_labels,
    token_group_ratios,
    window_side,
)
from diffprobe.analysis.glocal import contrastive_loss, fit_glocal, glocal_loss

# ------------------------------------------------------------------------ extraction protocol


def _with_scheduler(scheduler):
    from types import SimpleNamespace

    return SimpleNamespace(pipe=SimpleNamespace(scheduler=scheduler))


def test_img2img_timesteps_by_hand():
    from diffusers import DDIMScheduler, PNDMScheduler

    from diffprobe.extract.plan import img2img_timestep

    levels = (0.01, 0.05, 0.2, 0.5)
    # SD-2.1: DDIM, leading spacing, steps_offset 1; 100 steps: timesteps = arange(100)[::-1] *
    # 10 + 1, and img2img starts at index 100 - int(100 * strength)
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         steps_offset=1, timestep_spacing="leading")  # fmt: skip
    timesteps = np.arange(100)[::-1] * 10 + 1
    expected = [int(timesteps[100 - int(100 * p)]) for p in levels]
    assert expected == [1, 41, 191, 491]
    assert [img2img_timestep(_with_scheduler(ddim), p) for p in levels] == expected
    # SD-1.5: PNDM without Runge-Kutta steps repeats its second timestep (order 1)
    pndm = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         steps_offset=1, skip_prk_steps=True)  # fmt: skip
    base = np.arange(100) * 10 + 1
    plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
    expected = [int(plms[100 - int(100 * p)]) for p in levels]
    assert expected == [11, 51, 201, 501]
    assert [img2img_timestep(_with_scheduler(pndm), p) for p in levels] == expected


@pytest.mark.slow
def test_alignment_paper_extraction_equals_a_hand_written_img2img_step(tmp_path):
    import diffprobe
    from diffprobe.data.sources import open_source
    from diffprobe.extract import ExtractionPlan, extract

    model = diffprobe.load("tiny")
    source = open_source("shapes:3")
    plan = ExtractionPlan(sites=["unet.mid_block"], noise_levels=[0.2], seed=42,
                          protocol="alignment-paper")  # fmt: skip
    run = diffprobe.open_run(extract(model, source, plan, tmp_path / "run", batch_size=3,
                                     progress=False))  # fmt: skip
    assert run.info["protocol"]["name"] == "alignment-paper"
    assert run.info["noise"][0]["timestep"] == 191
    stored = run.get("unet.mid_block", 0.2)

    pipe = model.pipe
    images = np.stack([np.asarray(source.items[i].load()) for i in range(3)])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    size = model.resolution
    if pixels.shape[-1] != size:
        pixels = model.prepare_images(images, size)
    with torch.no_grad():
        posterior = pipe.vae.encode(pixels).latent_dist
        generator = torch.Generator("cpu").manual_seed(42)
        eps = torch.randn(posterior.mean.shape[1:], generator=generator)
        noise = torch.randn(posterior.mean.shape[1:], generator=generator)
        x0 = (posterior.mean + posterior.std * eps) * pipe.vae.config.scaling_factor
        alpha_bar = pipe.scheduler.alphas_cumprod[191]
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        tokens = pipe.tokenizer([""] * 3, padding="max_length", return_tensors="pt",
                                max_length=pipe.tokenizer.model_max_length)  # fmt: skip
        text = pipe.text_encoder(tokens.input_ids)[0]
        seen = {}
        handle = pipe.unet.mid_block.register_forward_hook(
            lambda m, i, o: seen.setdefault("out", o)
        )
        pipe.unet(x_t, torch.full((3,), 191), encoder_hidden_states=text)
        handle.remove()
    expected = seen["out"].float().mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)
    # the same noise for every image: the per-item default differs
    default = ExtractionPlan(sites=["unet.mid_block"], noise_levels=[0.2], seed=42)
    other = diffprobe.open_run(extract(model, source, default, tmp_path / "default",
                                       batch_size=3, progress=False))  # fmt: skip
    assert other.info["noise"][0]["timestep"] == 200
    assert not np.allclose(other.get("unet.mid_block", 0.2), stored)


def test_protocol_refusals():
    from diffprobe.extract.plan import ExtractionError, ExtractionPlan

    with pytest.raises(ExtractionError, match="takes noise levels"):
        ExtractionPlan(sites=["a"], timesteps=[10], protocol="alignment-paper")
    with pytest.raises(ExtractionError, match="not a protocol"):
        ExtractionPlan(sites=["a"], noise_levels=[0.1], protocol="img2img")


# ------------------------------------------------------------------------------ tie rules


def test_tie_rules_by_hand():
    # rows: kept pair strictly best | partial tie with the kept pair | all equal | other pair best
    # | partial tie not involving the kept pair's win
    similarity = np.array(
        [
            [1.0, 0.9, 0.1, 0.5, 0.9, 0.5],
            [0.9, 1.0, 0.2, 0.5, 0.3, 0.5],
            [0.1, 0.2, 1.0, 0.5, 0.7, 0.9],
            [0.5, 0.5, 0.5, 1.0, 0.5, 0.5],
            [0.9, 0.3, 0.7, 0.5, 1.0, 0.9],
            [0.5, 0.5, 0.9, 0.5, 0.9, 1.0],
        ]
    )
    triplets = np.array([[0, 1, 2], [0, 1, 4], [3, 5, 1], [2, 0, 5], [4, 5, 0]])
    # gLocal: argmin over the distances of the pairs (0,1), (0,2), (1,2); -1 when all equal
    expected_glocal = []
    for a, b, c in triplets:
        distances = np.array([1 - similarity[a, b], 1 - similarity[a, c], 1 - similarity[b, c]])
        choice = -1 if len(np.unique(distances)) == 1 else int(np.argmin(distances))
        expected_glocal.append(choice == 0)
    assert expected_glocal == [True, True, False, False, True]
    assert ooo_correct(similarity, triplets, "glocal").tolist() == expected_glocal
    assert ooo_correct(similarity, triplets, "strict").tolist() == [True, False, False, False,
                                                                   False]  # fmt: skip


# ------------------------------------------------------------------------------ gLocal probe


def test_glocal_loss_by_hand():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 4))
    w = rng.normal(size=(4, 4)) * 0.3
    b = rng.normal(size=4) * 0.1
    ref = rng.normal(size=(5, 4))
    triplets = np.array([[0, 1, 2], [3, 4, 5], [6, 0, 3]])
    alpha, tau, lam = 0.1, 0.5, 0.01

    z = x @ w + b
    ce = []
    for i, j, k in triplets:
        logits = np.array([z[i] @ z[j], z[i] @ z[k], z[j] @ z[k]])
        ce.append(-(logits[0] - np.log(np.exp(logits).sum())))

    def cosines(m):
        unit = m / np.linalg.norm(m, axis=1, keepdims=True)
        full = unit @ unit.T
        return np.array([np.delete(row, i) for i, row in enumerate(full)])

    teacher, student = cosines(ref) / tau, cosines(ref @ w + b) / tau
    p = np.exp(teacher) / np.exp(teacher).sum(1, keepdims=True)
    log_q = student - np.log(np.exp(student).sum(1, keepdims=True))
    local = -(p * log_q).sum(1).mean()
    frobenius = np.sqrt((w**2).sum())  # unsquared
    expected = (1 - alpha) * np.mean(ce) + alpha * local + lam * frobenius

    def t(a):
        return torch.as_tensor(a, dtype=torch.float64)

    total, global_term, local_term = glocal_loss(
        t(w), t(b), t(x), torch.as_tensor(triplets), t(ref), alpha=alpha, tau=tau, lam=lam
    )
    assert float(global_term) == pytest.approx(np.mean(ce), rel=1e-10)
    assert float(local_term) == pytest.approx(local, rel=1e-10)
    assert float(contrastive_loss(t(ref), t(ref @ w + b), tau)) == pytest.approx(local, rel=1e-10)
    assert float(total) == pytest.approx(expected, rel=1e-10)


def test_glocal_standardisation_and_initialisation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 3)) * np.array([1.0, 5.0, 20.0]) + 3.0
    triplets = np.argsort(rng.random((60, 12)), 1)[:, :3]
    transform, info = fit_glocal(x, triplets[:40], triplets[40:], lr=0.0, max_epochs=1)
    # one global scalar mean and std (not per dimension); W = 1e-3·I, b = 1e-3 at lr 0
    assert np.all(transform.mean == x.mean()) and np.all(transform.std == x.std())
    np.testing.assert_allclose(transform.weights, np.eye(3) * 1e-3, atol=1e-9)
    np.testing.assert_allclose(transform.bias, np.full(3, 1e-3), atol=1e-9)
    assert info["lambda"] == 1e-3


# ------------------------------------------------------------- no fit sees held-out concepts


def _planted_problem(n=30, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    triplets = np.argsort(rng.random((2500, n)), 1)[:, :3]
    z = x[:, :2]
    out = []
    for a, b, c in triplets:
        s = [z[a] @ z[b], z[a] @ z[c], z[b] @ z[c]]
        out.append([(a, b, c), (a, c, b), (b, c, a)][int(np.argmax(s))])
    return x, np.array(out)


def test_regression_never_fits_held_out_concepts():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 6))
    target = x @ rng.normal(size=(6, 3)) + 0.1 * rng.normal(size=(40, 3))
    base = probing.regress(x, target, folds=4, alphas=(1e-2, 1.0))
    folds = probing.object_folds(40, 4, 0)
    for held in folds:
        changed = target.copy()
        changed[held] += 1e3  # the held-out concepts' targets: invisible to their own fold
        other = probing.regress(x, changed, folds=4, alphas=(1e-2, 1.0))
        np.testing.assert_array_equal(other.predicted[held], base.predicted[held])


@pytest.mark.parametrize("method", ["default", "glocal"])
def test_probe_never_fits_held_out_triplets(method):
    x, triplets = _planted_problem()
    options = {"max_epochs": 4} if method == "glocal" else {"max_epochs": 20, "patience": 5}
    if method == "glocal":
        options["lam"] = 1e-3
    base = probing.probe(x, triplets, folds=3, method=method, **options)
    held = probing.object_folds(30, 3, 0, np.isin(np.arange(30), np.unique(triplets)))[0]
    member = np.zeros(30, bool)
    member[held] = True
    inside = member[triplets].all(1)
    # relabel every triplet of the held-out concepts (the odd one out becomes column 0)
    changed = triplets.copy()
    changed[inside] = changed[inside][:, [2, 1, 0]]
    if method == "default":
        x = x.copy()
        x[held] *= 100.0  # per-dimension statistics come from training concepts only
    other = probing.probe(x, changed, folds=3, method=method, **options)
    for key in ("weights", "bias", "mean", "std"):
        np.testing.assert_array_equal(
            getattr(other.transforms[0], key), getattr(base.transforms[0], key)
        )


# ---------------------------------------------------------------------- anomaly definitions


def _loop_group_similarity(maps, group):
    items, h, w, _ = maps.shape
    values = []
    for n in range(items):
        if group == "corner":
            cells = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]
        else:
            cells = [(y, x) for y in range(h) for x in range(w)
                     if (y in (0, h - 1) or x in (0, w - 1))
                     and not (y in (0, h - 1) and x in (0, w - 1))]  # fmt: skip
        sims = []
        for i, a in enumerate(cells):
            for j, b in enumerate(cells):
                if i != j:
                    u, v = maps[n][a], maps[n][b]
                    sims.append(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
        values.append(np.mean(sims))
    return float(np.mean(values))


def test_corner_and_border_ratios_without_resize_by_hand():
    rng = np.random.default_rng(3)
    original = rng.normal(size=(3, 6, 6, 8))
    cropped = rng.normal(size=(3, 4, 4, 8))
    cropped[:, [0, 0, -1, -1], [0, -1, 0, -1]] += 2.0  # corners alike: ratio > 1
    result = token_group_ratios(cropped, original)
    inner = original[:, 1:-1, 1:-1]
    for group in ("corner", "border"):
        expected = _loop_group_similarity(cropped, group) / _loop_group_similarity(inner, group)
        assert result[f"{group}_ratio"] == pytest.approx(expected, rel=1e-10)
    assert result["corner_ratio"] > 1.5
    assert group_similarity(inner)["corner"] == pytest.approx(_loop_group_similarity(inner,
                                                              "corner"))  # fmt: skip
    with pytest.raises(ValueError, match="outer ring"):
        token_group_ratios(original, original)
    images = rng.integers(0, 255, size=(2, 64, 64, 3), dtype=np.uint8)
    crop = crop_without_resize(images, 8)
    assert crop.shape == (2, 48, 48, 3) and np.array_equal(crop, images[:, 8:56, 8:56])


def test_window_scales_with_the_site_and_rel_norm_by_hand():
    assert [window_side(g) for g in (8, 16, 32, 64)] == [1, 1, 2, 4]
    assert label_window(6, 10, (64, 64)) == (slice(12, 16), slice(20, 24))
    rng = np.random.default_rng(4)
    norms = {"a": rng.random((2, 16, 16)) + 1, "b": rng.random((2, 64, 64)) + 1}
    labels = np.array([[0, 4, 6], [1, 30, 2]])
    rows = rel_norm_at_labels(norms, labels)
    for row, (site, maps) in zip(rows, norms.items(), strict=True):
        scale = maps.shape[1] / 32
        side = max(1, int(2 * scale))
        values = [maps[i, int(y * scale) : int(y * scale) + side,
                       int(x * scale) : int(x * scale) + side].mean() / maps[i].mean()
                  for i, y, x in labels]  # fmt: skip
        assert row["site"] == site and row["window"] == side
        assert row["rel_norm_mean"] == pytest.approx(np.mean(values), rel=1e-12)
        assert row["rel_norm_std"] == pytest.approx(np.std(values), rel=1e-12)


def test_planted_high_norm_tokens_are_found_exactly():
    """tiny has no high-norm artifacts of its own (docs/anomalies.md: its detections lie on the
    drawn shapes); a planted case proves the detector: 2x2 groups of 4x the norm are found at
    their planted positions and nowhere else."""
    rng = np.random.default_rng(5)
    maps = rng.normal(size=(4, 16, 16, 32))
    planted = [(0, 2, 4), (1, 10, 12), (2, 6, 0), (3, 14, 14)]
    for item, y, x in planted:
        maps[item, y : y + 2, x : x + 2] *= 4.0
    found = detect_high_norm(norm_maps(maps), threshold=2.0)
    got = sorted(zip(found["item"].tolist(), found["y"].tolist(), found["x"].tolist(), strict=True))
    assert got == sorted(planted)


# --------------------------------------------------------------------------- THINGS layout


@pytest.fixture(scope="module")
def real_layout_root(tmp_path_factory):
    """A THINGS root in the release's layout: concepts/things_concepts.tsv, images/<uid>.jpg,
    triplets/train_90.npy and test_10.npy."""
    from PIL import Image

    from diffprobe.data.things_export import export_things

    flat = export_things(tmp_path_factory.mktemp("flat"), images_per_concept=1, n_train=900,
                         n_test=300, n_repeat_triplets=10, repeats=4, seed=0)  # fmt: skip
    root = tmp_path_factory.mktemp("real") / "THINGS"
    (root / "concepts").mkdir(parents=True)
    shutil.copy(flat / "things_concepts.tsv", root / "concepts" / "things_concepts.tsv")
    (root / "images").mkdir()
    with open(flat / "things_concepts.tsv", newline="") as handle:
        uids = [row["uniqueID"] for row in csv.DictReader(handle, delimiter="\t")]
    for uid in uids:
        png = next((flat / "images" / uid).glob("*.png"))
        Image.open(png).convert("RGB").save(root / "images" / f"{uid}.jpg", quality=95)
    shutil.copytree(flat / "triplets", root / "triplets")
    (root / "triplets" / "noise_ceiling.json").unlink()
    (root / "triplets" / "repeated.npy").unlink()
    return root


def test_things_reads_the_release_layout_and_the_default_ceiling(real_layout_root, tmp_path):
    from diffprobe.data.sources import open_source
    from diffprobe.data.things import THINGS_CEILING, load_things

    things = load_things(real_layout_root)
    assert things.n_concepts == 48 and things.ceiling is None
    assert open_source(real_layout_root).kind == "things"
    # 1,854 concepts without a ceiling file: the real THINGS, ceiling 0.673
    big = tmp_path / "big"
    (big / "concepts").mkdir(parents=True)
    rows = "\n".join(f"c{i}\tc{i}" for i in range(1854))
    (big / "concepts" / "things_concepts.tsv").write_text(f"uniqueID\tWord\n{rows}\n")
    loaded = load_things(big, check_images=False)
    assert loaded.ceiling == THINGS_CEILING == 0.673 and "0.673" in loaded.ceiling_source


@pytest.mark.slow
def test_align_on_the_release_layout_with_the_original_protocol(real_layout_root, tmp_path,
                                                                 sd_model):  # fmt: skip
    from typer.testing import CliRunner

    from diffprobe.cli import app
    from diffprobe.data.sources import open_source
    from diffprobe.data.things import load_things
    from diffprobe.extract import ExtractionPlan, extract

    plan = ExtractionPlan(sites=["unet.mid_block"], noise_levels=[0.1], image_size=32,
                          chunk_items=48)  # fmt: skip
    run = extract(sd_model, open_source(real_layout_root), plan, tmp_path / "run",
                  batch_size=48, progress=False)  # fmt: skip
    out = tmp_path / "align"
    result = CliRunner().invoke(app, ["align", str(run), "--things", str(real_layout_root),
                                      "--out", str(out), "--protocol", "alignment-paper",
                                      "--json", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout[result.stdout.index("[") :])
    things = load_things(real_layout_root)
    every = np.concatenate([things.triplets["train"], things.triplets["test"]])
    assert rows[0]["triplets"] == len(every) == 1200 and rows[0]["ties"] == "glocal"
    import diffprobe

    features = diffprobe.open_run(run).get("unet.mid_block", 0.1)
    # one image per concept, items in concept order: the concept features are the items'
    assert rows[0]["accuracy"] == pytest.approx(ooo_accuracy(features, every, ties="glocal"))
    # gLocal's probe end to end: λ chosen per fold from the sweep, recorded in the tables
    out = tmp_path / "probe"
    result = CliRunner().invoke(app, ["probe", str(run), "--things", str(real_layout_root),
                                      "--out", str(out), "--probe", "glocal", "--folds", "2",
                                      "--lambdas", "1e-3,1e-1", "--max-epochs", "2", "--triplets", "all",
                                      "--val-fraction", "0.5", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    with open(out / "probe.csv", newline="") as handle:
        folds = list(csv.DictReader(handle))
    assert len(folds) == 2 and {row["lambda"] for row in folds} <= {"0.001", "0.1"}
    assert (out / "transforms").is_dir()


# -------------------------------------------------------------------------------- the lens


def test_lens_empty_pooled_vector_is_the_flux_default():
    import diffprobe
    from diffprobe.lens import lens_embeddings
    from diffprobe.testing import dummy_cases

    build = {case.name: case.build for case in dummy_cases()}["flux"]
    model = diffprobe.from_pipeline(build(0), name="dummy-flux")
    lensed = lens_embeddings(model, ["a red circle"], encoder="text_encoder_2")
    assert lensed.pooled == "empty"
    empty = model.prompt_embeds(model.encode_prompt([""]).cond)[1]
    full = model.prompt_embeds(model.encode_prompt(["a red circle"]).cond)[1]
    assert not torch.equal(empty, full)
    assert torch.equal(lensed.conditional(0)[1], empty)
    assert torch.equal(lensed.conditional(lensed.last_layer)[1], full)
    assert lens_embeddings(model, ["a red circle"], encoder="text_encoder_2",
                           pooled="full").conditional(0)[1].equal(full)  # fmt: skip


# ------------------------------------------------------------------------ torchrun vs one


@pytest.mark.slow
def test_torchrun_shards_equal_one_process(tmp_path):
    """2 torchrun ranks (OMP_NUM_THREADS=1 each) fill one run bit for bit like one process with
    --threads 1 (docs/store.md)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import diffprobe

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    args = ["--model", "tiny", "--data", "shapes:4", "--sites", "unet.mid_block", "--noise",
            "0.2", "--chunk-items", "1", "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(diffprobe.__file__).parents[1])}
    command = " ".join([sys.executable, "-m", "diffprobe", "extract", *args, "--out",
                        str(tmp_path / "sharded"), "--shard", "$RANK/$WORLD_SIZE"])  # fmt: skip
    subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "--no-python", "sh",
                    "-c", command], check=True, env=env, cwd=tmp_path,
                   capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, "-m", "diffprobe", "extract", *args, "--out",
                    str(tmp_path / "single"), "--threads", "1"], check=True, env=env,
                   capture_output=True)  # fmt: skip
    sharded, single = (
        diffprobe.open_run(tmp_path / "sharded"),
        diffprobe.open_run(tmp_path / "single"),
    )
    assert sharded.complete and single.info["torch_threads"] == 1
    assert np.array_equal(sharded.get("unet.mid_block", 0.2), single.get("unet.mid_block", 0.2))


@pytest.mark.slow
def test_anomalies_paper_tables_on_a_run(tmp_path, sd_model):
    """``analyse_run(paper=True)``: no-resize crops extracted at image_size - 2·border where the
    model takes that size (NaN and the reason where not), rel_norm at the labels at every site
    with the window scaled from the labelled site's grid."""
    import diffprobe
    from diffprobe.data.anomaly_labels import save_label_table
    from diffprobe.data.sources import open_source
    from diffprobe.extract import ExtractionPlan, extract
    from diffprobe.io import read_csv
    from diffprobe.stages.anomalies import analyse_run

    sites = ["unet.mid_block", "unet.up_blocks.1"]  # 8x8 and 16x16 at 32 px
    plan = ExtractionPlan(sites=sites, noise_levels=[0.2], pooling="none", image_size=32)
    run = diffprobe.open_run(extract(sd_model, open_source("shapes:6"), plan, tmp_path / "run",
                                     batch_size=6, progress=False))  # fmt: skip
    labels = {"item": np.array([0, 2]), "item_id": np.array(["a", "b"]),
              "site": np.array(["", ""]), "y": np.array([1, 12]), "x": np.array([2, 0]),
              "image_item": np.array([0, 2]), "image_item_id": np.array(["a", "b"]),
              "image_site": np.array(["", ""])}  # fmt: skip
    table = save_label_table(labels, tmp_path / "labels.npz")
    analyse_run(run, tmp_path / "out", paper=True, corner=False, labels=table, plots=False,
                binnings=(2,), model=sd_model, progress=False)  # fmt: skip
    ratios = {row["site"]: row for row in read_csv(tmp_path / "out" / "token_group_ratios.csv")}
    cropped = diffprobe.open_run(tmp_path / "out" / "cropped-paper-4x4px")
    assert cropped.info["image_size"] == 24
    from diffprobe.analysis.anomalies import to_grid

    expected = token_group_ratios(to_grid(cropped.get("unet.mid_block", 0.2)),
                                  to_grid(run.get("unet.mid_block", 0.2)))  # fmt: skip
    assert float(ratios["unet.mid_block"]["corner_ratio"]) == pytest.approx(
        expected["corner_ratio"], rel=1e-5
    )
    assert ratios["unet.up_blocks.1"]["corner_ratio"] == "nan"
    assert "28 px" in ratios["unet.up_blocks.1"]["note"]
    rel = {row["site"]: row for row in read_csv(tmp_path / "out" / "rel_norm_at_labels.csv")}
    assert rel["unet.up_blocks.1"]["label_grid"] == "16"
    assert (rel["unet.mid_block"]["window"], rel["unet.up_blocks.1"]["window"]) == ("1", "2")
    norms = norm_maps(to_grid(run.get("unet.mid_block", 0.2)))
    by_hand = [norms[0, 0, 1] / norms[0].mean(), norms[2, 6, 0] / norms[2].mean()]
    assert float(rel["unet.mid_block"]["rel_norm_mean"]) == pytest.approx(np.mean(by_hand))
