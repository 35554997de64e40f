"""Deep dream ground truth on ``tiny``: do colour-selective channels dream their colour?

The objective a dream maximises is a channel's activation under the *empty prompt* (the
thesis' setting), so selectivity is measured the same way: shapes-world images of every colour
(``--images`` per colour, drawn by the generator, VAE-encoded), noised to t with seeded noise
and passed through the denoiser with the empty prompt; the selectivity of channel c for colour
k at t is the ROC AUC of its spatial mean at ``--site`` (default ``unet.up_blocks.1``; colour
k against the rest).
(Captured during generation from colour captions instead, as ``dream_tiny.py`` does, a channel
can be selective for the caption's colour *word*, which a dream under the empty prompt never
sees.)

The dream timestep (unless ``--timestep``): among the candidate timesteps >= 100 (where renoise
adds noise of std >= 0.33), the one with the highest mean over colours of the best channel's
AUC. The colours: the ``--colours`` colours whose best channel at that timestep has the
highest AUC, one channel per colour (a channel already taken for a better colour is skipped).

Arms, all from the same ``--seeds`` start latents (images generated from the empty prompt
without guidance, the thesis' priors), seed i starting from start i, thesis defaults (100
steps, AdamW 0.05, TV 0.5, range 0.5, jitter 1, rotate 5 deg, scale 1.1, spectral filter, blur
sigma 0.5 -> 0), with and without renoise:

- ``channel``: for each colour, its most selective channel, one dream per seed;
- ``random``: ``--seeds`` random channels (none of the selected ones), one per seed, the
  baseline of every colour;
- ``direction`` (with renoise only, unless ``--direction-both``): for each colour, the
  diagonal-LDA direction (mean of colour k minus mean of the rest, divided by the per-channel
  variance, unit norm) of the same activations, dreamt with ``dream.direction``.

With ``--sae PATH`` (an SAE of the site, e.g. the one ``benchmarks/sae_tiny.py --stage train``
writes to runs/sae-tiny/sae) the arms are SAE features instead, through ``dream.sae_feature``
with the thesis' SAE settings (TV 0, moment 0.5, range 0.5, no blur): the features named by
``--sae-features`` (default ``2:blue``, the blue feature of docs/sae.md), the ``--sae-best``
features most selective under the dream's view (ROC AUC of the token mean of each feature's
dense pre-activation, the value ``sae_feature`` maximises, on the same noised shapes images at
t; one colour each, best colours first), and ``--seeds`` random live SAE features (pre-activation
> 0 on some of those images, none of the chosen ones; one per seed) as the baseline.

The attribute reader reads every decoded dream and start. Per colour and variant: dreams read
as the colour (selective against random), the one-sided Fisher exact p, the paired sign test
(seeds where only the selective dream is read as the colour against seeds where only the
random one is), and how many dreams turn to the colour from a start that is not read so.

    PYTHONPATH=src nice .venv/bin/python benchmarks/dream_colour.py --seeds 32 --colours 3 \
        --no-direction --tag _thesis --out benchmarks/results/dream_colour_thesis.json \
        --figures docs/figures
    PYTHONPATH=src nice .venv/bin/python benchmarks/dream_colour.py --seeds 32 --colours 3 \
        --lr 0.01 --tag _lr001 --out benchmarks/results/dream_colour_lr001.json \
        --figures docs/figures

    PYTHONPATH=src OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/sae_tiny.py \
        --stage train --threads 1 --work runs/sae-tiny --out benchmarks/out/sae_tiny_retrain.json
    PYTHONPATH=src nice .venv/bin/python benchmarks/dream_colour.py --seeds 32 --timestep 101 \
        --sae runs/sae-tiny/sae --sae-features 2:blue --sae-best 2 --lr 0.01 --tag _sae_lr001 \
        --out benchmarks/results/dream_colour_sae_lr001.json --figures docs/figures

Sites other than ``unet.up_blocks.1`` (``--site``). ``--site auto`` first surveys held-out
selectivity at the ``--survey`` sites (default: conv_in, down_blocks.0.resnets.0, down_blocks.0,
down_blocks.1, up_blocks.1) and candidate timesteps, each colour's images split in halves (the
best channel on the first half, its AUC on the second), and picks by a rule fixed in advance:
the (site, t >= 100) with the highest mean held-out AUC, its ``--colours`` colours with the
highest held-out AUC, one channel each (see :func:`survey`); ``--survey-only`` stops there.
``--mask-shape``: every activation objective (selective and random arms) is averaged over the
start's shape (the reader's core pixels, area-pooled to the site's map) instead of the whole
map. ``--random-directions``: the baseline dreams random unit directions instead of random
channels. ``--start-seed``: a fresh set of start latents (a replication).

    PYTHONPATH=src OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/dream_colour.py \
        --site auto --survey-only --threads 1 --out benchmarks/results/dream_colour_survey.json
    PYTHONPATH=src OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/dream_colour.py \
        --site auto --seeds 64 --start-seed 1 --colours 3 --direction-both --lr 0.02 \
        --threads 1 --tag _convin_confirm_lr002 \
        --out benchmarks/results/dream_colour_convin_confirm_lr002.json --figures docs/figures

SAE features at a site near the input (docs/dream.md, "SAE features at ``unet.conv_in``"):
``--sae-train DIR`` trains a TopK SAE of ``--site`` at ``--timestep`` on shapes images disjoint
from the selectivity images (see :func:`train_site_sae`) and stops; ``--sae-heldout`` picks
the ``--sae-best`` features by the survey's held-out rule (:func:`heldout_pick`; with
``--sae-alive-only`` only among features in some token's TopK); ``--sae-penalties channel``
dreams them with the channel settings (TV 0.5, blur) instead of the thesis' SAE ones;
``--mask-shape`` averages the feature's pre-activation over the start's shape.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/dream_colour.py \
        --site unet.conv_in --timestep 101 --sae-train runs/sae-convin-e40 --sae-epochs 40 \
        --threads 1 --out benchmarks/results/dream_sae_convin_train.json
    PYTHONPATH=src OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/dream_colour.py \
        --site unet.conv_in --timestep 101 --sae runs/sae-convin-e40 --sae-heldout --sae-best 3 \
        --sae-penalties channel --mask-shape --lr 0.05 --seeds 64 --start-seed 1 --threads 1 \
        --tag _sae_convin_mask_lr005 --out benchmarks/results/dream_colour_sae_convin_mask_lr005.json \
        --figures docs/figures

(Results and figures in docs/dream.md; the figure shows the first 16 seeds.)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT_SITE = "unet.up_blocks.1"
CANDIDATE_TIMESTEPS = (1, 51, 101, 201, 301, 501)
SURVEY_SITES = ("unet.conv_in", "unet.down_blocks.0.resnets.0", "unet.down_blocks.0",
                "unet.down_blocks.1", "unet.up_blocks.1")  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def auc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC AUC of ``scores`` (items, features) for boolean labels (items,), Mann-Whitney."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=0)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@torch.no_grad()
def channel_means(model, z: torch.Tensor, timestep: float, site: str, sae=None) -> np.ndarray:
    """(items, channels) spatial means at ``site`` of z noised to ``timestep`` with
    ``item_noise(shape, 0, items)`` under the empty prompt: ``dream.measure``'s view. With
    ``sae``: (items, d_sae) token means of the SAE's dense pre-activations instead, what
    ``dream.sae_feature`` maximises (in chunks of 32 items)."""
    import diffprobe
    from diffprobe.models.noise import item_noise

    noise = item_noise(z.shape[1:], 0, range(len(z)))
    x_t, t = model.add_noise(z, timestep=timestep, noise=noise)
    out = []
    for chunk in torch.split(torch.arange(len(z)), 32):
        with diffprobe.capture(model, site, stop_early=True) as cache:
            model.denoise(x_t[chunk], t[chunk], model.encode_prompt([""] * len(chunk)))
        maps = cache.last(site).float()
        if sae is None:
            out.append(maps.mean((2, 3)))
        else:
            tokens = maps.flatten(2).transpose(1, 2).to(sae.dtype)  # (items, tokens, d_in)
            out.append(sae.pre_acts(tokens).float().mean(1))
    return torch.cat(out).cpu().numpy()


def survey(model, args, z: torch.Tensor, labels: np.ndarray) -> dict:
    """``--site auto``: held-out selectivity at every ``--survey`` site and candidate t, and
    the pick of site, t, colours and channels by a rule fixed before any dream is rendered.

    The images of each colour are split in halves (first half: selection, second: held out).
    Per (site, t, colour): the channel with the highest ROC AUC on the selection half and its
    AUC on the held-out half. The dream's (site, t): the highest mean over colours of that
    held-out AUC among t >= 100 (``--timestep`` fixes t); its colours: the ``--colours`` with
    the highest held-out AUC there (one distinct channel each). The diagonal-LDA direction is
    fitted on the selection half and scored on the held-out half. Sets ``args.site``."""
    from diffprobe.data import shapes

    names = shapes.COLOUR_NAMES
    half = (np.arange(len(labels)) % args.images) < args.images // 2  # True: selection
    sites = [s for s in args.survey.split(",") if s]
    timesteps = CANDIDATE_TIMESTEPS if args.timestep is None else (args.timestep,)
    table: dict = {}
    activity: dict = {}
    for site in sites:
        for t in timesteps:
            a = channel_means(model, z, t, site)  # (items, channels)
            activity[(site, t)] = a
            picks = []
            for k in range(len(names)):
                selection = auc(a[half], labels[half] == k)
                c = int(selection.argmax())
                held = float(auc(a[~half][:, c : c + 1], labels[~half] == k)[0])
                picks.append([c, round(float(selection[c]), 3), round(held, 3)])
            table[(site, t)] = picks
            log(f"  {site} t={t:g}: mean held-out AUC "
                f"{np.mean([p[2] for p in picks]):.3f} ({a.shape[1]} channels)")  # fmt: skip
    eligible = [key for key in table if key[1] >= 100 or args.timestep is not None]
    site, timestep = max(eligible, key=lambda key: np.mean([p[2] for p in table[key]]))
    args.site = site
    picks = table[(site, timestep)]
    a = activity[(site, timestep)]
    chosen, taken = [], set()
    for k in np.argsort([-p[2] for p in picks]):
        selection = auc(a[half], labels[half] == k)
        c = next(int(c) for c in np.argsort(-selection) if int(c) not in taken)
        taken.add(c)
        positive = labels == k
        held = float(auc(a[~half][:, c : c + 1], positive[~half])[0])
        w = (a[half & positive].mean(0) - a[half & ~positive].mean(0)) / a[half].var(0)
        w = w / np.linalg.norm(w)
        chosen.append({"colour": names[k], "colour_index": int(k), "channel": c,
                       "auc": held, "auc_selection": float(selection[c]),
                       "direction": w.astype(np.float32),
                       "direction_auc": float(auc(a[~half] @ w[:, None], positive[~half])[0])})  # fmt: skip
        if len(chosen) == args.colours:
            break
    return {
        "rule": "site, t: highest mean over colours of the held-out AUC of the selection-half "
                "best channel, t >= 100; colours: highest held-out AUC there",
        "site": site, "timestep": timestep, "images_per_colour": args.images,
        "survey": {f"{s} t={t:g}": {"mean_heldout_auc": round(float(np.mean([p[2] for p in v])), 4),
                                    **{names[k]: v[k] for k in range(len(names))}}
                   for (s, t), v in table.items()},
        "chosen": chosen,
    }  # fmt: skip


def selectivity(model, args) -> dict:
    from diffprobe.data import shapes

    names = shapes.COLOUR_NAMES
    images, labels = [], []
    for k, name in enumerate(names):
        images.append(shapes.sample(args.images, seed=20 + k, colour=name, split="all").images)
        labels += [k] * args.images
    labels = np.array(labels)
    log(f"encoding {len(labels)} shapes images")
    with torch.no_grad():
        z = torch.cat([model.encode_images(chunk).float()
                       for chunk in np.array_split(np.concatenate(images), 8)])  # fmt: skip
    if args.site == "auto":
        return survey(model, args, z, labels), z, labels
    activity = {t: channel_means(model, z, t, args.site) for t in CANDIDATE_TIMESTEPS}
    aucs = {t: np.stack([auc(a, labels == k) for k in range(len(names))])
            for t, a in activity.items()}  # fmt: skip  # t -> (colours, channels)
    if args.timestep is None:
        eligible = [t for t in CANDIDATE_TIMESTEPS if t >= 100]
        timestep = max(eligible, key=lambda t: float(aucs[t].max(1).mean()))
    else:
        timestep = args.timestep
        if timestep not in activity:
            activity[timestep] = channel_means(model, z, timestep, args.site)
            aucs[timestep] = np.stack([auc(activity[timestep], labels == k)
                                       for k in range(len(names))])  # fmt: skip
    table = aucs[timestep]
    chosen, taken = [], set()
    for k in np.argsort(-table.max(1)):
        for c in np.argsort(-table[k]):
            if int(c) not in taken:
                chosen.append({"colour": names[k], "colour_index": int(k), "channel": int(c),
                               "auc": float(table[k, c])})  # fmt: skip
                taken.add(int(c))
                break
        if len(chosen) == args.colours:
            break
    a = activity[timestep]
    for entry in chosen:
        positive = labels == entry["colour_index"]
        w = (a[positive].mean(0) - a[~positive].mean(0)) / a.var(0)
        w = w / np.linalg.norm(w)
        entry["direction"] = w.astype(np.float32)
        entry["direction_auc"] = float(auc(a @ w[:, None], positive)[0])
    return {
        "timestep": timestep, "images_per_colour": args.images,
        "best_per_timestep": {str(t): {names[k]: [int(aucs[t][k].argmax()),
                                                  round(float(aucs[t][k].max()), 3)]
                                       for k in range(len(names))} for t in aucs},
        "mean_best_auc": {str(t): float(aucs[t].max(1).mean()) for t in aucs},
        "chosen": chosen,
    }, z, labels  # fmt: skip


def dreams(model, dream, objective, init, seeds, timestep, renoise, args, sae=False) -> np.ndarray:
    """Render in batches of ``batch`` items (``objective(index)`` builds each batch's
    objective); returns the decoded images (items, 64, 64, 3). ``sae``: the thesis' SAE
    settings (TV 0, moment 0.5, no blur) instead of the raw-channel ones."""
    images = []
    for start in range(0, len(init), args.batch):
        index = np.arange(start, min(start + args.batch, len(init)))
        result = dream.render(model, dream.thesis_objective(objective(index), sae=sae),
                              init[index], timestep=timestep, seeds=[seeds[i] for i in index],
                              transforms=dream.default_transforms(renoise),
                              filters=dream.default_filters(0.0 if sae else 0.5),
                              steps=args.steps, lr=args.lr, progress=False)  # fmt: skip
        images.append(result.images)
        log(f"  {index[-1] + 1}/{len(init)} dreams, {result.seconds_per_step:.2f} s/step")
    return np.concatenate(images)


def shape_masks(images: np.ndarray) -> torch.Tensor:
    """(items, 64, 64) float masks of the shape in each uint8 image (items, 64, 64, 3): pixels
    whose distance to the median border colour is at least half the 0.997 quantile of that
    distance (the attribute reader's "core"); all ones where an image has no such pixel."""
    pixels = images.astype(np.float32)
    border = np.concatenate([pixels[:, :4].reshape(len(pixels), -1, 3),
                             pixels[:, -4:].reshape(len(pixels), -1, 3),
                             pixels[:, :, :4].reshape(len(pixels), -1, 3),
                             pixels[:, :, -4:].reshape(len(pixels), -1, 3)], axis=1)  # fmt: skip
    ink = np.linalg.norm(pixels - np.median(border, axis=1)[:, None, None], axis=-1)
    strongest = np.quantile(ink.reshape(len(ink), -1), 0.997, axis=1)
    masks = (ink >= 0.5 * np.maximum(strongest, 1.0)[:, None, None]).astype(np.float32)
    masks[masks.reshape(len(masks), -1).sum(1) == 0] = 1.0
    return torch.from_numpy(masks)


def masked(leaf, masks: torch.Tensor, site: str):
    """``leaf`` (a channel or direction objective of ``site``) with its mean over space
    replaced by the mean over each item's mask (items, H, W), area-resampled to the site's map:
    the activation where the start's shape is."""
    import torch.nn.functional as F

    from diffprobe.interventions.dream.objectives import Leaf

    def value(step):
        activations = dict(step.activations)
        for key, v in step.activations.items():
            if key[0] == site:  # v * m with m of mean 1: the mean over space becomes m-weighted
                m = F.interpolate(masks.to(v.device)[:, None], size=v.shape[-2:], mode="area")
                activations[key] = v * (m / m.mean((2, 3), keepdim=True).clamp_min(1e-8))
        return leaf.value(type(step)(activations, step.z, step.timestep))

    return Leaf(f"masked {leaf.name}", value, leaf.needs)


def counts(read: np.ndarray, random_read: np.ndarray, start_read: np.ndarray, k: int) -> dict:
    from scipy.stats import binomtest, fisher_exact

    hits, random_hits = read == k, random_read == k
    n = len(read)
    only_selective = int((hits & ~random_hits).sum())
    only_random = int((~hits & random_hits).sum())
    discordant = only_selective + only_random
    return {
        "selective": int(hits.sum()), "random": int(random_hits.sum()), "of": n,
        "fisher_p": float(fisher_exact([[hits.sum(), n - hits.sum()],
                                        [random_hits.sum(), n - random_hits.sum()]],
                                       alternative="greater")[1]),
        "pairs_only_selective": only_selective, "pairs_only_random": only_random,
        "sign_test_p": float(binomtest(only_selective, discordant, 0.5, alternative="greater")
                             .pvalue) if discordant else 1.0,
        "turned_selective": int((hits & (start_read != k)).sum()),
        "turned_random": int((random_hits & (start_read != k)).sum()),
        "starts_not_colour": int((start_read != k).sum()),
    }  # fmt: skip


def pooled(rows: list[dict]) -> dict:
    """The colours' counts summed: selective hits against the random arm's hits for each arm's
    colour (the random arm is shared, so its dreams count once per colour); one-sided Fisher."""
    from scipy.stats import fisher_exact

    hits = sum(r["selective"] for r in rows)
    random_hits = sum(r["random"] for r in rows)
    n = sum(r["of"] for r in rows)
    return {
        "selective": hits, "random": random_hits, "of": n,
        "fisher_p": float(fisher_exact([[hits, n - hits], [random_hits, n - random_hits]],
                                       alternative="greater")[1]),
        "pairs_only_selective": sum(r["pairs_only_selective"] for r in rows),
        "pairs_only_random": sum(r["pairs_only_random"] for r in rows),
    }  # fmt: skip


def parse_features(text: str) -> list[tuple[int, str]]:
    """``"2:blue,784:yellow"`` -> [(2, "blue"), (784, "yellow")]."""
    pairs = [item.split(":") for item in text.split(",") if item]
    return [(int(f), colour) for f, colour in pairs]


def train_site_sae(model, args) -> dict:
    """``--sae-train DIR``: a TopK SAE of ``--site`` at ``--timestep`` under the empty prompt,
    trained on every spatial token of ``--sae-train-images`` shapes images per colour drawn
    with seeds 1000 + colour (the selectivity images use 20 + colour: disjoint streams), VAE
    encoded and noised with noise seed 1 (selectivity: 0); expansion ``--sae-expansion``,
    k ``--sae-k``, seed 0. Writes the SAE to DIR; returns its training record."""
    import diffprobe
    from diffprobe.data import shapes
    from diffprobe.models.noise import item_noise
    from diffprobe.sae import train_sae

    images = np.concatenate([shapes.sample(args.sae_train_images, seed=1000 + k, colour=name,
                                           split="all").images
                             for k, name in enumerate(shapes.COLOUR_NAMES)])  # fmt: skip
    with torch.no_grad():
        z = torch.cat([model.encode_images(chunk).float()
                       for chunk in np.array_split(images, 16)])  # fmt: skip
        noise = item_noise(z.shape[1:], 1, range(len(z)))
        x_t, t = model.add_noise(z, timestep=args.timestep, noise=noise)
        tokens = []
        for chunk in torch.split(torch.arange(len(z)), 32):
            with diffprobe.capture(model, args.site, stop_early=True) as cache:
                model.denoise(x_t[chunk], t[chunk], model.encode_prompt([""] * len(chunk)))
            tokens.append(cache.last(args.site).float().flatten(2).transpose(1, 2).flatten(0, 1))
    tokens = torch.cat(tokens)  # (images * H * W, channels)
    log(f"training an SAE on {tuple(tokens.shape)} tokens of {args.site} at t={args.timestep:g}")
    options = dict(expansion=args.sae_expansion, k=args.sae_k, seed=0, batch_size=1024,
                   epochs=args.sae_epochs, aux_alpha=1 / 32, dead_tokens=100_000)  # fmt: skip
    sae = train_sae(tokens, args.sae_train, device="cpu", overwrite=True, progress=False,
                    metadata={"model_name": args.model, "site": args.site, "branch": "cond",
                              "timesteps": [args.timestep]}, **options)  # fmt: skip
    with torch.no_grad():
        reconstruction = sae(tokens).reconstruction
        fvu = float(((reconstruction - tokens) ** 2).sum() / ((tokens - tokens.mean(0)) ** 2).sum())
        fired = torch.zeros(sae.d_sae, dtype=torch.bool)
        codes = sae.encode_sparse(tokens)
        fired[codes.indices[codes.values > 0].unique()] = True
    record = {"path": str(args.sae_train), "tokens": int(len(tokens)), "images": len(images),
              "options": options, "fvu_train": fvu, "fired_on_train": int(fired.sum()),
              "d_sae": sae.d_sae}  # fmt: skip
    log(json.dumps(record))
    return record


def masked_sae_feature(site: str, sae, features, masks: torch.Tensor):
    """``dream.sae_feature`` with its mean over tokens replaced by the mean over each item's
    mask (items, H, W), area-resampled to the site's map (a weighted mean of the dense
    pre-activation, which is not linear in the activations, so ``masked`` does not apply)."""
    import torch.nn.functional as F

    from diffprobe.interventions.dream.objectives import _per_item, _pick, _site_leaf

    index = _per_item(features, "feature")

    def mean(v: torch.Tensor) -> torch.Tensor:
        m = F.interpolate(masks.to(v.device)[:, None], size=v.shape[-2:], mode="area").flatten(1)
        weights = m / m.sum(1, keepdim=True).clamp_min(1e-8)  # (items, tokens)
        codes = sae.pre_acts(v.float().flatten(2).transpose(1, 2).to(sae.dtype)).float()
        return (_pick(codes.transpose(1, 2), index, "feature", site) * weights).sum(-1)

    return _site_leaf(f"masked sae_feature({site})", site, None, "cond", mean)


@torch.no_grad()
def fired_features(model, z: torch.Tensor, timestep: float, site: str, sae) -> np.ndarray:
    """(d_sae,) bool: the SAE features in the TopK of at least one token of ``z`` noised to
    ``timestep`` as :func:`channel_means` does (the alive features)."""
    import diffprobe
    from diffprobe.models.noise import item_noise

    noise = item_noise(z.shape[1:], 0, range(len(z)))
    x_t, t = model.add_noise(z, timestep=timestep, noise=noise)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for chunk in torch.split(torch.arange(len(z)), 32):
        with diffprobe.capture(model, site, stop_early=True) as cache:
            model.denoise(x_t[chunk], t[chunk], model.encode_prompt([""] * len(chunk)))
        tokens = cache.last(site).float().flatten(2).transpose(1, 2).to(sae.dtype)
        codes = sae.encode_sparse(tokens)
        fired[codes.indices[codes.values > 0].unique()] = True
    return fired.numpy()


def heldout_pick(acts: np.ndarray, labels: np.ndarray, images: int, colours: int,
                 allowed: np.ndarray | None = None) -> tuple:  # fmt: skip
    """The held-out rule of :func:`survey` for SAE features: per colour, the feature with the
    highest AUC on the selection half (the first half of each colour's images) and its AUC on
    the held-out half; the ``colours`` colours with the highest held-out AUC, one distinct
    feature each (a taken feature passes to the colour's next best on the selection half).
    ``allowed`` (d_sae,) bool: only these features compete (``--sae-alive-only``)."""
    from diffprobe.data import shapes

    names = shapes.COLOUR_NAMES
    half = (np.arange(len(labels)) % images) < images // 2
    selection = np.stack([auc(acts[half], labels[half] == k) for k in range(len(names))])
    if allowed is not None:
        selection[:, ~allowed] = -np.inf
    held = np.stack([auc(acts[~half], labels[~half] == k) for k in range(len(names))])
    best = selection.argmax(1)
    per_colour = [float(held[k, best[k]]) for k in range(len(names))]
    chosen, taken = [], set()
    for k in np.argsort([-a for a in per_colour]):
        f = next(int(f) for f in np.argsort(-selection[k])
                 if int(f) not in taken and (allowed is None or allowed[f]))  # fmt: skip
        taken.add(f)
        chosen.append({"feature": f, "colour": names[k], "colour_index": int(k), "source": "heldout",
                       "auc": float(held[k, f]), "auc_selection": float(selection[k, f])})  # fmt: skip
        if len(chosen) == colours:
            break
    return chosen, {names[k]: [int(best[k]), round(float(selection[k, best[k]]), 3),
                               round(per_colour[k], 3)] for k in range(len(names))}  # fmt: skip


def sae_variants(model, dream, args, t, z, labels, starts, start_read, out, grids) -> str:
    """The SAE arms: the given features (``--sae-features``) and the ``--sae-best`` features
    most selective under the dream's view (the empty prompt at t), against ``--seeds`` random
    live SAE features from the same starts; thesis SAE settings (TV 0, moment 0.5, range 0.5,
    no blur). Fills ``out`` and ``grids``; returns the JSON text."""
    from diffprobe.data import shapes
    from diffprobe.data.attributes import read_attributes
    from diffprobe.io import write_text
    from diffprobe.sae import load_sae

    names = shapes.COLOUR_NAMES
    sae = load_sae(args.sae)
    log(f"SAE {args.sae}: d_in {sae.d_in}, d_sae {sae.d_sae}, k {sae.k}; selectivity at t={t:g}")
    acts = channel_means(
        model, z, t, args.site, sae=sae
    )  # (items, d_sae): the dream's objective values
    live = (acts > 0).any(0)
    table = np.stack([auc(acts, labels == k) for k in range(len(names))])  # (colours, d_sae)
    ranks = (-table).argsort(1).argsort(1) + 1  # 1 = the colour's most selective feature
    heldout_best = None
    if args.sae_heldout:  # the survey's held-out rule; alive: in some token's TopK
        live = fired_features(model, z, t, args.site, sae)
        chosen, heldout_best = heldout_pick(acts, labels, args.images, args.sae_best,
                                            live if args.sae_alive_only else None)  # fmt: skip
    else:
        chosen = [{"feature": f, "colour": c, "colour_index": names.index(c), "source": "given"}
                  for f, c in parse_features(args.sae_features)]  # fmt: skip
        taken = {e["feature"] for e in chosen}
        for k in np.argsort(-table.max(1))[: args.sae_best]:
            f = next(int(f) for f in np.argsort(-table[k]) if int(f) not in taken)
            chosen.append({"feature": f, "colour": names[k], "colour_index": int(k),
                           "source": "best"})  # fmt: skip
            taken.add(f)
    taken = {e["feature"] for e in chosen}
    for e in chosen:
        k, f = e["colour_index"], e["feature"]
        e.setdefault("auc", float(table[k, f]))
        e.update(auc_all=float(table[k, f]), rank=int(ranks[k, f]), live=bool(live[f]))
    log("SAE arms: " + ", ".join(f"feature {e['feature']} ({e['colour']}, AUC {e['auc']:.2f}, "
                                 f"rank {e['rank']})" for e in chosen))  # fmt: skip
    n = args.seeds
    seeds = list(range(n))
    pool = [f for f in np.flatnonzero(live) if int(f) not in taken]
    random_features = [int(f) for f in np.random.default_rng(1).choice(pool, size=n, replace=False)]
    out["sae"] = {
        "path": str(args.sae), "d_sae": sae.d_sae, "k": sae.k, "timestep": t,
        "live_features": int(live.sum()), "chosen": chosen, "random_features": random_features,
        "best_per_colour": {names[k]: [int(table[k].argmax()), round(float(table[k].max()), 3)]
                            for k in range(len(names))},
        "heldout_best_per_colour": heldout_best, "penalties": args.sae_penalties,
        "mask_shape": args.mask_shape,
    }  # fmt: skip
    sae_settings = args.sae_penalties == "sae"
    masks = shape_masks(grids["start"]) if args.mask_shape else None

    def leaf(index):
        features = [targets[j] for j in index]
        if masks is None:
            return dream.sae_feature(args.site, sae, features)
        return masked_sae_feature(args.site, sae, features, masks[[dream_seeds[j] for j in index]])

    targets = [e["feature"] for e in chosen for _ in seeds] + random_features
    dream_seeds = seeds * (len(chosen) + 1)
    init = starts[np.array(dream_seeds)]
    for renoise in (True, False):
        name = "renoise" if renoise else "no_renoise"
        log(f"{name}: {len(targets)} SAE feature dreams at t={t:g}")
        images = dreams(model, dream, leaf, init, dream_seeds, t, renoise, args, sae=sae_settings)
        read = read_attributes(images)["colour"]
        random_read = read[len(chosen) * n :]
        variant = {"random_colours": [names[i] if i >= 0 else "none" for i in random_read]}
        grids[f"{name}: random features"] = images[len(chosen) * n :]
        for j, e in enumerate(chosen):
            label = f"feature {e['feature']} ({e['colour']})"
            variant[label] = counts(read[j * n : (j + 1) * n], random_read, start_read,
                                    e["colour_index"])  # fmt: skip
            grids[f"{name}: f {e['feature']} ({e['colour']})"] = images[j * n : (j + 1) * n]
        variant["pooled features"] = pooled([v for key, v in variant.items()
                                             if key.startswith("feature")])  # fmt: skip
        out["variants"][name] = variant
        log(json.dumps(variant, indent=1))
        text = json.dumps(out, indent=2)
        if args.out:
            write_text(args.out, text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--site", default=DEFAULT_SITE,
                        help="the dreamt site; 'auto': pick it (and t) from --survey by held-out AUC")  # fmt: skip
    parser.add_argument("--survey", default=",".join(SURVEY_SITES),
                        help="sites whose held-out selectivity --site auto compares")  # fmt: skip
    parser.add_argument("--survey-only", action="store_true",
                        help="print the selectivity survey and stop (no dreams)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--start-seed", type=int, default=0,
                        help="seed of the start latents (a fresh set of starts for a replication)")  # fmt: skip
    parser.add_argument("--random-directions", action="store_true",
                        help="the baseline arm dreams random unit directions, not random channels")  # fmt: skip
    parser.add_argument("--mask-shape", action="store_true",
                        help="objectives average over the start's shape, not the whole map")  # fmt: skip
    parser.add_argument("--colours", type=int, default=3)
    parser.add_argument("--images", type=int, default=32, help="shapes images per colour")
    parser.add_argument("--timestep", type=float, default=None)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05, help="AdamW lr (thesis: 0.05)")
    parser.add_argument("--tag", default="", help="suffix of the figure's file name")
    parser.add_argument("--direction-both", action="store_true")
    parser.add_argument("--no-direction", action="store_true")
    parser.add_argument("--sae", type=Path, default=None,
                        help="dream this SAE's features instead of channels")  # fmt: skip
    parser.add_argument("--sae-features", default="2:blue",
                        help="FEATURE:colour,... dreamt with --sae (docs/sae.md: 2 is blue)")  # fmt: skip
    parser.add_argument("--sae-best", type=int, default=1,
                        help="also the N colours' features most selective under the dream's view")  # fmt: skip
    parser.add_argument("--sae-heldout", action="store_true",
                        help="--sae-best features by the survey's held-out rule (no --sae-features)")  # fmt: skip
    parser.add_argument("--sae-alive-only", action="store_true",
                        help="--sae-heldout picks only among alive features (in some token's TopK)")  # fmt: skip
    parser.add_argument("--sae-penalties", choices=("sae", "channel"), default="sae",
                        help="thesis SAE settings (TV 0, moment 0.5, no blur) or the channel ones")  # fmt: skip
    parser.add_argument("--sae-train", type=Path, default=None,
                        help="train an SAE of --site at --timestep into this folder and stop")  # fmt: skip
    parser.add_argument("--sae-train-images", type=int, default=64, help="per colour")
    parser.add_argument("--sae-expansion", type=int, default=8)
    parser.add_argument("--sae-k", type=int, default=4)
    parser.add_argument("--sae-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--figures", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import diffprobe
    from diffprobe.data import shapes
    from diffprobe.data.attributes import read_attributes
    from diffprobe.interventions import dream

    names = shapes.COLOUR_NAMES
    started = time.perf_counter()
    model = diffprobe.load(args.model)
    if args.sae_train:
        record = train_site_sae(model, args)
        if args.out:
            from diffprobe.io import write_text

            write_text(args.out, json.dumps(record, indent=1) + "\n")
        return
    chosen_info, z, labels = selectivity(model, args)
    t, chosen = chosen_info["timestep"], chosen_info["chosen"]
    if args.survey_only:
        text = json.dumps({**chosen_info, "chosen": [{k: v for k, v in c.items() if k != "direction"}
                                                      for c in chosen]}, indent=1)  # fmt: skip
        print(text)
        if args.out:
            from diffprobe.io import write_text

            write_text(args.out, text + "\n")
        return
    log(f"t={t:g}: " + ", ".join(f"{c['colour']} ch {c['channel']} (AUC {c['auc']:.2f}, "
                                 f"direction {c['direction_auc']:.2f})" for c in chosen))  # fmt: skip
    n = args.seeds
    seeds = list(range(n))
    rng = np.random.default_rng(0)
    width = len(chosen[0]["direction"])
    others = [c for c in range(width) if c not in {e["channel"] for e in chosen}]
    random_channels = [int(c) for c in rng.choice(others, size=n, replace=n > len(others))]
    log(f"generating {n} empty-prompt start latents")
    starts = model.generate([""] * n, steps=25, guidance_scale=1.0, seed=args.start_seed,
                            output_type="latent").float().cpu()  # fmt: skip
    start_images = dream.decode(model, starts)
    start_read = read_attributes(start_images)["colour"]
    out: dict = {
        "model": args.model, "site": args.site, "args": {k: str(v) for k, v in vars(args).items()},
        "selectivity": {**chosen_info, "chosen": [{k: v for k, v in c.items() if k != "direction"}
                                                  for c in chosen]},
        "directions": {c["colour"]: [round(float(v), 5) for v in c["direction"]] for c in chosen},
        "random_channels": random_channels,
        "start_colours": [names[i] if i >= 0 else "none" for i in start_read], "variants": {},
    }  # fmt: skip
    grids: dict = {"start": start_images}
    if args.sae:
        text = sae_variants(model, dream, args, t, z, labels, starts, start_read, out, grids)
    else:
        masks = shape_masks(start_images) if args.mask_shape else None

        def objective(leaf, start_index):
            """``leaf``, or with --mask-shape its mean over the shapes of the starts."""
            return leaf if masks is None else masked(leaf, masks[start_index], args.site)

        channel_targets = [c["channel"] for c in chosen for _ in seeds] + random_channels
        first_random = len(chosen) * n
        if args.random_directions:  # unit Gaussian directions of the site's width, one per seed
            random_vectors = torch.from_numpy(np.random.default_rng(2).standard_normal((n, width)))
            random_vectors = (random_vectors / random_vectors.norm(dim=1, keepdim=True)).float()
            out["random_directions"] = True

        def arm_leaf(index):
            """The channel objective of a batch, or (--random-directions) the random arm's
            random directions; a batch never mixes the two (the arms are multiples of n)."""
            if args.random_directions:
                if index[0] < first_random <= index[-1]:
                    raise ValueError("a batch mixes selective channels and random directions: "
                                     "make --seeds a multiple of --batch")  # fmt: skip
                if index[0] >= first_random:
                    return dream.direction(args.site, random_vectors[index - first_random])
            return dream.channel(args.site, [channel_targets[j] for j in index])

        channel_seeds = seeds * (len(chosen) + 1)
        channel_init = starts[np.array(channel_seeds)]
        for renoise in (True, False):
            name = "renoise" if renoise else "no_renoise"
            log(f"{name}: {len(channel_targets)} channel dreams at t={t:g}")
            images = dreams(model, dream, lambda i: objective(arm_leaf(i), [channel_seeds[j] for j in i]),
                            channel_init, channel_seeds, t, renoise, args)  # fmt: skip
            read = read_attributes(images)["colour"]
            random_read = read[len(chosen) * n :]
            variant = {"random_colours": [names[i] if i >= 0 else "none" for i in random_read]}
            grids[f"{name}: random"] = images[len(chosen) * n :]
            for j, c in enumerate(chosen):
                block = read[j * n : (j + 1) * n]
                variant[f"channel {c['channel']} ({c['colour']})"] = counts(
                    block, random_read, start_read, c["colour_index"])  # fmt: skip
                grids[f"{name}: ch {c['channel']} ({c['colour']})"] = images[j * n : (j + 1) * n]
            if renoise or args.direction_both:
                if not args.no_direction:
                    vectors = torch.from_numpy(
                        np.stack([c["direction"] for c in chosen for _ in seeds])
                    )
                    init = starts[np.array(seeds * len(chosen))]
                    log(f"{name}: {len(vectors)} direction dreams")
                    images = dreams(model, dream, lambda i, v=vectors: objective(dream.direction(args.site, v[i]),
                                                                                 [seeds[j % n] for j in i]),
                                    init, seeds * len(chosen), t, renoise, args)  # fmt: skip
                    read = read_attributes(images)["colour"]
                    for j, c in enumerate(chosen):
                        variant[f"direction ({c['colour']})"] = counts(
                            read[j * n : (j + 1) * n], random_read, start_read, c["colour_index"]
                        )
                        grids[f"{name}: dir ({c['colour']})"] = images[j * n : (j + 1) * n]
            for arm in ("channel", "direction"):
                rows = [v for key, v in variant.items() if key.startswith(arm)]
                if rows:
                    variant[f"pooled {arm}s"] = pooled(rows)
            out["variants"][name] = variant
            log(json.dumps(variant, indent=1))
            out["seconds"] = time.perf_counter() - started
            text = json.dumps(out, indent=2)
            if args.out:
                from diffprobe.io import write_text

                write_text(args.out, text + "\n")
    print(text)
    if args.figures:
        from diffprobe.io import atomic_path
        from diffprobe.report.dream import dream_grid

        args.figures.mkdir(parents=True, exist_ok=True)
        shown = min(n, 16)
        grid = dream_grid([(label, list(imgs[:shown])) for label, imgs in grids.items()],
                          [f"seed {s}" for s in seeds[:shown]],
                          f"tiny {args.site}, t={t:g}, lr {args.lr:g}: colour-selective vs random")  # fmt: skip
        with atomic_path(args.figures / f"dream_colour_grid{args.tag}.png", record=False) as tmp:
            grid.save(tmp, format="PNG")


if __name__ == "__main__":
    main()
