"""SAEs on generation: activations captured per denoising step, streamed into training without
touching the disk, and the SAE spliced into, steering or ablating a generation (docs/sae.md).

Every token of the site at every timestep of a generation is one vector; the conditional
branch of a CFG batch by default (``branch="cond"``; ``"uncond"``, ``"both"``; a generation
without CFG has one branch, ``"none"``, taken whatever is asked). ``semantics`` says what the
vector is: the site's ``output`` (SAeUron), its ``input``, or ``delta`` = output - input
(sdxl-unbox); it is recorded in the SAE's metadata and the splicing and steering edits act on
the same quantity.

Generations run in chunks of ``batch_items`` prompts: only one chunk's captures are held in
memory, never written. Chunk ``j`` is seeded ``seed + j``, so the same call yields the same
vectors (a training source built here can be replayed: more than one epoch, and resumable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffprobe.hooks.capture import capture
from diffprobe.hooks.editing import edit
from diffprobe.hooks.edits import Apply
from diffprobe.sae.model import SAEError, TopKSAE
from diffprobe.sae.sources import IterableSource, channels_of, to_tokens
from diffprobe.sae.steering import decoder_direction, edit_codes

SEMANTICS = ("output", "input", "delta")
BRANCHES = ("cond", "uncond", "both")


def check_generation_options(site: str, semantics: str, branch: str) -> None:
    """One clear error for an unknown site semantics or branch, or a site with an element."""
    if semantics not in SEMANTICS:
        raise SAEError(
            f"--site-semantics {semantics!r} for '{site}'; expected one of {', '.join(SEMANTICS)}"
        )
    if branch not in BRANCHES:
        raise SAEError(f"--branch {branch!r}; expected one of {', '.join(BRANCHES)}")
    if ":" in site:
        raise SAEError(
            f"site '{site}' names an element; give the module ('unet.up_blocks.1') and "
            "choose input, output or delta with semantics="
        )


def _sites(site: str, semantics: str) -> list[str]:
    return {"output": [site], "input": [f"{site}:input"], "delta": [site, f"{site}:input"]}[
        semantics
    ]


def _chunks(prompts: Sequence[str], batch_items: int) -> list[list[str]]:
    if batch_items < 1:
        raise SAEError(f"batch_items must be at least 1, got {batch_items}")
    return [list(prompts[i : i + batch_items]) for i in range(0, len(prompts), batch_items)]


def _branches(view_branches: tuple[str, ...], wanted: str) -> list[str]:
    if view_branches == ("none",):
        return ["none"]
    return list(view_branches) if wanted == "both" else [wanted]


def _values(cache: Any, site: str, semantics: str, branch: str) -> Iterator[tuple[Tensor, float]]:
    """(items, ...) of each denoiser call, in call order, and its timestep."""
    views = {name: cache.view(name) for name in _sites(site, semantics)}
    first = next(iter(views.values()))
    for call, timestep in enumerate(first.timesteps):
        parts = []
        for name in _branches(first.branches, branch):
            if semantics == "delta":
                out, inp = views[site].branch(name)[call], views[f"{site}:input"].branch(name)[call]
                if out.shape != inp.shape:
                    raise SAEError(
                        f"site '{site}': output {tuple(out.shape)} and input {tuple(inp.shape)} "
                        "differ in shape, so output - input is undefined; use semantics "
                        "'output' or 'input', or a site that keeps its shape (an attention "
                        "block such as 'unet.up_blocks.1.attentions.1')"
                    )
                parts.append(out - inp)
            else:
                parts.append(first.branch(name)[call])
        yield torch.cat(parts), float(timestep)


def generation_timesteps(model: Any, steps: int) -> list[float]:
    """The scheduler's timesteps of a ``steps``-step generation (without running it)."""
    scheduler = type(model.pipe.scheduler).from_config(model.pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return [float(t) for t in scheduler.timesteps]


@dataclass(frozen=True)
class GenerationOptions:
    """How :func:`generation_batches` and :func:`generation_source` generate: ``steps``-step
    generations with ``guidance_scale`` (None: the model's default), ``batch_items`` prompts a
    chunk, chunk ``i`` seeded ``seed + i``; the site's value per ``semantics`` on ``branch``;
    a tqdm bar with ``progress``."""

    semantics: str = "output"
    branch: str = "cond"
    steps: int = 20
    guidance_scale: float | None = None
    seed: int = 0
    batch_items: int = 16
    progress: bool = False


def generation_batches(
    model: Any, site: str, prompts: Sequence[str], **options: Any
) -> Iterator[tuple[Tensor, float]]:
    """Generate ``prompts`` and yield ``(activation (items, ...), timestep)`` for every
    denoiser call of every chunk: the site's value (per ``semantics``) on ``branch``.
    ``options``: the fields of :class:`GenerationOptions`."""
    from tqdm.auto import tqdm

    o = GenerationOptions(**options)
    check_generation_options(site, o.semantics, o.branch)
    chunks = _chunks(prompts, o.batch_items)
    bar = tqdm(total=len(prompts), disable=not o.progress, desc="generate", unit="img",
               file=sys.stderr)  # fmt: skip
    for index, chunk in enumerate(chunks):
        with capture(model, _sites(site, o.semantics), to="cpu") as cache:
            model.generate(chunk, steps=o.steps, guidance_scale=o.guidance_scale,
                           seed=o.seed + index)  # fmt: skip
        yield from _values(cache, site, o.semantics, o.branch)
        bar.update(len(chunk))
    bar.close()


def generation_source(
    model: Any, site: str, prompts: Sequence[str], *, keep_in_memory: bool = False,
    **options: Any,
) -> IterableSource:  # fmt: skip
    """A training / evaluation source streamed from generation (no activation on disk): every
    token of every timestep of ``prompts``' generations, grouped by timestep, with the SAE
    metadata (model, site, branch, timesteps, scheduler, site semantics) filled in. Each epoch
    generates again (the same vectors: fixed seeds); with ``keep_in_memory`` the first pass's
    vectors are kept in memory (never on disk) and replayed by later epochs instead.
    ``options``: the fields of :class:`GenerationOptions`."""
    o = GenerationOptions(**options)
    check_generation_options(site, o.semantics, o.branch)
    prompts = list(prompts)
    if not prompts:
        raise SAEError("generation_source needs at least one prompt")
    guidance = model.default_guidance_scale if o.guidance_scale is None else o.guidance_scale
    o = dataclasses.replace(o, guidance_scale=guidance)
    cfg = model.generation_uses_cfg(guidance)

    kept: list[list] = []  # [the first complete pass] once there is one

    def batches() -> Iterator[tuple[Tensor, float]]:
        if keep_in_memory and kept:
            return iter(kept[0])
        stream = generation_batches(model, site, prompts, **dataclasses.asdict(o))
        return _keeping(stream, kept) if keep_in_memory else stream

    source = IterableSource(batches, name=f"generations of {model.name or 'model'} at {site}")
    timesteps = generation_timesteps(model, o.steps)
    # one 1-step generation of one prompt tells the width and tokens per item
    probe, _ = next(generation_batches(model, site, prompts[:1], semantics=o.semantics,
                                       branch=o.branch, steps=1, guidance_scale=guidance))  # fmt: skip
    tokens_per_call = to_tokens(probe)[0].shape[0]
    source.d_in = channels_of(tuple(probe.shape))
    source.n_tokens = tokens_per_call * len(prompts) * len(timesteps)
    source.metadata = {
        "model_name": getattr(model, "name", None),
        "site": site,
        "hook_name": site,
        "branch": o.branch if cfg else "none",
        "timesteps": timesteps,
        "scheduler": type(model.pipe.scheduler).__name__,
        "site_semantics": o.semantics,
        "generation": {
            "prompts": len(prompts),
            "steps": o.steps,
            "guidance_scale": guidance,
            "seed": o.seed,
            "batch_items": o.batch_items,
        },  # fmt: skip
    }
    describe = {"kind": "generation", **source.metadata, "prompts_sha": _digest(prompts)}
    source.describe = lambda: describe  # type: ignore[method-assign]
    return source


def _keeping(stream: Iterator, kept: list) -> Iterator:
    elements = []
    for element in stream:
        elements.append(element)
        yield element
    kept[:] = [elements]  # only a complete pass is replayed


def _digest(prompts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------- edits on a site


def _semantics_of(sae: TopKSAE, semantics: str | None) -> str:
    semantics = semantics or sae.metadata.get("site_semantics") or "output"
    if semantics not in SEMANTICS:
        raise SAEError(f"site semantics {semantics!r}; expected one of {', '.join(SEMANTICS)}")
    return semantics


@contextlib.contextmanager
def sae_edit(
    model: Any,
    sae: TopKSAE,
    site: str,
    *,
    codes: Callable[[Tensor], Tensor] | None = None,
    keep_error: bool = True,
    semantics: str | None = None,
    branch: str | None = None,
    window: Any = None,
) -> Iterator[None]:
    """Within the block, every forward of ``site`` goes through the SAE: its value (output,
    input or output - input, per ``semantics``, default the SAE's own) is encoded, the dense
    codes ``(tokens, d_sae)`` edited by ``codes`` (None: unchanged), decoded; with
    ``keep_error`` the SAE's error is kept. The site's output becomes ``value + (x^_edited -
    x^)`` (``keep_error``; no edit: the value itself, bit for bit) or the reconstruction
    (``input + x^`` for ``delta``). ``branch`` (None: both CFG halves, as SAeUron's hook) and
    ``window`` restrict it as any edit."""
    semantics = _semantics_of(sae, semantics)
    inputs: dict[str, Tensor] = {}

    def through(value: Tensor, target: Tensor) -> Tensor:
        sae.check_d_in(channels_of(tuple(target.shape)), site)
        tokens, back = to_tokens(target)
        with torch.no_grad():
            if keep_error:
                return value + (back(edit_codes(sae, tokens, codes, keep_error=True)) - target)
            recon = back(edit_codes(sae, tokens, codes, keep_error=False))
        return recon if target is value else value - target + recon

    def on_output(value: Tensor, state: Any) -> Tensor:
        if semantics == "delta":
            inp = inputs[state.branch or "none"]
            return through(value, value - inp)
        return through(value, value)

    def keep_input(value: Tensor, state: Any) -> Tensor:
        inputs[state.branch or "none"] = value
        return value

    if semantics == "input":
        edits = [Apply(f"{site}:input", fn=on_output, branch=branch, window=window)]
    elif semantics == "delta":
        edits = [Apply(f"{site}:input", fn=keep_input, branch=branch, window=window),
                 Apply(site, fn=on_output, branch=branch, window=window)]  # fmt: skip
    else:
        edits = [Apply(site, fn=on_output, branch=branch, window=window)]
    with edit(model, edits):
        yield


def steering_strengths(
    max_activation: np.ndarray | Tensor, timesteps: Sequence[float], scale: float = 500.0
) -> dict[float, float]:
    """The thesis's SAE steering strength per timestep: ``scale x`` the feature's max
    activation at that timestep (``max_activation`` of shape (timesteps,)); 0 where it never
    fired, so steering acts only on the feature's active timesteps."""
    values = np.asarray(max_activation, dtype=np.float64).reshape(-1)
    if len(values) != len(timesteps):
        raise SAEError(
            f"{len(values)} max activations for {len(timesteps)} timesteps; give one per timestep"
        )
    return {float(t): float(scale * v) for t, v in zip(timesteps, values, strict=True)}


@contextlib.contextmanager
def steer_feature(
    model: Any,
    sae: TopKSAE,
    site: str,
    feature: int,
    strength: float | dict[float, float],
    *,
    semantics: str | None = None,
    branch: str | None = None,
    window: Any = None,
) -> Iterator[None]:
    """Within the block, add ``strength x W_dec[feature]`` (a unit vector) to every token of
    ``site`` (its input for an SAE of inputs; its output for output and delta, where adding to
    the output adds to the delta). ``strength`` is one number or one per timestep
    (:func:`steering_strengths`; a timestep missing from it is left alone)."""
    semantics = _semantics_of(sae, semantics)
    direction = decoder_direction(sae, feature)

    def add(value: Tensor, state: Any) -> Tensor:
        sae.check_d_in(channels_of(tuple(value.shape)), site)
        amount = strength.get(float(state.timestep), 0.0) if isinstance(strength, dict) else (
            strength)  # fmt: skip
        if amount == 0.0:
            return value
        tokens, back = to_tokens(value)
        return back(tokens + (amount * direction).to(device=value.device, dtype=value.dtype))

    target = f"{site}:input" if semantics == "input" else site
    with edit(model, Apply(target, fn=add, branch=branch, window=window)):
        yield


def masked_ablation_codes(
    features: Sequence[int], scale: float | Sequence[float], threshold: Any = 0.0
) -> Callable[[Tensor], Tensor]:
    """SAeUron's masked ablation as a code edit for :func:`sae_edit`: the selected features'
    codes are multiplied by ``scale`` on the tokens where they exceed ``threshold``."""
    index = torch.as_tensor(list(features), dtype=torch.long)

    def ablate(codes: Tensor) -> Tensor:
        chosen = index.to(codes.device)
        scales = torch.as_tensor(scale, dtype=codes.dtype, device=codes.device).reshape(-1)
        limits = torch.as_tensor(threshold, dtype=codes.dtype, device=codes.device).reshape(-1)
        selected = codes[:, chosen]
        codes[:, chosen] = torch.where(selected > limits, selected * scales, selected)
        return codes

    return ablate


# ------------------------------------------------------------------------- feature activity


def feature_activity(
    sae: TopKSAE, batches: Any, *, items: int | None = None, progress: bool = False
) -> dict[str, Any]:
    """SAE features (and raw channels) as features, from ``(activation (items, ...), timestep)``
    batches (:func:`generation_batches`): per item and timestep the mean over spatial tokens of
    each latent's code (SAeUron's concept score), of each channel, and the fraction of tokens
    where each latent fires. Returns ``codes`` (items, timesteps, d_sae), ``channels`` (items,
    timesteps, d_in), ``frequency`` (timesteps, d_sae), ``max_activation`` (timesteps, d_sae:
    max over items of the code mean, the steering scale), ``timesteps``."""
    from tqdm.auto import tqdm

    by_t: dict[float, list[tuple[Tensor, Tensor, Tensor]]] = {}
    for value, timestep in tqdm(batches, disable=not progress, desc="activity", file=sys.stderr):
        sae.check_d_in(channels_of(tuple(value.shape)))
        n = value.shape[0]
        tokens, _ = to_tokens(value)
        with torch.no_grad():
            dense = sae.encode(tokens.to(sae.device, sae.dtype)).cpu().reshape(n, -1, sae.d_sae)
        by_t.setdefault(float(timestep), []).append(
            (
                dense.mean(1),
                tokens.reshape(n, -1, tokens.shape[1]).mean(1).float(),
                (dense > 0).float().sum(1),
            )  # fmt: skip
        )
    if not by_t:
        raise SAEError("no activations to measure feature activity on")
    timesteps = list(by_t)
    codes = torch.stack([torch.cat([p[0] for p in by_t[t]]) for t in timesteps], 1)
    channels = torch.stack([torch.cat([p[1] for p in by_t[t]]) for t in timesteps], 1)
    fired = torch.stack([torch.cat([p[2] for p in by_t[t]]).sum(0) for t in timesteps])
    per_item_tokens = to_tokens(value)[0].shape[0] / value.shape[0]
    return {
        "codes": codes.numpy(),
        "channels": channels.numpy(),
        "frequency": (fired / (codes.shape[0] * per_item_tokens)).numpy(),
        "max_activation": codes.amax(0).numpy(),
        "timesteps": timesteps,
    }


def top_examples(activity: np.ndarray, feature: int, n: int = 8) -> list[tuple[int, int, float]]:
    """The ``n`` (item, timestep index, activity) with the largest activity of ``feature`` in an
    (items, timesteps, features) array."""
    values = np.asarray(activity)[:, :, feature]
    order = np.argsort(values, axis=None)[::-1][:n]
    return [(int(i), int(t), float(values[i, t]))
            for i, t in zip(*np.unravel_index(order, values.shape), strict=True)]  # fmt: skip


# ------------------------------------------------------------------------- spliced-in test


def _images(model: Any, prompts: list[str], steps: int, guidance: Any, seed: int, batch: int):
    out = [model.generate(chunk, steps=steps, guidance_scale=guidance, seed=seed + i)
           for i, chunk in enumerate(_chunks(prompts, batch))]  # fmt: skip
    return (np.concatenate(out) * 255).round().astype(np.uint8)


def splice_test(
    model: Any,
    sae: TopKSAE,
    site: str,
    prompts: Sequence[str],
    *,
    steps: int = 20,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_items: int = 16,
    branch: str | None = None,
    factors: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Generate ``prompts`` three times: plainly, with the SAE's reconstruction in place of the
    site's value (``branch`` None: both CFG halves), and with reconstruction + error, which
    must give the plain images exactly. Returns ``pixel_mse`` of the reconstruction's images
    against the plain ones (pixels in [0, 1]), ``error_kept_identical`` and
    ``error_kept_max_abs`` (in 8-bit levels); with shapes-world ``factors`` also the attribute
    reader's accuracy on the plain and reconstructed images."""
    prompts = list(prompts)
    plain = _images(model, prompts, steps, guidance_scale, seed, batch_items)
    with sae_edit(model, sae, site, keep_error=True, branch=branch):
        kept = _images(model, prompts, steps, guidance_scale, seed, batch_items)
    with sae_edit(model, sae, site, keep_error=False, branch=branch):
        recon = _images(model, prompts, steps, guidance_scale, seed, batch_items)
    result: dict[str, Any] = {
        "items": len(prompts),
        "error_kept_identical": bool(np.array_equal(kept, plain)),
        "error_kept_max_abs": int(np.abs(kept.astype(np.int16) - plain).max()),
        "pixel_mse": float(((recon / 255.0 - plain / 255.0) ** 2).mean()),
    }
    if factors is not None:
        from diffprobe.data.attributes import attribute_accuracy

        for name, images in (("plain", plain), ("reconstruction", recon)):
            scores = attribute_accuracy(images, factors)
            result[f"attributes_{name}"] = {k: v for k, v in scores.items()
                                            if isinstance(v, float) and v == v}  # fmt: skip
    return result


# ---------------------------------------------------- on the features API (capture_activity)


def sae_transform(sae: TopKSAE) -> Callable[[Tensor], Tensor]:
    """A capture transform for :func:`diffprobe.features.capture_activity`: ``(items, tokens,
    channels) -> (items, tokens, d_sae)`` dense TopK codes, so the activity run stores the
    SAE's latents (mean over tokens: SAeUron's concept score) as its "channels"."""

    def encode(tokens: Tensor) -> Tensor:
        sae.check_d_in(int(tokens.shape[-1]))
        with torch.no_grad():
            codes = sae.encode(tokens.to(device=sae.device, dtype=sae.dtype))
        return codes.to(tokens.device)

    return encode


def capture_sae_activity(model: Any, prompts: Any, plan: Any, out: Any, saes: dict, **kwargs):
    """:func:`diffprobe.features.capture_activity` with ``saes`` (site -> TopKSAE) encoding
    their sites: the run's arrays for those sites hold latents, named ``sae:<layout>:<path>``
    in its run.json. Only SAEs of the site's output can be read from a capture (an SAE of
    ``delta`` needs output - input: train and splice it with :func:`generation_source`)."""
    from diffprobe.extract.generation import capture_activity

    for site, sae in saes.items():
        if sae.metadata.get("site_semantics", "output") != "output":
            raise SAEError(
                f"the SAE for '{site}' reads the site's {sae.metadata['site_semantics']}; "
                "activity captures read outputs only"
            )
    names = {site: f"sae:{sae.source.get('layout', 'memory')}:{sae.source.get('path', id(sae))}"
             for site, sae in saes.items()}  # fmt: skip
    transforms = {site: sae_transform(sae) for site, sae in saes.items()}
    return capture_activity(model, prompts, plan, out, transforms=transforms,
                            transform_names=names, **kwargs)  # fmt: skip
