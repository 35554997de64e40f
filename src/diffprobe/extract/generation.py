"""Capture during generation: per site, denoiser call (timestep) and CFG branch, the activation
reduced over space / tokens per channel, while the native pipeline generates; stored in the run
format (docs/features.md).

Items are (prompt, seed) pairs, prompts outer: item ``p * len(seeds) + s`` is prompt ``p``
generated with seed ``seeds[s]``, exactly ``model.generate(prompt, seed=seed)`` (one generator
per item, so neither batch size, chunking nor shards change an image beyond batch rounding).

Layout of an activity run::

    RUN/
      run.json                        provenance: model, sites, prompts, seeds, schedule, ...
      features.zarr/<site>/<branch>   (items, timesteps, channels): the mean over space/tokens
      features.zarr/<site>/<branch>.max   the max over space/tokens (with reductions mean,max)
      images/000012.png               the generated image of item 12
      progress/chunk-000003.done      written once every array and image of chunk 3 is complete

``<branch>`` is ``cond`` or ``uncond`` with classifier-free guidance, ``none`` without (guidance
1, Turbo, unconditional models): a single pass is stored as ``none``, never as ``cond``.
Values: (items, C, H, W) maps reduce over H, W; (items, tokens, C) sequences over tokens (DiT
blocks' default element holds only the image tokens); (items, C) vectors are stored as they are.
A per-site ``transform`` maps (items, tokens, channels) -> (items, tokens, features) before the
reduction (an SAE's encoder: its latents are then stored as the "channels").
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffprobe.errors import DiffprobeError
from diffprobe.extract.plan import check_batching, check_denoiser_sites
from diffprobe.extract.store import (
    FEATURES,
    PROGRESS,
    RUN_JSON,
    ChunkedRun,
    RunStore,
    site_key,
)
from diffprobe.hooks.engine import capture
from diffprobe.io import check_output, claim_output, versions, write_bytes, write_json

log = logging.getLogger(__name__)

ACTIVITY_KIND = "features"
ACTIVITY_FORMAT = "diffprobe-activity/1"
REDUCTIONS = ("mean", "max")
BRANCH_CHOICES = ("cond", "uncond", "both")
IMAGES = "images"
RUN_ENTRIES = (RUN_JSON, FEATURES, PROGRESS, IMAGES)
Transform = Callable[[torch.Tensor], torch.Tensor]


class ActivityError(DiffprobeError):
    """A capture that cannot run, or an activity run that cannot be read."""


@dataclass
class ActivityPlan:
    """What :func:`capture_activity` records.

    ``branches``: ``"cond"`` (default), ``"uncond"`` or ``"both"``; without CFG the one pass is
    stored as ``"none"`` whatever is asked (``"uncond"`` is then refused). ``guidance_scale``
    None is the family's default; ``negative_prompt`` is the unconditional branch's prompt
    (the pipeline's default, the empty prompt, when None)."""

    sites: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 25
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    reductions: tuple[str, ...] = ("mean",)
    branches: str = "cond"
    size: int | None = None
    chunk_items: int = 16
    store_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.sites = list(self.sites)
        if not self.sites:
            raise ActivityError("--sites: give at least one site, e.g. unet.mid_block")
        if len(set(self.sites)) != len(self.sites):
            twice = sorted({s for s in self.sites if self.sites.count(s) > 1})
            raise ActivityError(f"--sites names {', '.join(twice)} twice; give each site once")
        self.reductions = tuple(self.reductions)
        if (
            not self.reductions
            or "mean" not in self.reductions
            or any(r not in REDUCTIONS for r in self.reductions)
        ):
            raise ActivityError(
                f"--reduce {','.join(self.reductions)!r}: expected 'mean' or 'mean,max' (the mean "
                "over space/tokens is always stored; max optionally)"
            )
        self.reductions = tuple(r for r in REDUCTIONS if r in self.reductions)
        if self.branches not in BRANCH_CHOICES:
            raise ActivityError(
                f"--branch {self.branches!r}: expected one of {', '.join(BRANCH_CHOICES)}"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ActivityError(f"--steps {self.steps}: the sampler needs at least 1 step")
        seeds = list(self.seeds)
        if not seeds or any(
            isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds
        ):
            raise ActivityError(f"--seeds {self.seeds!r}: give integers >= 0, such as 0,1,2")
        if len(set(seeds)) != len(seeds):
            raise ActivityError(f"--seeds {self.seeds!r}: a seed is given twice")
        self.seeds = [int(s) for s in seeds]
        if self.guidance_scale is not None and not (
            np.isfinite(self.guidance_scale) and self.guidance_scale >= 0
        ):
            raise ActivityError(f"--guidance {self.guidance_scale}: a finite number >= 0")
        if self.chunk_items < 1:
            raise ActivityError(f"--chunk-items {self.chunk_items}: at least 1")
        if self.store_dtype not in ("float32", "float16"):
            raise ActivityError(f"store dtype {self.store_dtype!r}: float32 or float16")


# -- prompts ------------------------------------------------------------------------------------


@dataclass
class Prompts:
    """The prompt list of a capture: ``texts``; ``factors`` per prompt for the shapes world's
    captions (its factor indices), else None; ``description`` for provenance."""

    texts: list[str]
    description: str
    factors: list[dict] | None = None


def read_prompts(spec: str | Path | Sequence[str]) -> Prompts:
    """``shapes:N`` (the first N captions of the shapes world's train stream, seed 0), a text
    file (one prompt a line; blank lines dropped; ``""`` written as an empty line is not
    possible: use a list), or a list of strings."""
    if not isinstance(spec, (str, Path)):
        texts = list(spec)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ActivityError("prompts: give a non-empty list of strings")
        return Prompts(texts, f"{len(texts)} prompts given in Python")
    text = str(spec)
    if text.startswith("shapes:"):
        from diffprobe.data import shapes

        count = text.removeprefix("shapes:")
        if not count.isdigit() or int(count) < 1:
            raise ActivityError(
                f"--prompts {text!r}: expected shapes:N with N >= 1 (the first N shapes captions)"
            )
        sample = shapes.sample(int(count), seed=0, split="train")
        factors = [sample.item(i) for i in range(len(sample))]
        return Prompts(list(sample.captions), f"shapes world captions, train split seed 0, "
                       f"items 0..{int(count) - 1}", factors)  # fmt: skip
    path = Path(text)
    if not path.is_file():
        raise ActivityError(
            f"--prompts {text}: no such file; give a text file with one prompt a line, or "
            "shapes:N for the shapes world's captions"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ActivityError(f"--prompts {text}: not a UTF-8 text file") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise ActivityError(f"--prompts {text}: the file holds no prompts (one prompt a line)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return Prompts(texts, f"prompt file {path.name} (sha256 {digest})")


# -- the reduction ------------------------------------------------------------------------------


def tokens_of(value: torch.Tensor) -> torch.Tensor:
    """(items, C, H, W) -> (items, H·W, C); (items, tokens, C) as it is; (items, C) ->
    (items, 1, C)."""
    if value.dim() == 4:
        return value.flatten(2).transpose(1, 2)
    if value.dim() == 3:
        return value
    if value.dim() == 2:
        return value[:, None]
    raise ActivityError(f"a site's value of shape {tuple(value.shape)} has no channel axis")


def reducer(reductions: Sequence[str], transform: Transform | None = None) -> Transform:
    """The function applied on the device to a site's value of one denoiser call:
    -> (items, reductions, channels) float32."""

    def reduce(value: torch.Tensor) -> torch.Tensor:
        if transform is None and value.dim() == 4:
            value = value.float()
            parts = [value.mean((2, 3)) if r == "mean" else value.amax((2, 3)) for r in reductions]
        else:
            tokens = tokens_of(value)
            if transform is not None:
                tokens = transform(tokens)
                if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
                    raise ActivityError(
                        "a capture transform must map (items, tokens, channels) to (items, "
                        f"tokens, features), got {getattr(tokens, 'shape', type(tokens))}"
                    )
            tokens = tokens.float()
            parts = [tokens.mean(1) if r == "mean" else tokens.amax(1) for r in reductions]
        return torch.stack(parts, 1)

    return reduce


def array_name(site: str, branch: str, reduction: str = "mean") -> str:
    """Path of an activity array inside ``features.zarr``."""
    suffix = "" if reduction == "mean" else f".{reduction}"
    return f"{site_key(site)}/{branch}{suffix}"


# -- the engine ---------------------------------------------------------------------------------


def _stored_branches(plan: ActivityPlan, uses_cfg: bool) -> list[str]:
    if not uses_cfg:
        if plan.branches == "uncond" or plan.branches == "both":
            raise ActivityError(
                f"--branch {plan.branches}: this generation runs without classifier-free "
                "guidance (guidance <= 1 or a guidance-distilled model), so there is no "
                "unconditional branch; leave --branch cond (stored as 'none')"
            )
        return ["none"]
    return ["uncond", "cond"] if plan.branches == "both" else [plan.branches]


def generate_batch(
    model,
    prompts: list[str],
    seeds: list[int],
    plan: ActivityPlan,
    reduce: dict[str, Transform],
    branches: list[str],
) -> tuple[np.ndarray, dict[tuple[str, str], torch.Tensor], list[float]]:
    """Generate one batch with the capture open: (images uint8 (items, H, W, 3),
    {(site, branch): (items, timesteps, reductions, channels)}, timesteps)."""
    extra = {}
    if plan.negative_prompt is not None:
        extra["negative_prompt"] = [plan.negative_prompt] * len(prompts)
    with capture(model, plan.sites, reduce=reduce) as cache:
        images = model.generate(
            prompts, steps=plan.steps, guidance_scale=plan.guidance_scale, seed=seeds,
            size=plan.size, output_type="np", **extra,
        )  # fmt: skip
    values, timesteps = {}, None
    for site in plan.sites:
        for branch in branches:
            records = [r for r in cache.records(site) if r.branch == branch and r.call is not None]
            if not records:
                held = ", ".join(cache.branches(site)) if site in cache else "nothing"
                raise ActivityError(
                    f"site '{site}' recorded no {branch!r} branch during generation (it holds "
                    f"{held}); is it a denoiser site?"
                )
            values[site, branch] = torch.stack([r.value for r in records], 1)
            found = [float(r.timestep) for r in records]
            if timesteps is None:
                timesteps = found
            elif found != timesteps:
                raise ActivityError(f"site '{site}' fired at other timesteps than the others")
    pixels = np.clip(np.asarray(images) * 255 + 0.5, 0, 255).astype(np.uint8)
    return pixels, values, timesteps or []


def _check_sites(model, plan: ActivityPlan) -> None:
    check_denoiser_sites(model, plan.sites, ActivityError,
                         "activity over timesteps is captured at denoiser sites (see diffprobe "
                         "sites MODEL)")  # fmt: skip


def _model_info(model) -> dict:
    from diffprobe.extract.engine import _model_info as info

    return info(model)


def _identity(info: dict) -> str:
    keys = ("model", "sites", "prompts", "seeds", "schedule", "reductions", "branches",
            "transforms", "chunk_items", "store_dtype")  # fmt: skip
    blob = json.dumps({k: info.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def capture_activity(
    model,
    prompts: str | Path | Sequence[str],
    plan: ActivityPlan,
    out: str | Path,
    *,
    transforms: Mapping[str, Transform] | None = None,
    transform_names: Mapping[str, str] | None = None,
    batch_size: int = 8,
    shard: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate every (prompt, seed) item with the native pipeline and store per site, timestep
    and branch the activation reduced over space/tokens (module docstring); returns the run
    folder. Re-running the same call resumes (finished chunks are skipped); ``shard=(i, n)``
    fills every n-th chunk. ``transforms``: site -> function (items, tokens, channels) ->
    (items, tokens, features), named in run.json by ``transform_names`` (default: the
    function's qualified name); a run resumes only with the same names."""
    from tqdm.auto import tqdm

    check_batching(batch_size, shard)
    source = read_prompts(prompts)
    _check_sites(model, plan)
    transforms = dict(transforms or {})
    unknown = sorted(set(transforms) - set(plan.sites))
    if unknown:
        raise ActivityError(f"transforms for {', '.join(unknown)}, which are not in the sites")
    names = {
        site: (transform_names or {}).get(site) or getattr(fn, "__qualname__", repr(fn))
        for site, fn in transforms.items()
    }
    size = plan.size or model.resolution
    model.check_size(size)
    guidance = model.default_guidance_scale if plan.guidance_scale is None else plan.guidance_scale
    uses_cfg = guidance is not None and model.generation_uses_cfg(guidance)
    branches = _stored_branches(plan, uses_cfg)
    root = Path(out)
    check_output(root, ACTIVITY_KIND, overwrite=overwrite)

    items = [
        {"id": p * len(plan.seeds) + s, "prompt": text, "seed": seed, "prompt_index": p,
         "image": f"{IMAGES}/{p * len(plan.seeds) + s:06d}.png"}
        | ({"factors": source.factors[p]} if source.factors else {})
        for p, text in enumerate(source.texts)
        for s, seed in enumerate(plan.seeds)
    ]  # fmt: skip
    info = {
        "format": ACTIVITY_FORMAT,
        "kind": ACTIVITY_KIND,
        "model": _model_info(model),
        "sites": list(plan.sites),
        "prompts": {"description": source.description, "count": len(source.texts)},
        "seeds": plan.seeds,
        "schedule": {
            "scheduler": type(model.pipe.scheduler).__name__,
            "steps": plan.steps,
            "guidance_scale": guidance,
            "cfg": uses_cfg,
            "negative_prompt": plan.negative_prompt,
            "image_size": size,
            "num_train_timesteps": model.num_train_timesteps,
        },
        "reductions": list(plan.reductions),
        "reduction_axes": "mean/max over H, W of (items, C, H, W) maps; over tokens of "
        "(items, tokens, C) sequences",
        "branches": branches,
        "transforms": names,
        "chunk_items": plan.chunk_items,
        "store_dtype": plan.store_dtype,
        "items": items,
        "versions": versions(),
    }
    info["identity"] = _identity(info)
    existing = _read_json(root / RUN_JSON)
    if existing and existing.get("identity") == info["identity"]:
        info["timesteps"] = existing.get("timesteps")
    elif existing and not overwrite and any((root / PROGRESS).glob("chunk-*.done")):
        raise ActivityError(
            f"{root} already holds a different capture (model, sites, prompts, seeds, schedule "
            "or reductions differ); choose another --out or pass --overwrite"
        )
    else:
        overwrite = overwrite or bool(existing)
    claim_output(root, ACTIVITY_KIND, overwrite=overwrite, entries=RUN_ENTRIES)
    write_json(root / RUN_JSON, info)
    (root / IMAGES).mkdir(exist_ok=True)
    store = RunStore(root)

    reduce = {site: reducer(plan.reductions, transforms.get(site)) for site in plan.sites}
    n_items = len(items)
    chunks = [k for k in range(-(-n_items // plan.chunk_items)) if k % shard[1] == shard[0]]
    todo = [k for k in chunks if not store.is_done(k)]
    if len(todo) < len(chunks):
        log.info("resuming %s: %d of %d chunks already done", root, len(chunks) - len(todo),
                 len(chunks))  # fmt: skip
    bar = tqdm(total=sum(min(plan.chunk_items, n_items - k * plan.chunk_items) for k in todo),
               disable=not progress, desc="features", unit="image", file=sys.stderr)  # fmt: skip
    for k in todo:
        indices = list(range(k * plan.chunk_items, min((k + 1) * plan.chunk_items, n_items)))
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(indices), batch_size):
            batch = [items[i] for i in indices[start : start + batch_size]]
            with torch.inference_mode():
                pixels, values, timesteps = generate_batch(
                    model, [b["prompt"] for b in batch], [b["seed"] for b in batch], plan,
                    reduce, branches,
                )  # fmt: skip
            if info.get("timesteps") is None:
                info["timesteps"] = timesteps
                write_json(root / RUN_JSON, info)
            elif [round(t, 6) for t in info["timesteps"]] != [round(t, 6) for t in timesteps]:
                raise ActivityError(
                    f"the generation ran timesteps {timesteps}, the run holds "
                    f"{info['timesteps']}; the scheduler changed: capture into a new folder"
                )
            for (site, branch), value in values.items():
                host = value.cpu().numpy()  # (items, timesteps, reductions, channels)
                for r, reduction in enumerate(plan.reductions):
                    parts.setdefault(array_name(site, branch, reduction), []).append(host[:, :, r])
            for item, image in zip(batch, pixels, strict=True):
                write_bytes(root / item["image"], _png(image), record=False)
            bar.update(len(batch))
        chunk = {path: np.concatenate(v) for path, v in parts.items()}
        store.write_rows(chunk, indices[0], n_items, plan.chunk_items, plan.store_dtype)
        store.mark_done(k, {"items": [indices[0], indices[-1] + 1],
                            "shard": f"{shard[0]}/{shard[1]}"})  # fmt: skip
    bar.close()
    return root


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


# -- reading ------------------------------------------------------------------------------------


@dataclass
class ActivityRun(ChunkedRun):
    """Reader of an activity run (:func:`open_activity`)."""

    @property
    def branches(self) -> list[str]:
        """The stored branches: ``["cond"]`` by default with CFG, ``["none"]`` without."""
        return list(self.info["branches"])

    @property
    def reductions(self) -> list[str]:
        return list(self.info["reductions"])

    @property
    def timesteps(self) -> np.ndarray:
        """The denoiser's timestep of each stored call, in generation order (high to low)."""
        if not self.info.get("timesteps"):
            raise ActivityError(f"activity run {self.root} has no finished batch yet")
        return np.asarray(self.info["timesteps"], dtype=np.float64)

    @property
    def items(self) -> list[dict]:
        return self.info["items"]

    @property
    def prompts(self) -> list[str]:
        return [item["prompt"] for item in self.items]

    def default_branch(self) -> str:
        return "cond" if "cond" in self.branches else self.branches[0]

    def get(
        self,
        site: str,
        branch: str | None = None,
        reduction: str = "mean",
        allow_incomplete: bool = False,
    ) -> np.ndarray:
        """Activity (items, timesteps, channels) of one site, branch (default: ``cond``, or
        ``none`` without CFG) and reduction (``mean`` or ``max``)."""
        import zarr

        branch = branch or self.default_branch()
        if site not in self.sites:
            raise ActivityError(
                f"site '{site}' is not in {self.root}; it has {', '.join(self.sites)}"
            )
        if branch not in self.branches:
            raise ActivityError(
                f"branch {branch!r} is not in {self.root}; it has {', '.join(self.branches)}"
            )
        if reduction not in self.reductions:
            raise ActivityError(
                f"reduction {reduction!r} is not in {self.root}; it has "
                f"{', '.join(self.reductions)} (capture with --reduce mean,max)"
            )
        if not allow_incomplete and not self.complete:
            raise ActivityError(
                f"activity run {self.root} is incomplete ({self.chunks_done} of "
                f"{self.n_chunks} chunks); run the same capture command again to finish it"
            )
        group = zarr.open_group(str(self.root / FEATURES), mode="r", zarr_format=3)
        return np.asarray(group[array_name(site, branch, reduction)][...], dtype=np.float32)

    def image_path(self, item: int) -> Path:
        return self.root / self.items[item]["image"]

    def images(self, items: Sequence[int]) -> np.ndarray:
        """uint8 (len(items), H, W, 3) of the generated images."""
        from PIL import Image

        return np.stack([np.asarray(Image.open(self.image_path(i)).convert("RGB"))
                         for i in items])  # fmt: skip

    def describe(self) -> dict:
        return {"root": str(self.root), "sites": self.sites, "branches": self.branches,
                "items": len(self.items), "timesteps": len(self.info.get("timesteps") or []),
                "complete": self.complete}  # fmt: skip


def open_activity(root: str | Path) -> ActivityRun:
    """Open a folder written by :func:`capture_activity` (``diffprobe features capture``)."""
    root = Path(root)
    if not root.is_dir():
        raise ActivityError(
            f"{root} is not a folder; pass a run written by diffprobe features capture"
        )
    info = _read_json(root / RUN_JSON)
    if info is None:
        raise ActivityError(f"{root} is not a diffprobe run folder (no {RUN_JSON})")
    if info.get("format") != ACTIVITY_FORMAT:
        what = info.get("format", "no format") if info else "a damaged run.json"
        raise ActivityError(
            f"{root} holds no feature captures ({what}, not {ACTIVITY_FORMAT}); capture "
            "activity with diffprobe features capture first"
        )
    for name, kind in (("sites", list), ("branches", list), ("items", list),
                       ("chunk_items", int), ("reductions", list)):  # fmt: skip
        if not isinstance(info.get(name), kind):
            raise ActivityError(f"{root}/{RUN_JSON} lacks or has a malformed {name!r}")
    return ActivityRun(root, info)


def plan_dict(plan: ActivityPlan) -> dict:
    return asdict(plan)
