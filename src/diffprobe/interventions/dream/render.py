"""The render loop: optimise z so that an objective is maximal (lucid's ``render_vis``).

One step, for z (items, channels, height, width), a float32 leaf:

1. for every (timestep, branch) the objective reads: ``x = transforms(z)`` (each transform in
   order, randomness per item), then one denoiser pass ``model.denoise(x, t, conditioning)``
   inside ``capture(sites, detach=False, stop_early=True)``: the pass ends right after the
   deepest site it reads (bf16 autocast on a GPU);
2. ``total = objective(step)`` per item (penalties read the un-augmented z);
3. ``loss = -sum(total)`` (items are independent), backward, the gradient filters on z's
   gradient in order, one AdamW step (``lr``, ``weight_decay``).

Stats of every step (each leaf's value and the total, per item) and snapshots of z every
``snapshot_every`` steps (and after the last step) are kept; the result decodes them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffprobe.hooks.engine import capture
from diffprobe.hooks.sites import resolve_site
from diffprobe.interventions.dream.objectives import DreamError, Objective, Step
from diffprobe.interventions.dream.param import decode
from diffprobe.interventions.dream.transforms import (
    Draw,
    default_filters,
    default_transforms,
)
from diffprobe.models.noise import item_seed

log = logging.getLogger(__name__)

# the stream of a dream's transforms: item_seed(seed, TRANSFORM_STREAM); its start noise uses
# item_noise(shape, seed, [0])
TRANSFORM_STREAM = 1


@dataclass
class Dream:
    """A render's result for ``items`` dreams.

    ``latents``: final z (items, channels, h, w) float32 on the CPU; ``images``: their decoded
    uint8 (items, H, W, 3) (None without ``decode``); ``snapshots``: step -> z after that many
    steps (0 = the start); ``snapshot_images``: step -> uint8 images; ``stats``: one row per
    (step, item) with each leaf's value (unweighted), ``total`` and the seconds of the step;
    ``leaves`` and ``weights`` name and weigh the terms of the objective."""

    latents: torch.Tensor
    images: np.ndarray | None
    snapshots: dict[int, torch.Tensor]
    snapshot_images: dict[int, np.ndarray]
    stats: list[dict[str, float]]
    leaves: list[str]
    weights: list[float]
    seconds_per_step: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def values(self, name: str) -> np.ndarray:
        """(steps, items) of a stats column."""
        steps = sorted({row["step"] for row in self.stats})
        items = sorted({row["item"] for row in self.stats})
        table = np.full((len(steps), len(items)), np.nan)
        for row in self.stats:
            table[steps.index(row["step"]), items.index(row["item"])] = row[name]
        return table


def leaf_names(objective: Objective) -> list[str]:
    """Unique column names of the objective's leaves (``name``, ``name#2``, ...)."""
    seen: dict[str, int] = defaultdict(int)
    names = []
    for leaf in objective.leaves:
        seen[leaf.name] += 1
        names.append(leaf.name if seen[leaf.name] == 1 else f"{leaf.name}#{seen[leaf.name]}")
    return names


def check_timestep(model: Any, timestep: float, option: str = "timestep") -> float:
    """``timestep`` as a float, or :class:`DreamError` outside the training schedule."""
    steps = model.num_train_timesteps
    last = steps if model.flow_matching else steps - 1
    t = float(timestep)
    if not (0 <= t <= last) or (not model.flow_matching and t != round(t)):
        raise DreamError(
            f"{option} {timestep:g} is outside the schedule: "
            f"{'a number in' if model.flow_matching else 'an integer in'} 0..{last}"
        )
    return t


def pass_plan(
    model: Any, objective: Objective, timestep: float
) -> dict[tuple[float, str], list[str]]:
    """(timestep, branch) -> the sites read there, checked: every site is in the denoiser (a
    denoiser pass that stops early cannot reach another component) and every timestep is in
    the schedule."""
    plan: dict[tuple[float, str], list[str]] = defaultdict(list)
    components = model.module_components
    for reads in objective.reads():
        site, _ = resolve_site(components, reads.site, model.name)
        if site.component != model.denoiser_name:
            raise DreamError(
                f"site '{reads.site}' is in '{site.component}', which a denoiser pass does not "
                f"run: a dream reads sites of '{model.denoiser_name}' (it stops the pass early "
                f"after the deepest one), e.g. '{model.denoiser_name}.mid_block'"
            )
        for t in reads.timesteps or (timestep,):
            key = (check_timestep(model, t), reads.branch)
            if reads.site not in plan[key]:
                plan[key].append(reads.site)
    return dict(plan)


def _conditioning(model: Any, prompt: str, items: int) -> Any:
    return model.encode_prompt([prompt] * items)


def _autocast(model: Any, enabled: bool | None) -> contextlib.AbstractContextManager:
    device = model.device
    on = device.type == "cuda" if enabled is None else enabled
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _add_noise(model: Any):
    def add_noise(x: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        return model.add_noise(x, timestep=t, noise=noise)[0]

    return add_noise


def forward(
    model: Any,
    objective: Objective,
    z: torch.Tensor,
    plan: dict[tuple[float, str], list[str]],
    conditioning: dict[str, Any],
    transforms: Sequence,
    generators: Sequence[torch.Generator],
    timestep: float,
    autocast: bool | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One evaluation of ``objective`` at z: (total (items,), each leaf's value (items,))."""
    activations: dict[tuple[str, float, str], torch.Tensor] = {}
    add_noise = _add_noise(model)
    for (t, branch), sites in plan.items():
        draw = Draw(generators, t, add_noise)
        x = z
        for transform in transforms:
            x = transform(x, draw)
        with capture(model, sites, detach=False, stop_early=True) as cache:
            with _autocast(model, autocast):
                model.denoise(x.to(model.dtype), t, conditioning[branch])
        for site in sites:
            if site not in cache:
                raise DreamError(
                    f"site '{site}' did not fire in the denoiser's forward, so no dream can "
                    "read it; choose a site `diffprobe sites MODEL` lists with a shape"
                )
            activations[(site, t, branch)] = cache.last(site).float()
    return objective.evaluate(Step(activations, z, timestep))


def render(
    model: Any,
    objective: Objective,
    init: torch.Tensor,
    *,
    timestep: float = 0.0,
    seeds: Sequence[int] | None = None,
    prompt: str = "",
    negative: str = "",
    transforms: Sequence | None = None,
    filters: Sequence | None = None,
    steps: int = 100,
    lr: float = 0.05,
    weight_decay: float = 0.01,
    snapshot_every: int = 10,
    autocast: bool | None = None,
    decode_images: bool = True,
    progress: bool = True,
) -> Dream:
    """Maximise ``objective`` over z, starting from ``init`` (items, channels, h, w).

    ``timestep``: where leaves without their own timestep read (the thesis dreams at 0 and at
    each activity peak). ``seeds``: one per item, seeding its transforms (default 0, 1, ...).
    ``prompt`` conditions the ``"cond"`` branch and ``negative`` the ``"uncond"`` branch
    (default: the empty prompt, no CFG, as the thesis). ``transforms`` default to
    :func:`default_transforms` (jitter 1, rotate 5°, scale 1.1, renoise), ``filters`` to
    :func:`default_filters` (spectral, blur σ 0.5 -> 0); pass ``()`` for none. Both are read,
    never changed. ``autocast``: bf16 autocast of the denoiser (default: on for CUDA)."""
    from tqdm.auto import tqdm

    if steps < 1:
        raise DreamError(f"steps {steps}: a dream takes at least 1 step")
    if snapshot_every < 1:
        raise DreamError(f"snapshot_every {snapshot_every}: expected >= 1")
    transforms = tuple(default_transforms() if transforms is None else transforms)
    filters = tuple(default_filters() if filters is None else filters)
    items = len(init)
    seeds = list(range(items)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != items:
        raise DreamError(f"{len(seeds)} seeds for {items} items: give one seed per item")
    timestep = check_timestep(model, timestep)
    plan = pass_plan(model, objective, timestep)
    branches = {branch for _, branch in plan}
    conditioning = {}
    if "cond" in branches:
        conditioning["cond"] = _conditioning(model, prompt, items)
    if "uncond" in branches:
        conditioning["uncond"] = _conditioning(model, negative, items)
    generators = [torch.Generator("cpu").manual_seed(item_seed(s, TRANSFORM_STREAM)) for s in seeds]

    z = init.detach().to(device=model.device, dtype=torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([z], lr=lr, weight_decay=weight_decay)
    names = leaf_names(objective)
    stats: list[dict[str, float]] = []
    snapshots = {0: z.detach().cpu().clone()}
    started = time.perf_counter()
    for step in tqdm(range(steps), desc="dream", unit="step", disable=not progress):
        tick = time.perf_counter()
        total, values = forward(
            model, objective, z, plan, conditioning, transforms, generators, timestep, autocast
        )
        optimizer.zero_grad(set_to_none=True)
        (-total.sum()).backward()
        gradient = z.grad
        for gradient_filter in filters:
            gradient = gradient_filter(gradient, step, steps)
        z.grad = gradient
        optimizer.step()
        if (step + 1) % snapshot_every == 0 or step + 1 == steps:
            snapshots[step + 1] = z.detach().cpu().clone()
        seconds = time.perf_counter() - tick
        table = torch.stack([total.detach(), *[v.detach() for v in values]]).float().cpu()
        for i in range(items):
            row = {"step": step, "item": i, "total": float(table[0, i])}
            row.update({name: float(table[1 + j, i]) for j, name in enumerate(names)})
            row["seconds"] = seconds
            stats.append(row)
    elapsed = time.perf_counter() - started
    latents = z.detach().cpu().clone()
    images = decode(model, latents) if decode_images else None
    snapshot_images = {k: decode(model, v) for k, v in snapshots.items()} if decode_images else {}
    return Dream(
        latents=latents,
        images=images,
        snapshots=snapshots,
        snapshot_images=snapshot_images,
        stats=stats,
        leaves=names,
        weights=list(objective.weights),
        seconds_per_step=elapsed / steps,
        metadata={
            "timestep": timestep, "seeds": seeds, "prompt": prompt, "negative": negative,
            "steps": steps, "lr": lr, "weight_decay": weight_decay,
            "snapshot_every": snapshot_every, "transforms": [repr(t) for t in transforms],
            "filters": [repr(f) for f in filters], "objective": repr(objective),
        },
    )  # fmt: skip


@torch.no_grad()
def measure(
    model: Any,
    objective: Objective,
    z: torch.Tensor,
    *,
    timestep: float = 0.0,
    prompt: str = "",
    negative: str = "",
    noise_seed: int | None = 0,
    samples: int = 1,
    batch_size: int = 32,
    autocast: bool | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The objective at z (items, channels, h, w) without random transforms: each pass sees z
    noised to its timestep with seeded noise (``item_noise(shape, noise_seed + k, items)``,
    averaged over ``samples`` draws k), or z itself when ``noise_seed`` is None. Returns
    (total (items,), each leaf (items,)) on the CPU. Dreams and generated latents are measured
    by the same function, so their values compare."""
    from diffprobe.models.noise import item_noise

    timestep = check_timestep(model, timestep)
    plan = pass_plan(model, objective, timestep)
    totals, leaves = [], []
    for start in range(0, len(z), batch_size):
        chunk = z[start : start + batch_size].to(model.device, torch.float32)
        items = list(range(start, start + len(chunk)))
        conditioning = {
            "cond": _conditioning(model, prompt, len(chunk)),
            "uncond": _conditioning(model, negative, len(chunk)),
        }
        draws = []
        for k in range(samples if noise_seed is not None else 1):

            def noised(x, draw, k=k, items=items):
                if noise_seed is None:
                    return x
                noise = item_noise(x.shape[1:], noise_seed + k, items, device=x.device)
                return model.add_noise(x, timestep=draw.timestep, noise=noise)[0]

            draws.append(
                forward(
                    model, objective, chunk, plan, conditioning, (noised,), [], timestep, autocast
                )  # fmt: skip
            )
        totals.append(torch.stack([d[0] for d in draws]).mean(0).cpu())
        leaves.append([torch.stack([d[1][j] for d in draws]).mean(0).cpu()
                       for j in range(len(objective.leaves))])  # fmt: skip
    return torch.cat(totals), [torch.cat(col) for col in zip(*leaves, strict=True)]
