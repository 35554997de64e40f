"""What an extraction computes: the sites, the noise grid (noise levels or timesteps), the
conditions (empty prompt, label template, captions, a fixed prompt; CFG branches), pooling, seed,
image size and chunking — validated when built, before any model work or folder is touched.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from diffprobe.data.sources import Source
from diffprobe.errors import DiffprobeError
from diffprobe.extract.store import noise_key

if TYPE_CHECKING:
    from diffprobe.models.base import Model

POOLINGS = ("none", "mean", "max")
CONDITION_KINDS = ("empty", "template", "captions", "prompt")
# the store's dtypes: numpy has no bfloat16, and integers would quantise features to a few values
STORE_DTYPES = ("float32", "float16")


class ExtractionError(DiffprobeError):
    pass


@dataclass(frozen=True)
class Condition:
    """How items are conditioned.

    ``kind``: ``"empty"`` (the empty prompt), ``"template"`` (``template`` with ``{label}``
    filled from the item label), ``"captions"`` (each item's caption, from the data or a file),
    ``"prompt"`` (one fixed prompt ``template`` for every item). With ``guidance_scale`` > 1 the
    denoiser runs the CFG batch [uncond "", cond] and both halves are stored separately.
    """

    name: str
    kind: str = "empty"
    template: str | None = None
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in CONDITION_KINDS:
            raise ExtractionError(
                f"condition '{self.name}': unknown kind {self.kind!r} (--condition "
                f"{self.kind}); expected one of {', '.join(CONDITION_KINDS)}"
            )
        if self.kind in ("template", "prompt") and not self.template:
            example = "a photo of a {label}" if self.kind == "template" else "a red circle"
            raise ExtractionError(
                f"condition '{self.name}' (--condition {self.kind}) needs its text: pass "
                f"--template '{example}'"
            )
        if self.kind == "template":
            _check_template(self.template)
        guidance = self.guidance_scale
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
            raise ExtractionError(f"guidance scale {guidance!r} (--guidance-scale) is not a number")
        if not math.isfinite(guidance) or guidance < 0:
            raise ExtractionError(
                f"guidance scale {guidance:g} (--guidance-scale {guidance:g}) must be a finite "
                "number >= 0; values above 1 store the cond and uncond branches, 1 (the default) "
                "runs without classifier-free guidance"
            )

    def prompts(
        self, source: Source, indices: Sequence[int], captions: list[str] | None
    ) -> list[str]:
        if self.kind == "empty":
            return [""] * len(indices)
        if self.kind == "prompt":
            return [self.template or ""] * len(indices)
        if self.kind == "template":
            return [self.template.format(label=source.items[i].label) for i in indices]
        if self.kind == "captions":
            if captions is not None:
                return [captions[i] for i in indices]
            found = [source.items[i].caption for i in indices]
            if any(c is None for c in found):
                raise ExtractionError(
                    f"condition '{self.name}' needs captions, but items of {source.description} "
                    "have none; pass a captions file (--captions FILE)"
                )
            return found
        raise ExtractionError(f"unknown condition kind {self.kind!r}")

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def stored_names(self) -> list[str]:
        return [f"{self.name}.uncond", f"{self.name}.cond"] if self.uses_cfg else [self.name]


def _check_template(template: str) -> None:
    """A label template must name ``{label}`` and no other field, so every item's prompt can be
    filled in (and items of different labels get different prompts)."""
    hint = "write it as e.g. --template 'a photo of a {label}'"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ExtractionError(
            f"--template {template!r} is not a valid template ({err}); {hint} (double a brace, "
            "{{ or }}, to write it literally)"
        ) from None
    other = [f for f in fields if f != "label"]
    if other:
        raise ExtractionError(
            f"--template {template!r} names {{{other[0]}}}, but only {{label}} is filled in "
            f"(from each item's label); {hint}"
        )
    if not fields:
        raise ExtractionError(
            f"--template {template!r} has no {{label}}, so every item would get the same "
            f"prompt; {hint}, or use --condition prompt for one fixed prompt"
        )


def parse_grid(text: str | None, option: str = "--noise") -> list[float] | None:
    """``"0,0.1,0.5"`` (``--noise`` or ``--timesteps``) -> ``[0.0, 0.1, 0.5]``; None stays None.
    The values are checked by :class:`ExtractionPlan`."""
    if text is None:
        return None
    words = [w for w in text.replace(" ", "").split(",") if w]
    if not words:
        raise ExtractionError(
            f"{option} {text!r} holds no values; give comma-separated numbers such as "
            + ("0,0.1,0.5" if option == "--noise" else "0,100,500")
        )
    values = []
    for word in words:
        try:
            values.append(float(word))
        except ValueError:
            raise ExtractionError(
                f"{option} {text!r}: {word!r} is not a number; give comma-separated numbers "
                "such as " + ("0,0.1,0.5" if option == "--noise" else "0,100,500")
            ) from None
    return values


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (``--shard``) -> ``(i, n)``, checked (:func:`check_batching`)."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ExtractionError(
            f"--shard {text!r} is not of the form i/n (e.g. 0/4: this process fills every 4th "
            "chunk, starting with chunk 0)"
        ) from None
    check_batching(1, (index, count))
    return index, count


def check_batching(batch_size: int, shard: tuple[int, int]) -> None:
    """Raise :class:`ExtractionError` unless ``batch_size`` >= 1 and ``shard`` is ``(i, n)``
    with 0 <= i < n."""
    index, count = shard
    if count < 1:
        raise ExtractionError(
            f"--shard {index}/{count}: the shard count n of i/n must be at least 1"
        )
    if not 0 <= index < count:
        raise ExtractionError(
            f"--shard {index}/{count}: the shard index i of i/n runs from 0 to n - 1 "
            f"(0..{count - 1} here)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExtractionError(f"--batch-size {batch_size}: the batch size must be at least 1")


def pool_fn(pooling: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Spatial / token pooling applied on the device before features leave it.

    (items, C, H, W) maps pool over H, W; (items, tokens, C) sequences over tokens. For DiT
    blocks the default element holds only the image tokens, so pooling never mixes text and
    image tokens (capture ``:encoder_hidden_states`` for the text stream)."""
    if pooling not in POOLINGS:
        raise ExtractionError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    if pooling == "none":
        return None

    def reduce(value: torch.Tensor) -> torch.Tensor:
        if value.dim() == 4:
            dims = (2, 3)
        elif value.dim() == 3:
            dims = (1,)
        else:
            return value
        if pooling == "mean":
            return value.float().mean(dim=dims)
        return value.float().amax(dim=dims)

    return reduce


PROTOCOLS = ("default", "alignment-paper")


def img2img_start(noise_level: float, steps: int) -> int:
    """diffusers img2img's start index: ``steps - min(int(steps · strength), steps)``."""
    return steps - min(int(steps * noise_level), steps)


def img2img_timestep(model: Model, noise_level: float, steps: int = 100) -> float:
    """The timestep of the first denoiser call of diffusers' img2img pipeline at strength
    ``noise_level`` with ``steps`` inference steps: ``scheduler.timesteps[(steps -
    int(steps·p)) · order]`` of a copy of the model's own scheduler (SD-2.1's DDIM, leading
    spacing: p = 0.01, 0.05, 0.2, 0.5 -> 1, 41, 191, 491)."""
    start = img2img_start(noise_level, steps)
    if start >= steps:
        raise ExtractionError(
            f"noise level {noise_level:g} with --protocol alignment-paper gives int({steps} · "
            f"{noise_level:g}) = 0 img2img steps (no denoiser call); give a level >= {1 / steps:g}"
        )
    scheduler = type(model.pipe.scheduler).from_config(model.pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return float(scheduler.timesteps[start * getattr(scheduler, "order", 1)])


def protocol_noise(shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The alignment paper's draws, the same for every image: one CPU generator seeded with
    ``seed`` gives first the VAE posterior's standard normal sample, then the noise, each of
    ``shape`` (the latent's, without the item axis), float32 (img2img's order of draws)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    posterior = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return posterior, noise


@dataclass
class ExtractionPlan:
    sites: list[str]
    noise_levels: list[float] | None = None
    timesteps: list[float] | None = None
    conditions: list[Condition] = field(default_factory=lambda: [Condition("empty")])
    pooling: str = "mean"
    seed: int = 0
    image_size: int | None = None
    chunk_items: int = 32
    store_dtype: str = "float32"
    # convolutions, linear layers and group norms one item at a time (diffprobe.determinism):
    # the stored values are then the same bits at every --batch-size, at a cost in speed
    batch_invariant: bool = False
    # "default" (docs/noise.md: t = round(p·T), VAE posterior mean, noise drawn per item) or
    # "alignment-paper" (docs/alignment.md: img2img with protocol_steps scheduler steps, its
    # first timestep, a VAE posterior sample and one noise tensor shared by every item)
    protocol: str = "default"
    protocol_steps: int = 100

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ExtractionError(
                f"--protocol {self.protocol!r} is not a protocol; expected one of "
                f"{', '.join(PROTOCOLS)}"
            )
        if self.protocol == "alignment-paper":
            if self.noise_levels is None:
                raise ExtractionError(
                    "--protocol alignment-paper takes noise levels (--noise, the img2img "
                    "strength, e.g. 0.01,0.05,0.2,0.5), not --timesteps"
                )
            steps = self.protocol_steps
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ExtractionError(
                    f"--protocol-steps {steps!r}: the img2img step count is an integer >= 1"
                )
        if self.noise_levels is None and self.timesteps is None:
            raise ExtractionError(
                "no noise grid: give one of noise levels (--noise, fractions of the schedule "
                "in [0, 1], e.g. --noise 0,0.1,0.5) and timesteps (--timesteps, e.g. "
                "--timesteps 0,100,500)"
            )
        if self.noise_levels is not None and self.timesteps is not None:
            raise ExtractionError(
                "give noise levels (--noise) or timesteps (--timesteps), not both"
            )
        self._check_grid()
        if not self.sites:
            raise ExtractionError("no sites given (--sites); `diffprobe sites MODEL` lists them")
        seen: set[str] = set()
        for site in self.sites:
            if site in seen:
                raise ExtractionError(
                    f"site '{site}' is given twice (--sites); give each site once"
                )
            seen.add(site)
        if not self.conditions:
            raise ExtractionError("no conditions given; the default is the empty prompt")
        if len(set(c.name for c in self.conditions)) != len(self.conditions):
            raise ExtractionError("condition names must be unique")
        if self.pooling not in POOLINGS:
            raise ExtractionError(
                f"--pooling {self.pooling!r} is not a pooling; expected one of "
                f"{', '.join(POOLINGS)}"
            )
        for option, value in (("--seed", self.seed), ("--chunk-items", self.chunk_items)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ExtractionError(f"{option} {value!r} is not an integer")
        if self.seed < 0:
            raise ExtractionError(f"--seed {self.seed}: the seed must be an integer >= 0")
        if self.chunk_items < 1:
            raise ExtractionError(
                f"--chunk-items {self.chunk_items}: a chunk must hold at least 1 item"
            )
        size = self.image_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ExtractionError(
                f"--size {size}: the image size is a positive number of pixels (leave it out "
                "for the model's native size)"
            )
        if self.store_dtype not in STORE_DTYPES:
            raise ExtractionError(
                f"--store-dtype {self.store_dtype!r} is not a store dtype; expected one of "
                f"{', '.join(STORE_DTYPES)} (features are floating point: an integer or 8-bit "
                "dtype would round them to a few values)"
            )

    def _check_grid(self) -> None:
        """Each noise level in [0, 1] and each timestep >= 0, finite, and each given once (the
        model's schedule is checked by :func:`extract`, which knows it)."""
        option = "--noise" if self.noise_levels is not None else "--timesteps"
        what = "noise level" if self.noise_levels is not None else "timestep"
        grid = self.noise_levels if self.noise_levels is not None else self.timesteps
        if not grid:
            raise ExtractionError(f"{option} holds no {what}s; give at least one")
        keys: dict[str, float] = {}
        for value in grid:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ExtractionError(f"{what} {value!r} ({option}) is not a number")
            if self.noise_levels is not None and not 0.0 <= value <= 1.0:
                raise ExtractionError(
                    f"noise level {value:g} (--noise) is outside [0, 1]: a noise level is a "
                    "fraction of the training schedule (0 clean, 1 pure noise); for a "
                    "timestep use --timesteps"
                )
            if self.timesteps is not None and not (math.isfinite(value) and value >= 0):
                raise ExtractionError(
                    f"timestep {value:g} (--timesteps) is outside the schedule: timesteps run "
                    "from 0 to the model's num_train_timesteps - 1 (0..999 for most models)"
                )
            key = noise_key(**{"noise_level" if self.noise_levels is not None else "timestep":
                               value})  # fmt: skip
            if key in keys:
                if keys[key] == value:
                    raise ExtractionError(
                        f"{what} {value:g} is given twice ({option}); give each once"
                    )
                raise ExtractionError(
                    f"{what}s {keys[key]!r} and {value!r} ({option}) would be stored under the "
                    f"same key '{key}' (6 significant digits); give one of them"
                )
            keys[key] = value

    def grid(self) -> list[dict]:
        if self.noise_levels is not None:
            return [{"key": noise_key(noise_level=p), "noise_level": p} for p in self.noise_levels]
        return [{"key": noise_key(timestep=t), "timestep": t} for t in self.timesteps]


def check_denoiser_sites(model: Model, sites: Sequence[str], error: type[DiffprobeError],
                         why: str) -> None:  # fmt: skip
    """Raise ``error`` unless every site is a module of ``model``'s denoiser (``why`` says why
    only denoiser sites are read); unknown sites fail with a did-you-mean."""
    from diffprobe.hooks.sites import parse_site

    for name in sites:
        if parse_site(name).component != model.denoiser_name:
            raise error(f"site '{name}' is not in the denoiser ('{model.denoiser_name}'); {why}")
        model.module(name)  # unknown sites fail here, before any work


def check_schedule(model: Model, plan: ExtractionPlan) -> None:
    """Raise :class:`ExtractionError` unless every timestep of ``plan`` lies on ``model``'s
    schedule and no two of its noise levels give the same denoiser timestep (their features
    would be stored twice)."""
    steps = model.num_train_timesteps
    name = model.name or model.family
    if plan.protocol == "alignment-paper":
        _check_protocol(model, plan, name)
        return
    if plan.timesteps is not None:
        for t in plan.timesteps:
            if model.flow_matching:
                if t > steps:
                    raise ExtractionError(
                        f"timestep {t:g} (--timesteps) is outside {name}'s schedule: its "
                        f"timesteps run from 0 to {steps} (sigma = t / {steps}); or give noise "
                        "levels in [0, 1] with --noise"
                    )
            elif t > steps - 1 or t != int(t):
                why = "is not an integer" if t != int(t) else "is outside the schedule"
                raise ExtractionError(
                    f"timestep {t:g} (--timesteps) {why} of {name}: its timesteps are the "
                    f"integers 0..{steps - 1} (num_train_timesteps {steps}); or give noise "
                    "levels in [0, 1] with --noise"
                )
        return
    seen: dict[float, float] = {}
    for p in plan.noise_levels:
        t = model.timestep_for(p)
        if t in seen:
            raise ExtractionError(
                f"noise levels {seen[t]:g} and {p:g} (--noise) both give timestep {t:g} of "
                f"{name}'s schedule of {steps} steps, so their features would be the same; "
                "give one of them"
            )
        seen[t] = p


def resolved_grid(model: Model, plan: ExtractionPlan) -> list[dict]:
    """:meth:`ExtractionPlan.grid`, with each entry's img2img ``timestep`` under
    ``--protocol alignment-paper``."""
    grid = plan.grid()
    if plan.protocol != "alignment-paper":
        return grid
    return [{**g, "timestep": img2img_timestep(model, g["noise_level"], plan.protocol_steps)}
            for g in grid]  # fmt: skip


def protocol_latent_shape(model: Model, size: int) -> tuple[int, int, int]:
    """The VAE latent's (channels, height, width) at image ``size``."""
    from diffprobe.models.geometry import vae_factor

    config = model.pipe.vae.config
    factor = vae_factor(config)
    return (int(config.latent_channels), size // factor, size // factor)


def protocol_info(plan: ExtractionPlan) -> dict:
    """What run.json records of the protocol (docs/alignment.md)."""
    if plan.protocol == "default":
        return {"name": "default"}
    return {
        "name": plan.protocol,
        "img2img_steps": plan.protocol_steps,
        "timestep_rule": "scheduler.set_timesteps(steps); t = scheduler.timesteps[(steps - "
        "int(steps * p)) * scheduler.order] (diffusers img2img)",
        "vae": "posterior sample mean + std * eps",
        "noise_formula": "one torch.Generator('cpu').manual_seed(seed) for every item: eps = "
        "randn(latent shape), then noise = randn(latent shape), float32",
    }


def _check_protocol(model: Model, plan: ExtractionPlan, name: str) -> None:
    """``--protocol alignment-paper`` needs a latent DDPM-type family whose ``encode_images``
    can sample the posterior (SD 1.x/2.x and SD-Turbo), and distinct img2img timesteps."""
    import inspect

    if (
        model.flow_matching
        or "posterior_noise" not in inspect.signature(model.encode_images).parameters
    ):
        raise ExtractionError(
            f"--protocol alignment-paper is defined for Stable Diffusion UNets (SD 1.x, 2.x, "
            f"SD-Turbo, tiny); {name} ({model.family}) has no such img2img protocol: leave "
            "--protocol out"
        )
    seen: dict[float, float] = {}
    for p in plan.noise_levels:
        t = img2img_timestep(model, p, plan.protocol_steps)
        if t in seen:
            raise ExtractionError(
                f"noise levels {seen[t]:g} and {p:g} (--noise) both give img2img timestep "
                f"{t:g} with {plan.protocol_steps} steps; give one of them"
            )
        seen[t] = p
