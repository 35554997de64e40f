"""The dream stage: dream many channels (or SAE features) of one site at once, batched, and
write the folder::

    OUT/dream.json                    settings, the per-dream summary, file names
    OUT/summary.csv                   target, timestep, seed, initial / final objective
    OUT/channel_0003/grid.png         rows (timestep, seed), columns snapshot steps
    OUT/channel_0003/timestep_0000/   seed_0.png ..., latents.safetensors (final z and its
                                      start, (seeds, C, h, w)), stats.json, stats.csv,
                                      snapshots/seed_0_step_0010.png ...

(``feature_00012/`` for SAE features.) Initial and final values come from
:func:`~diffprobe.interventions.dream.render.measure` (no random transforms; z noised to t with
seeded noise when dreams are renoised), so they compare with the same function on any latent.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffprobe.hooks.engine import capture
from diffprobe.interventions import dream as dr
from diffprobe.interventions.dream.render import pass_plan
from diffprobe.io import (
    atomic_path,
    claim_output,
    versions,
    write_bytes,
    write_csv,
    write_json,
)
from diffprobe.report.dream import dream_grid

log = logging.getLogger(__name__)

DREAM_KIND = "dream"


@dataclass
class DreamSettings:
    """The loop and the regularisers (defaults: the thesis', see docs/dream.md)."""

    steps: int = 100
    lr: float = 0.05
    weight_decay: float = 0.01
    snapshot_every: int = 10
    tv: float = 0.5
    range_weight: float = 0.5
    range_threshold: float = 3.0
    moment: float = 0.0
    jitter: int = 1
    rotate: float = 5.0
    scale: float = 1.1
    renoise: bool = True
    spectral: bool = True
    sigma: float = 0.5
    blur_kernel: int = 9
    prompt: str = ""

    def transforms(self) -> tuple:
        chain: list = [dr.Jitter(self.jitter), dr.Affine(self.rotate, (1.0, self.scale))]
        return (*chain, dr.Renoise()) if self.renoise else tuple(chain)

    def filters(self) -> tuple:
        chain: list = [dr.Spectral()] if self.spectral else []
        if self.sigma > 0:
            chain.append(dr.GaussianBlur(self.blur_kernel, (self.sigma, 0.0)))
        return tuple(chain)

    def objective(self, activation: dr.Objective) -> dr.Objective:
        objective = activation
        for weight, penalty in ((self.tv, dr.total_variation()),
                                (self.range_weight, dr.range_penalty(self.range_threshold)),
                                (self.moment, dr.moment())):  # fmt: skip
            if weight:
                objective = objective - weight * penalty
        return objective


def site_width(model: Any, site: str, timestep: float, size: int | None = None) -> int:
    """Channels of ``site`` (one no-grad pass, stopped after it); :class:`DreamError` when a
    denoiser pass does not reach it."""
    shape = dr.input_shape(model, size)
    probe = dr.channel(site, 0)
    pass_plan(model, probe, timestep)
    cond = model.encode_prompt([""])
    with torch.no_grad(), capture(model, site, stop_early=True) as cache:
        model.denoise(torch.zeros(1, *shape, device=model.device, dtype=model.dtype), timestep,
                      cond)  # fmt: skip
    if site not in cache:
        raise dr.DreamError(f"site '{site}' did not fire in the denoiser's forward; choose a "
                            "site `diffprobe sites MODEL` lists with a shape")  # fmt: skip
    value = cache.last(site)
    return int(value.shape[1] if value.dim() != 3 else value.shape[2])


def _activation(site: str, targets: list[int], sae: Any) -> dr.Objective:
    if sae is not None:
        return dr.sae_feature(site, sae, targets)
    return dr.channel(site, targets)


def dream_targets(
    model: Any,
    site: str,
    targets: Sequence[int],
    timesteps: Mapping[int, Sequence[float]],
    seeds: Sequence[int],
    out: str | Path,
    *,
    sae: Any = None,
    prior: torch.Tensor | None = None,
    settings: DreamSettings | None = None,
    batch_size: int = 16,
    size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    sae_path: str | None = None,
) -> dict[str, Any]:
    """Dream every target (channel, or SAE feature with ``sae``) of ``site`` at each of its
    ``timesteps[target]``, once per seed, ``batch_size`` dreams per render; write ``out``.

    ``prior``: start latents (n, C, h, w); dream j of a target starts from ``prior[j % n]``
    instead of seeded noise. Returns the ``dream.json`` payload."""
    from tqdm.auto import tqdm

    settings = settings or DreamSettings()
    kind = "feature" if sae is not None else "channel"
    shape = dr.input_shape(model, size)
    all_timesteps = sorted({float(t) for ts in timesteps.values() for t in ts})
    for t in all_timesteps:
        dr.check_timestep(model, t, "--timesteps")
    width = site_width(model, site, all_timesteps[0], size)
    if sae is not None:
        sae.check_d_in(width, site)
        limit, what = sae.d_sae, "the SAE has latents"
    else:
        limit, what = width, f"'{site}' has channels"
    for target in targets:
        if not 0 <= target < limit:
            raise dr.DreamError(f"--{kind} {target} is out of range: {what} 0 to {limit - 1}")
    out = claim_output(out, DREAM_KIND, overwrite=overwrite)

    jobs = [(t, target, seed) for target in targets for t in sorted(set(timesteps[target]))
            for seed in seeds]  # fmt: skip
    by_time: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for t, target, seed in jobs:
        by_time[float(t)].append((target, seed))
    results: dict[tuple[int, float], dict[str, Any]] = defaultdict(dict)
    summary = []
    bar = tqdm(total=len(jobs), desc=f"dream {kind}s", unit="dream", disable=not progress)
    for t, pairs in by_time.items():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            chunk_targets = [target for target, _ in chunk]
            chunk_seeds = [seed for _, seed in chunk]
            if prior is not None:
                init = torch.stack([prior[seeds.index(s) % len(prior)] for s in chunk_seeds])
            else:
                init = dr.noise_init(shape, chunk_seeds)
            activation = _activation(site, chunk_targets, sae)
            objective = settings.objective(activation)
            result = dr.render(
                model, objective, init, timestep=t, seeds=chunk_seeds, prompt=settings.prompt,
                transforms=settings.transforms(), filters=settings.filters(), steps=settings.steps,
                lr=settings.lr, weight_decay=settings.weight_decay,
                snapshot_every=settings.snapshot_every, progress=False,
            )  # fmt: skip
            noise_seed = 0 if settings.renoise else None
            initial, _ = dr.measure(model, activation, init, timestep=t, prompt=settings.prompt,
                                    noise_seed=noise_seed)  # fmt: skip
            final, _ = dr.measure(model, activation, result.latents, timestep=t,
                                  prompt=settings.prompt, noise_seed=noise_seed)  # fmt: skip
            for i, (target, seed) in enumerate(chunk):
                rows = [dict(r, item=0) for r in result.stats if r["item"] == i]
                entry = {
                    "latent": result.latents[i], "start": init[i], "image": result.images[i],
                    "snapshots": {k: v[i] for k, v in result.snapshot_images.items()},
                    "stats": rows,
                }  # fmt: skip
                results[(target, t)][seed] = entry
                summary.append({kind: target, "timestep": t, "seed": seed,
                                "initial": float(initial[i]), "final": float(final[i]),
                                "seconds_per_step": result.seconds_per_step})  # fmt: skip
            bar.update(len(chunk))
    bar.close()

    files = _write(out, kind, results, targets, timesteps, seeds, result.leaves)
    payload = {
        "model": getattr(model, "name", None), "site": site, "kind": kind, "targets": list(targets),
        "timesteps": {str(k): [float(t) for t in v] for k, v in timesteps.items()},
        "seeds": list(seeds), "sae": sae_path, "prior": prior is not None,
        "settings": vars(settings), "objective": repr(settings.objective(_activation(
            site, list(targets[:1]), sae))), "leaves": result.leaves,
        "weights": result.weights, "summary": summary, "files": files, "versions": versions(),
    }  # fmt: skip
    write_csv(out / "summary.csv", summary, [kind, "timestep", "seed", "initial", "final",
                                             "seconds_per_step"])  # fmt: skip
    write_json(out / "dream.json", payload)
    return payload


def target_folder(kind: str, target: int) -> str:
    return f"{kind}_{target:05d}" if kind == "feature" else f"{kind}_{target:04d}"


def _write(out: Path, kind: str, results: dict, targets, timesteps, seeds, leaves) -> list[str]:
    from PIL import Image
    from safetensors.torch import save

    files = []
    for target in targets:
        folder = out / target_folder(kind, target)
        grid_rows, columns = [], None
        for t in sorted(set(float(v) for v in timesteps[target])):
            entries = results[(target, t)]
            leaf = folder / f"timestep_{int(round(t)):04d}"
            latents = torch.stack([entries[s]["latent"] for s in seeds]).contiguous()
            starts = torch.stack([entries[s]["start"] for s in seeds]).contiguous()
            tensors = {"latents": latents, "start": starts}
            metadata = {"seeds": ",".join(map(str, seeds))}
            write_bytes(leaf / "latents.safetensors", save(tensors, metadata=metadata))
            rows = []
            for s in seeds:
                _png(Image.fromarray(entries[s]["image"]), leaf / f"seed_{s}.png")
                for step, image in entries[s]["snapshots"].items():
                    _png(
                        Image.fromarray(image), leaf / "snapshots" / f"seed_{s}_step_{step:04d}.png"
                    )
                rows.extend(dict(r, seed=s) for r in entries[s]["stats"])
                steps = sorted(entries[s]["snapshots"])
                columns = [f"step {k}" for k in steps]
                grid_rows.append((f"t={t:g} s={s}", [entries[s]["snapshots"][k] for k in steps]))
            fields = ["step", "seed", *leaves, "total", "seconds"]
            write_json(leaf / "stats.json", [{k: r[k] for k in fields} for r in rows])
            write_csv(leaf / "stats.csv", [{k: r[k] for k in fields} for r in rows], fields)
            files.append(str(leaf.relative_to(out)))
        title = f"{kind} {target}"
        _png(dream_grid(grid_rows, columns, title), folder / "grid.png")
    return files


def _png(image: Any, path: Path) -> None:
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")
