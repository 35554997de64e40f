"""The adapter interface: one small surface over every diffusers family.

A :class:`Model` wraps a native diffusers pipeline (``model.pipe``) without changing it. Each
family (one file per family in this package, registered with
:func:`diffprobe.registry.register_adapter`) implements five operations:

- ``encode_images(images)``: pixels -> denoiser inputs (VAE latents, or pixels for IF/DDPM);
- ``encode_prompt(prompts, negative=None, cfg=False)``: prompts -> :class:`Conditioning`,
  through the pipeline's own ``encode_prompt`` (branch semantics in :meth:`Model.encode_prompt`,
  the same for every family); ``encode_text(prompts)`` gives every text-encoder layer;
- ``add_noise(x0, noise_level=... | timestep=..., seed=..., items=...)``: the documented
  forward process with per-item seeded noise;
- ``denoise(x_t, timestep, cond, guidance_scale=...)``: one denoiser call, with CFG if asked;
- ``generate(prompts, ...)``: the native pipeline's ``__call__``.

The adapter is also the one place that knows its family's facts; everything else asks it:
``default_guidance_scale``; the native size (``resolution``) and the size rule
(:meth:`Model.size_rule_for`, asked by ``check_size`` and by :mod:`diffprobe.models.meta`
alike); ``tuple_elements`` of its block classes (asked by :mod:`diffprobe.hooks.elements`);
meta-device denoiser inputs (:meth:`Model.meta_denoiser_inputs`) and T5 lengths
(:meth:`Model.t5_tokens`); its text towers (:meth:`Model.text_towers`, for the lens and
attribution); how to assemble its pipeline from components (:meth:`Model.assemble`).

Gradients: ``denoise`` leaves autograd to the caller (extraction runs it under
``torch.inference_mode``; a deep dream or a learned edit back-propagates through it, also when a
``capture(..., stop_early=True, detach=False)`` ends it early). ``generate`` goes through the
native pipeline, whose ``__call__`` is decorated with ``torch.no_grad``: no gradients there.

Noise (see docs/noise.md): item ``i`` of a call with ``seed`` draws its noise from
``torch.Generator("cpu").manual_seed(item_seed(seed, i))`` with
``item_seed(seed, i) = int(numpy.random.SeedSequence([seed, i]).generate_state(1)[0])`` (a
32-bit hash of the pair: torch's CPU generator reads only the low 32 bits of a seed), as float32 of the per-item shape, then moved to the
model's device and dtype. A noise level ``p`` in [0, 1] is a fraction of the training schedule:
``t = min(round(p * T), T - 1)`` for DDPM-type schedules of ``T`` steps (then
``x_t = DDPMScheduler.add_noise(x_0, noise, t)``), and ``sigma = p`` for rectified-flow models
(``x_t = (1 - sigma) x_0 + sigma noise``). Results therefore do not depend on batch size,
shard count or order.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from diffprobe.errors import DiffprobeError
from diffprobe.hooks.attention import AttentionSite
from diffprobe.hooks.compiled import compile_regions
from diffprobe.hooks.engine import (
    BRANCHES,
    Cache,
    SiteFilter,
    capture,
    catch_stop,
    forbid_stop_early,
)
from diffprobe.hooks.sites import all_site_names, module_components, resolve_site
from diffprobe.models.conditioning import (  # noqa: F401 - the names base always gave
    Conditioning,
    TextEncoding,
    _concat,
    _select,
    negative_prompts,
)
from diffprobe.models.geometry import ConfigError, SizeRule, unet_rule, vae_factor
from diffprobe.models.noise import SeedError, item_noise, item_seed  # noqa: F401
from diffprobe.models.towers import Tower
from diffprobe.registry import ModelSpec


class Model:
    """A diffusers pipeline behind diffprobe's adapter interface. Subclass per family.

    A family sets the class attributes below and implements ``encode_images``,
    ``_encode_prompt``, ``encode_text``, ``denoiser_kwargs`` and the classmethods whose base
    versions raise or do not fit it; :mod:`diffprobe.testing` registers its dummy components
    and ``tests/test_conformance.py`` checks the whole contract on them.
    """

    family: ClassVar[str] = ""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()  # diffusers pipelines it wraps, main first
    denoiser_name: ClassVar[str] = "unet"
    # denoiser classes whose meta-device inputs this family builds (see claims_denoiser)
    denoiser_classes: ClassVar[tuple[str, ...]] = ()
    # rectified flow (sigma = p, velocity prediction) instead of a DDPM-type schedule
    flow_matching: ClassVar[bool] = False
    # guidance_scale of generate() when none is given (the lens uses it too); None: no guidance
    default_guidance_scale: ClassVar[float | None] = 7.5
    # block class -> names of its tuple elements, in order (see diffprobe.hooks.elements)
    tuple_elements: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    # the lens's encoder when none is named (see default_tower)
    default_encoder: ClassVar[str | None] = None
    # text encoders the pipeline runs without (SD3's T5: it feeds zeros in their place)
    optional_text_encoders: ClassVar[tuple[str, ...]] = ()
    # pipeline constructor options of assemble() (e.g. no safety checker)
    assemble_options: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, pipe: Any, spec: ModelSpec | None = None, name: str | None = None):
        self.pipe = pipe
        self.spec = spec
        self.name = name or (spec.alias if spec and spec.alias else None)
        self.branch_layout: tuple[str, ...] | None = None
        # True inside cfg(): the layout was decided by the model, not left for the hook engine
        # to read from the native pipeline
        self.branch_layout_set = False
        self._noise_schedule: tuple[Any, Any] | None = None  # (scheduler config, DDPMScheduler)

    # -- components and sites ---------------------------------------------------------------

    @property
    def module_components(self) -> dict[str, nn.Module]:
        return module_components(self.pipe.components)

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.pipe.to(device=device, dtype=dtype)
        return self

    def compile(self, *, vae: bool = True, **options: Any) -> dict[str, list[str]]:
        """Compile the repeated blocks of the denoiser (UNet down/mid/up blocks, DiT transformer
        blocks) and, with ``vae``, of the VAE's encoder and decoder, in place (regional
        compilation). Every capture, edit and early stop stays exact: hooks at block
        boundaries run outside the compiled code, and a site inside a block splits that block
        (``diffprobe.hooks.compiled``). ``options`` go to :func:`torch.compile`. Returns the
        compiled regions per component. The first pass at each new input shape pays the
        compilation (seconds to minutes); later passes reuse it."""
        compiled = {self.denoiser_name: compile_regions(self.denoiser, **options)}
        autoencoder = getattr(self.pipe, "vae", None)
        if vae and isinstance(autoencoder, nn.Module):
            compiled["vae"] = compile_regions(autoencoder, **options)
        return compiled

    def module(self, site: str) -> nn.Module:
        """The native module at ``site`` (e.g. ``"unet.mid_block"``)."""
        return resolve_site(self.module_components, site, self.name)[1]

    def site_names(self, component: str | None = None) -> list[str]:
        comps = self.module_components
        if component is not None:
            comps = {component: comps[component]}
        return all_site_names(comps)

    @contextlib.contextmanager
    def cfg(self, enabled: bool) -> Iterator[None]:
        """Tell the hook engine whether denoiser batches are CFG-doubled inside the block."""
        previous = self.branch_layout, self.branch_layout_set
        self.branch_layout = BRANCHES if enabled else None
        self.branch_layout_set = True
        try:
            yield
        finally:
            self.branch_layout, self.branch_layout_set = previous

    # -- geometry ------------------------------------------------------------------------------

    @property
    def resolution(self) -> int:
        """The native image size in px: the registered alias's, else the pipeline's default."""
        if self.spec is not None and self.spec.resolution:
            return self.spec.resolution
        return self.default_resolution()

    def default_resolution(self) -> int:
        """The pipeline's default image size in px (its denoiser's sample size × VAE factor)."""
        return self.native_size_for(self.component_configs())

    def component_configs(self) -> dict[str, dict[str, Any]]:
        """The configs the size rule is read from: the denoiser's and the VAE's (if any)."""
        configs = {self.denoiser_name: dict(self.denoiser.config)}
        vae = getattr(self.pipe, "vae", None)
        if vae is not None:
            configs["vae"] = dict(vae.config)
        return configs

    @classmethod
    def size_rule_for(cls, configs: Mapping[str, Mapping[str, Any]]) -> SizeRule:
        """The image sizes a model of this family with these component configs takes
        (``configs``: component name -> config dict, the denoiser's and the VAE's if any).

        The base rule: a UNet's (VAE factor × 2**(down blocks - 1), see
        :func:`diffprobe.models.geometry.unet_rule`), else the VAE factor."""
        factor = vae_factor(configs.get("vae"))
        denoiser = configs.get(cls.denoiser_name) or {}
        if denoiser.get("down_block_types"):
            return unet_rule(factor, denoiser)
        return SizeRule(factor, (f"VAE factor {factor}",) if factor > 1 else ())

    def size_rule(self) -> SizeRule:
        """This model's size rule (:meth:`size_rule_for` on its own configs)."""
        return self.size_rule_for(self.component_configs())

    def size_multiple(self) -> int:
        """Image sizes must be positive multiples of this (the size rule's multiple)."""
        return self.size_rule().multiple

    def check_size(self, size: int) -> None:
        """Raise :class:`ImageSizeError` unless ``size`` px can be taken (``--size``); the same
        rule and message as ``diffprobe sites``."""
        self.size_rule().check(size, self.name or self.family, native=self.resolution)

    @classmethod
    def native_size_for(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """Default image size (px) from component configs: the denoiser's ``sample_size``
        (first entry when it is a pair) times the VAE factor."""
        sample_size = (configs.get(cls.denoiser_name) or {}).get("sample_size")
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        if sample_size is None:
            raise ConfigError(
                f"the {cls.denoiser_name} config has no sample_size, so there is no default "
                "image size; pass --size"
            )
        return int(sample_size) * vae_factor(configs.get("vae"))

    # -- the meta device -----------------------------------------------------------------------

    @classmethod
    def claims_denoiser(cls, config: Mapping[str, Any]) -> bool:
        """Whether :meth:`meta_denoiser_inputs` builds inputs for this denoiser config."""
        return config.get("_class_name") in cls.denoiser_classes

    @classmethod
    def denoiser_input(
        cls, config: Mapping[str, Any], latent_size: int
    ) -> tuple[tuple[int, ...], int | None]:
        """(The denoiser's per-item input shape, its number of image tokens or None) for
        latents of ``latent_size`` px: (channels, height, width) and no tokens for UNets."""
        return (int(config["in_channels"]), latent_size, latent_size), None

    @classmethod
    def meta_denoiser_inputs(
        cls, config: Mapping[str, Any], geometry: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Keyword arguments of one denoiser forward on meta tensors (batch
        :data:`~diffprobe.models.geometry.BATCH`), for a denoiser ``config`` and the
        ``geometry`` of :func:`diffprobe.models.meta.latent_geometry` (``input_shape``,
        ``tokens``, ...); ``return_dict`` is added by the caller."""
        raise NotImplementedError(f"{cls.__name__} builds no meta-device inputs")

    @classmethod
    def t5_tokens(cls, denoiser_config: Mapping[str, Any] | None) -> int | None:
        """How many T5 tokens the family's pipeline encodes prompts to (its T5 encoders' input
        length), for a denoiser config; None for families without T5."""
        return None

    # -- text towers ------------------------------------------------------------------------

    @classmethod
    def text_towers(cls, pipe: Any) -> dict[str, Tower]:
        """How each text encoder of ``pipe`` feeds it, in the pipeline's order (empty for
        unconditional families). Only the encoders are read, so meta-device ones work."""
        return {}

    @classmethod
    def attention_sites(cls, pipe: Any) -> list[AttentionSite]:
        """The denoiser's attention modules from image tokens to text tokens, in module
        order, with their kind and token order (see :mod:`diffprobe.hooks.attention`); empty
        for families without text attention (DDPM)."""
        return []

    @classmethod
    def default_tower(cls, towers: Mapping[str, Tower]) -> str | None:
        """The encoder the lens reads when none is named (:attr:`default_encoder`)."""
        return cls.default_encoder

    # -- pipelines ---------------------------------------------------------------------------

    @classmethod
    def pipeline_class(cls, name: str | None = None) -> type:
        """The diffusers pipeline class ``name`` (default: the family's main one)."""
        # diffusers is imported here, not at module import: it takes seconds and the registry,
        # the meta device and the CLI's offline commands do not need it
        import diffusers

        return getattr(diffusers, name or cls.pipeline_classes[0])

    @classmethod
    def assemble(cls, components: Mapping[str, Any], pipeline: str | None = None) -> Any:
        """The native pipeline (class ``pipeline``, default the family's main one) from its
        ``components``; optional components left out are None, constructor options come from
        :attr:`assemble_options`."""
        klass = cls.pipeline_class(pipeline)
        parameters = dict(list(inspect.signature(klass.__init__).parameters.items())[1:])
        unknown = sorted(set(components) - set(parameters))
        if unknown:
            raise DiffprobeError(
                f"{klass.__name__} takes no component {unknown[0]!r}; it takes "
                f"{', '.join(parameters)}"
            )
        optional = set(getattr(klass, "_optional_components", ()))
        arguments: dict[str, Any] = {}
        for name, parameter in parameters.items():
            if name in components:
                arguments[name] = components[name]
            elif name in cls.assemble_options:
                arguments[name] = cls.assemble_options[name]
            elif name in optional:
                arguments[name] = None
            elif parameter.default is inspect.Parameter.empty:
                raise DiffprobeError(
                    f"{klass.__name__} needs the component {name!r}; pass it to assemble "
                    "(None where the pipeline runs without it)"
                )
        return klass(**arguments)

    @classmethod
    def load_kwargs(cls, spec: ModelSpec) -> dict[str, Any]:
        """Extra ``from_pretrained`` keywords for a registered model of this family."""
        return {}

    # -- the five operations ---------------------------------------------------------------------

    def prepare_images(self, images: Any, size: int | None = None) -> torch.Tensor:
        """uint8 (items, H, W, 3) arrays, PIL images or float tensors in [-1, 1] ->
        float tensor (items, 3, size, size) in [-1, 1] on the model's device."""
        return self.prepare_pixels(images, size).to(
            device=self.device, dtype=self.dtype, non_blocking=True
        )

    def prepare_pixels(self, images: Any, size: int | None = None) -> torch.Tensor:
        """:meth:`prepare_images` without the move to the model: float32 (items, 3, size, size)
        in [-1, 1] where the images are (the CPU for arrays and PIL images)."""
        size = self.resolution if size is None else size
        self.check_size(size)
        if isinstance(images, torch.Tensor):
            pixels = images.float()
            if pixels.dim() == 3:
                pixels = pixels[None]
        else:
            if not isinstance(images, np.ndarray):
                images = np.stack([np.asarray(img.convert("RGB")) for img in images])
            if images.ndim == 3:
                images = images[None]
            if images.dtype != np.uint8:
                raise DiffprobeError(
                    f"images must be uint8 (items, H, W, 3), got {images.dtype} {images.shape}"
                )
            pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if pixels.shape[-2:] != (size, size):
            pixels = torch.nn.functional.interpolate(
                pixels, size=(size, size), mode="bicubic", align_corners=False, antialias=True
            ).clamp(-1, 1)
        return pixels

    def encode_images(self, images: Any, size: int | None = None) -> torch.Tensor:
        """Pixels -> denoiser inputs (items, channels, height, width)."""
        raise NotImplementedError

    def encode_prompt(
        self,
        prompts: str | Sequence[str],
        negative: Sequence[str] | str | None = None,
        cfg: bool = False,
    ) -> Conditioning:
        """Prompts -> :class:`Conditioning`, through the pipeline's own ``encode_prompt``.

        The branches, the same for every family:

        - ``negative=None, cfg=False``: the conditional branch only (``uncond`` is None);
        - ``negative`` given (one string for every prompt, or one per prompt): the
          unconditional branch is the encoding of those texts, as the pipeline encodes its
          ``negative_prompt``;
        - ``cfg=True`` without ``negative``: the unconditional branch the family's own
          generation uses when no negative prompt is given: the encoding of "" (SD, SD3, FLUX,
          IF), zeros for SDXL when ``force_zeros_for_empty_prompt`` is set (SDXL base).

        Unconditional families (DDPM) refuse ``negative`` and ``cfg=True``.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negatives = negative_prompts(prompts, negative)
        return self._encode_prompt(prompts, negatives, uncond=cfg or negatives is not None)

    def _encode_prompt(
        self, prompts: list[str], negative: list[str] | None, uncond: bool
    ) -> Conditioning:
        """The family's encoding: ``uncond`` asks for the unconditional branch, from
        ``negative`` (one per prompt) or, when it is None, the family's own default."""
        raise NotImplementedError

    def prompt_embeds(self, branch: Mapping[str, Any]) -> tuple[torch.Tensor, Any]:
        """One branch of a :class:`Conditioning` as the pipeline's ``__call__`` takes it:
        (``prompt_embeds`` (items, tokens, width), ``pooled_prompt_embeds`` or None)."""
        return branch["encoder_hidden_states"], branch.get("pooled_projections")

    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        """Every layer of every text encoder (see :class:`TextEncoding`)."""
        raise NotImplementedError

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    def noise_level_of(self, timestep: float) -> float:
        """The noise level of a denoiser call given ``timestep`` (t / T, the inverse of
        :meth:`timestep_for` up to its rounding); hook windows and records use it."""
        return float(timestep) / self.num_train_timesteps

    def timestep_for(self, noise_level: float) -> float:
        """The denoiser timestep of noise level ``p`` (see the module docstring)."""
        if not 0.0 <= noise_level <= 1.0:
            raise DiffprobeError(f"noise level must lie in [0, 1], got {noise_level}")
        steps = self.num_train_timesteps
        if self.flow_matching:
            return noise_level * steps
        return float(min(round(noise_level * steps), steps - 1))

    def add_noise(
        self,
        x0: torch.Tensor,
        *,
        noise_level: float | None = None,
        timestep: float | None = None,
        seed: int = 0,
        items: Sequence[int] | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise clean inputs ``x0`` (items, ...) -> (x_t, timestep tensor (items,)).

        ``noise``: the items' noise if already drawn, ``item_noise(x0.shape[1:], seed, items)``
        (the same for every noise level, so a grid draws it once per item); ``seed`` and
        ``items`` are then not used."""
        if (noise_level is None) == (timestep is None):
            raise DiffprobeError("give exactly one of noise_level and timestep")
        t = self.timestep_for(noise_level) if noise_level is not None else float(timestep)
        if not self.flow_matching:
            t = float(round(t))  # DDPM-type schedules are defined on integer timesteps
        if noise is None:
            items = list(range(x0.shape[0])) if items is None else list(items)
            noise = item_noise(x0.shape[1:], seed, items, device=x0.device, dtype=torch.float32)
        elif noise.shape != x0.shape:
            raise DiffprobeError(f"noise of shape {tuple(noise.shape)} for x0 {tuple(x0.shape)}")
        noise = noise.to(device=x0.device, dtype=torch.float32)
        if self.flow_matching:
            sigma = t / self.num_train_timesteps
            noisy = (1.0 - sigma) * x0.float() + sigma * noise
        else:
            t_index = torch.full((x0.shape[0],), int(t), dtype=torch.long)
            noisy = self._ddpm_schedule().add_noise(x0.float(), noise, t_index.to(x0.device))
        timesteps = torch.full((x0.shape[0],), t, device=x0.device)
        return noisy.to(x0.dtype), timesteps

    def _ddpm_schedule(self):
        """A DDPMScheduler with the pipeline scheduler's betas, built once per scheduler config
        (building one costs about 0.5 ms: per pass, 1 % of a small model's grid)."""
        config = self.pipe.scheduler.config
        if self._noise_schedule is None or self._noise_schedule[0] is not config:
            from diffusers import DDPMScheduler

            self._noise_schedule = (config, DDPMScheduler.from_config(config))
        return self._noise_schedule[1]

    def denoiser_kwargs(
        self, x_t: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]
    ) -> dict[str, Any]:
        raise NotImplementedError

    def denoise(
        self,
        x_t: torch.Tensor,
        timestep: torch.Tensor | float,
        cond: Conditioning,
        guidance_scale: float | None = None,
    ) -> torch.Tensor | None:
        """One denoiser call on x_t (items, ...); with ``guidance_scale`` > 1 the batch is run as
        [uncond, cond] and combined. Returns the model prediction (items, ...), or None when a
        ``capture(..., stop_early=True)`` stopped it after its deepest site.

        Autograd is the caller's: gradients flow from the prediction or from values captured
        with ``detach=False`` back to ``x_t`` and the conditioning."""
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.full((x_t.shape[0],), float(timestep), device=x_t.device)
        use_cfg = guidance_scale is not None and guidance_scale > 1.0
        if use_cfg and cond.uncond is None:
            raise DiffprobeError("CFG needs an unconditional embedding: encode_prompt(negative='')")
        prediction = None
        with self.cfg(use_cfg), catch_stop(self.denoiser) as stop:
            if use_cfg:
                kwargs = self.denoiser_kwargs(
                    torch.cat([x_t, x_t]),
                    torch.cat([timestep, timestep]),
                    _concat(cond.uncond, cond.cond),
                )
                uncond, conditional = self._prediction(self.denoiser(**kwargs)).chunk(2)
                prediction = uncond + guidance_scale * (conditional - uncond)
            else:
                kwargs = self.denoiser_kwargs(x_t, timestep, cond.cond)
                prediction = self._prediction(self.denoiser(**kwargs))
        return None if stop.stopped else prediction

    @staticmethod
    def _prediction(output: Any) -> torch.Tensor:
        return output[0] if isinstance(output, tuple) else output.sample

    def generation_uses_cfg(self, guidance_scale: float) -> bool:
        """Whether the pipeline's generation at ``guidance_scale`` runs CFG-doubled batches."""
        return guidance_scale > 1.0

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        steps: int = 25,
        guidance_scale: float | None = None,
        seed: int | Sequence[int] = 0,
        size: int | tuple[int, int] | None = None,
        output_type: str = "np",
        **pipeline_kwargs: Any,
    ) -> Any:
        """The native pipeline's generation, seeded by ``seed``; returns (items, H, W, 3) floats
        in [0, 1] for ``output_type="np"``; ``size`` is one side or (height, width). ``seed`` may
        be one seed per prompt: image ``i`` then equals ``generate(prompts[i], seed=seed[i])`` up
        to batch rounding. ``guidance_scale`` defaults to the family's
        :attr:`default_guidance_scale`. The pipeline runs under its own ``torch.no_grad``:
        for gradients call :meth:`denoise`. Refused inside ``capture(..., stop_early=True)``."""
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        size = size or self.resolution
        height, width = size if isinstance(size, tuple) else (size, size)
        self.check_size(height)
        if width != height:
            self.check_size(width)
        forbid_stop_early(self.module_components.values(), "model.generate(...)")
        if isinstance(seed, Sequence):
            if len(seed) != len(prompts):
                raise DiffprobeError(
                    f"generate got {len(seed)} seeds for {len(prompts)} prompts; give one seed, "
                    "or one per prompt"
                )
            generator = [torch.Generator("cpu").manual_seed(int(s)) for s in seed]
        else:
            generator = torch.Generator("cpu").manual_seed(seed)
        with self.cfg(self.generation_uses_cfg(guidance_scale)):
            result = self.pipe(
                prompt=prompts,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generator,
                height=height,
                width=width,
                output_type=output_type,
                **pipeline_kwargs,
            )
        return result.images

    def run_with_cache(
        self,
        prompts: Any,
        sites: SiteFilter,
        *,
        reduce: Any = None,
        to: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **generate_kwargs: Any,
    ) -> tuple[Any, Cache]:
        """``generate(prompts, **generate_kwargs)`` with a capture of ``sites`` (names, globs
        such as ``"unet.*_block*"`` or a callable ``name -> bool``): ``(images, cache)``.
        ``reduce``, ``to`` and ``dtype`` are :func:`~diffprobe.hooks.capture.capture`'s."""
        with capture(self, sites, reduce=reduce, to=to, dtype=dtype) as cache:
            images = self.generate(prompts, **generate_kwargs)
        return images, cache

    def describe(self) -> dict[str, Any]:
        counts = {
            name: sum(p.numel() for p in module.parameters())
            for name, module in self.module_components.items()
        }
        return {
            "name": self.name,
            "family": self.family,
            "pipeline": type(self.pipe).__name__,
            "resolution": self.resolution,
            "parameters": counts,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }

    def __repr__(self) -> str:
        return f"<diffprobe {self.family} model {self.name or ''} ({type(self.pipe).__name__})>"
