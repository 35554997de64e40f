"""The SAE parts of benchmarks/dream_colour.py: the masked SAE-feature objective and the
held-out pick, against direct computations."""

import importlib.util
from pathlib import Path

import numpy as np
import torch

from diffprobe.data import shapes
from diffprobe.interventions import dream
from diffprobe.interventions.dream.objectives import Step

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dream_colour.py"


def load_script():
    spec = importlib.util.spec_from_file_location("dream_colour", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_masked_sae_feature_is_the_masked_mean_pre_activation():
    from diffprobe.sae import TopKSAE

    script = load_script()
    sae = TopKSAE(5, 12, 3, seed=1)
    acts = torch.randn(2, 5, 4, 4)
    step = Step({("s", 0.0, "cond"): acts}, torch.zeros(2), 0.0)
    # all-ones masks at image size: the plain objective
    ones = torch.ones(2, 8, 8)
    torch.testing.assert_close(
        script.masked_sae_feature("s", sae, [7, 2], ones)(step),
        dream.sae_feature("s", sae, [7, 2])(step),
    )
    # item 0: the top-left 2x2 image pixels (= token (0, 0) of the 4x4 map after area
    # pooling, weight 1); item 1: the left half (tokens of columns 0, 1)
    masks = torch.zeros(2, 8, 8)
    masks[0, :2, :2] = 1
    masks[1, :, :4] = 1
    pre = torch.relu(
        torch.nn.functional.linear(
            acts.flatten(2).transpose(1, 2) - sae.b_dec, sae.encoder, sae.b_enc
        )
    ).reshape(2, 4, 4, 12)
    expected = torch.stack([pre[0, 0, 0, 7], pre[1, :, :2, 2].mean()])
    torch.testing.assert_close(script.masked_sae_feature("s", sae, [7, 2], masks)(step), expected)


def test_heldout_pick_selects_on_one_half_and_scores_on_the_other():
    script = load_script()
    rng = np.random.default_rng(0)
    images = 8  # per colour; first 4 of each colour: selection half
    labels = np.repeat(np.arange(8), images)
    acts = rng.standard_normal((len(labels), 6))
    selection = (np.arange(len(labels)) % images) < images // 2
    # feature 3 separates colour 2 perfectly on the selection half only (noise held out);
    # feature 5 separates colour 4 perfectly on both halves
    acts[selection & (labels == 2), 3] += 100
    acts[labels == 4, 5] += 100
    chosen, best = script.heldout_pick(acts, labels, images, 1)
    names = shapes.COLOUR_NAMES
    # colour 4: the highest held-out AUC, so the one colour picked
    assert [(c["colour_index"], c["feature"], c["auc"]) for c in chosen] == [(4, 5, 1.0)]
    # colour 2: feature 3 wins the selection half (AUC 1) but is scored on the held-out
    # half, where it is noise
    feature, auc_selection, auc_heldout = best[names[2]]
    assert (feature, auc_selection) == (3, 1.0)
    positive = labels[~selection] == 2
    assert auc_heldout == round(float(script.auc(acts[~selection][:, 3:4], positive)[0]), 3)
    assert auc_heldout < 0.9


def test_heldout_pick_skips_features_not_allowed():
    script = load_script()
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(8), 8)
    acts = rng.standard_normal((len(labels), 6))
    acts[labels == 4, 5] += 100
    acts[labels == 4, 1] += 50  # the runner-up for colour 4
    allowed = np.ones(6, dtype=bool)
    allowed[5] = False
    chosen, best = script.heldout_pick(acts, labels, 8, 3, allowed)
    assert 5 not in {c["feature"] for c in chosen}
    assert best[shapes.COLOUR_NAMES[4]][0] == 1
