"""FLUX.1 (schnell, dev): a rectified-flow transformer on packed latents.

Pipeline: ``FluxPipeline``: ``vae`` (AutoencoderKL, 16 latent channels, shift and scale),
``text_encoder`` (``CLIPTextModel``, only its pooled output is used), ``text_encoder_2`` (T5-XXL
encoder) and ``transformer`` (``FluxTransformer2DModel``). Sites, for an image of ``size`` px
(FLUX.1: f = 8, 2 x 2 packing, width 3072):

- ``transformer.transformer_blocks.N`` (double-stream ``FluxTransformerBlock``) and
  ``transformer.single_transformer_blocks.N`` (``FluxSingleTransformerBlock``): default element
  ``hidden_states``, the image tokens (items, (size / 16)², width); ``:encoder_hidden_states``,
  the text tokens (items, T5 tokens, width);
- ``transformer.transformer_blocks.N.attn``: the joint attention, image-token output first;
- ``text_encoder.encoder.layers.N`` (CLIP), ``text_encoder_2.encoder.block.N`` (T5).

T5 tokens: ``model.max_sequence_length``, 256 for schnell (its training length) and 512 for dev
(the pipeline's default), used alike by ``encode_prompt``, ``encode_text`` and ``generate``.

Latents. ``encode_images`` returns the *unpacked* layout (items, 16, size / 8, size / 8):
``(mean - shift_factor) * scaling_factor`` of the VAE posterior mean. ``add_noise`` works on that
layout; ``denoiser_kwargs`` packs 2 x 2 patches into tokens with the pipeline's own
``_pack_latents`` (items, (size / 16)², 64) and builds ``img_ids``/``txt_ids`` as the pipeline
does; ``denoise`` unpacks the prediction (``_unpack_latents``) back to (items, 16, size / 8,
size / 8), so ``add_noise`` and ``denoise`` share one layout.

Noise level and timestep: as for SD3 (see :mod:`diffprobe.models.sd3`): ``sigma = p``,
``x_t = (1 - sigma) x_0 + sigma noise``, diffprobe timestep ``t = sigma * 1000``. The pipeline
hands the transformer ``t / 1000`` (the transformer multiplies by 1000 again); so does
``denoiser_kwargs``. Hence capture records of FLUX carry the transformer's own timestep
argument, sigma in [0, 1], not ``t``, and ``TimestepWindow(low, high)`` windows are compared
with sigma too (``NoiseWindow`` needs no conversion: sigma is the noise level). Schnell samples with shift 1, dev with a resolution-
dependent (dynamic) shift: the sampler's sigmas are the noise levels of its steps.

Guidance. The pipeline's ``guidance_scale`` is *embedded* guidance, a transformer input that
exists only for guidance-distilled models (``guidance_embeds``: dev; schnell has none); the
batch is never CFG-doubled. True CFG (``true_cfg_scale > 1`` with a negative prompt) runs two
separate transformer calls per step, conditional first, then unconditional. ``generate`` labels
their captures "cond" and "uncond" (each call is one branch); without true CFG a call is "none".
``denoise(guidance_scale=s)`` is true CFG in the same way (two calls), and takes
``embedded_guidance`` (default :attr:`FluxModel.embedded_guidance`, the pipeline's 3.5) for dev.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.hooks.attention import AttentionSite
from diffprobe.hooks.engine import catch_stop
from diffprobe.models.attention_sites import pattern_sites
from diffprobe.models.base import Conditioning, Model, TextEncoding
from diffprobe.models.geometry import BATCH, SizeRule, meta_empty, vae_factor
from diffprobe.models.registry import register_adapter
from diffprobe.models.sd3 import branches_per_call, encoder_layers
from diffprobe.models.towers import Tower, clip_layers, t5_layers

# FluxPipeline's default_sample_size (latent px) when the transformer config has no sample_size
FLUX_SAMPLE_SIZE = 128


@register_adapter
class FluxModel(Model):
    family = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser_name = "transformer"
    denoiser_classes = ("FluxTransformer2DModel",)
    flow_matching = True
    # the pipeline's guidance_scale: embedded guidance, not CFG (see the module doc)
    default_guidance_scale = 3.5
    tuple_elements = {
        "FluxTransformerBlock": ("encoder_hidden_states", "hidden_states"),
        "FluxSingleTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    }
    default_encoder = "text_encoder_2"

    def __init__(self, pipe: Any, spec: Any = None, name: str | None = None):
        super().__init__(pipe, spec, name)
        # T5 tokens for encode_prompt, encode_text and generate (see t5_tokens)
        self.max_sequence_length = self.t5_tokens(pipe.transformer.config)
        # embedded guidance of denoise for guidance-distilled models (the pipeline's default)
        self.embedded_guidance = 3.5

    def default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * int(self.pipe.vae_scale_factor)

    @classmethod
    def native_size_for(cls, configs: Mapping[str, Mapping[str, Any]]) -> int:
        sample_size = configs["transformer"].get("sample_size") or FLUX_SAMPLE_SIZE
        return int(sample_size) * vae_factor(configs.get("vae"))

    @classmethod
    def size_rule_for(cls, configs: Mapping[str, Mapping[str, Any]]) -> SizeRule:
        """Latents are packed into 2 × 2 patches (of the patch size, 1 for FLUX.1)."""
        factor, config = vae_factor(configs.get("vae")), configs["transformer"]
        patch = int(config.get("patch_size", 1))
        packing = "2×2 latent packing" + (f" and patch size {patch}" if patch > 1 else "")
        return SizeRule(factor * 2 * patch, (f"VAE factor {factor}", packing))

    @classmethod
    def denoiser_input(
        cls, config: Mapping[str, Any], latent_size: int
    ) -> tuple[tuple[int, ...], int | None]:
        """Packed latents: (tokens, channels), one token per 2 × 2 latent patch."""
        tokens = (latent_size // 2) ** 2
        return (tokens, int(config["in_channels"])), tokens

    @classmethod
    def t5_tokens(cls, denoiser_config: Mapping[str, Any] | None) -> int:
        """Schnell was trained with 256 T5 tokens (its model card's setting), guidance-distilled
        dev with the pipeline's default 512."""
        guided = bool((denoiser_config or {}).get("guidance_embeds"))
        return 512 if guided else 256

    @classmethod
    def meta_denoiser_inputs(
        cls, config: Mapping[str, Any], geometry: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Packed ``hidden_states`` of (size/f/2)² tokens of 4 × latent channels, ``img_ids``,
        ``txt_ids``, T5 tokens (:meth:`t5_tokens`), ``guidance`` only with
        ``guidance_embeds``."""
        text_tokens = cls.t5_tokens(config)
        inputs = {
            "hidden_states": meta_empty(BATCH, *geometry["input_shape"]),
            "encoder_hidden_states": meta_empty(
                BATCH, text_tokens, int(config["joint_attention_dim"])
            ),
            "pooled_projections": meta_empty(BATCH, int(config["pooled_projection_dim"])),
            "timestep": meta_empty(BATCH),
            "img_ids": meta_empty(geometry["tokens"], 3),
            "txt_ids": meta_empty(text_tokens, 3),
        }
        if config.get("guidance_embeds"):
            inputs["guidance"] = meta_empty(BATCH)
        return inputs

    @classmethod
    def attention_sites(cls, pipe: Any) -> list[AttentionSite]:
        """Double-stream blocks: joint ``[text, image]`` attention; single-stream blocks: one ``[text, image]`` sequence split at the T5 length. Text keys are T5 tokens (CLIP feeds only its pooled vector)."""
        return [
            *pattern_sites(
                pipe.transformer,
                "transformer",
                r"transformer_blocks\.\d+\.attn",
                "joint",
                text_first=True,
            ),
            *pattern_sites(
                pipe.transformer,
                "transformer",
                r"single_transformer_blocks\.\d+\.attn",
                "single",
                text_first=True,
            ),
        ]

    @classmethod
    def text_towers(cls, pipe: Any) -> dict[str, Tower]:
        """CLIP feeds only its pooled vector; T5's last layer is the whole sequence."""
        layers = t5_layers(pipe.text_encoder_2)
        clip = Tower("text_encoder", "clip", clip_layers(pipe.text_encoder), pipeline_layer=None,
                     pipeline_norm=True, tokens=None, features=None, pooled=slice(None),
                     tokenizer="tokenizer")  # fmt: skip
        t5 = Tower("text_encoder_2", "t5", layers, pipeline_layer=layers, pipeline_norm=True,
                   tokens=slice(None), features=slice(None), pooled=None,
                   tokenizer="tokenizer_2")  # fmt: skip
        return {"text_encoder": clip, "text_encoder_2": t5}

    def noise_level_of(self, timestep: float) -> float:
        """The transformer's timestep argument is sigma itself (see the module doc)."""
        return float(timestep)

    def generation_uses_cfg(self, guidance_scale: float) -> bool:
        # ``guidance_scale`` is embedded guidance; true CFG never doubles the batch
        return False

    def encode_images(self, images: Any, size: int | None = None) -> torch.Tensor:
        """Pixels -> unpacked latents (items, C, size/f, size/f): ``(mean - shift_factor) *
        scaling_factor`` of the VAE posterior mean (deterministic)."""
        pixels = self.prepare_images(images, size)
        vae = self.pipe.vae
        with torch.no_grad():
            mean = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        shift = vae.config.shift_factor or 0.0
        return ((mean - shift) * vae.config.scaling_factor).to(self.dtype)

    def _prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompts, None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _encode_prompt(
        self, prompts: list[str], negative: list[str] | None, uncond: bool
    ) -> Conditioning:
        """The pipeline's own ``encode_prompt``: ``encoder_hidden_states`` (items, T5 tokens,
        T5 width) and ``pooled_projections`` (items, CLIP width). ``txt_ids`` are rebuilt by
        ``denoiser_kwargs`` (zeros, one row per text token). The unconditional branch (for
        true CFG) is encoded the same way, from "" unless ``negative`` is given."""
        with torch.no_grad():
            cond = self._prompt_embeds(prompts)
            unconditional = None
            if uncond:
                unconditional = self._prompt_embeds(negative or [""] * len(prompts))
        return Conditioning(cond, unconditional, prompts)

    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        """Every layer of CLIP (77 tokens, before the final layer norm; the pipeline uses only
        its pooled output) and T5 (``max_sequence_length`` tokens; (embeddings, block 1, ...,
        block L-1, final-norm output), the last being what the pipeline uses). No attention
        masks: the pipeline runs both encoders on padded ids without one."""
        pipe = self.pipe
        hidden, ids = {}, {}
        hidden["text_encoder"], ids["text_encoder"] = encoder_layers(
            pipe.tokenizer, pipe.text_encoder, prompts, pipe.tokenizer_max_length
        )
        hidden["text_encoder_2"], ids["text_encoder_2"] = encoder_layers(
            pipe.tokenizer_2, pipe.text_encoder_2, prompts, self.max_sequence_length
        )
        return TextEncoding(hidden, ids, dict.fromkeys(hidden))

    def denoiser_kwargs(
        self, x_t: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]
    ) -> dict[str, Any]:
        """Transformer inputs as the pipeline builds them, from unpacked latents x_t
        (items, C, h, w) and diffprobe timesteps (items,) = sigma * 1000."""
        return self._kwargs(x_t, timestep, cond, self.embedded_guidance)

    def _kwargs(
        self, x_t: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any], guidance: float
    ) -> dict[str, Any]:
        pipe = self.pipe
        items, channels, height, width = x_t.shape
        embeds = cond["encoder_hidden_states"]
        text_dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else self.dtype
        guidance_input = None
        if pipe.transformer.config.guidance_embeds:
            guidance_input = torch.full([1], guidance, device=x_t.device, dtype=torch.float32)
            guidance_input = guidance_input.expand(items)
        return {
            "hidden_states": pipe._pack_latents(x_t, items, channels, height, width),
            "timestep": timestep.to(x_t.dtype) / 1000,
            "guidance": guidance_input,
            "pooled_projections": cond["pooled_projections"],
            "encoder_hidden_states": embeds,
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=text_dtype),
            "img_ids": pipe._prepare_latent_image_ids(
                items, height // 2, width // 2, x_t.device, x_t.dtype
            ),
            "joint_attention_kwargs": {},
            "return_dict": False,
        }

    def _unpack(self, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        factor = int(self.pipe.vae_scale_factor)
        return self.pipe._unpack_latents(packed, height * factor, width * factor, factor)

    @contextlib.contextmanager
    def _branch(self, branch: str | None) -> Iterator[None]:
        previous = self.branch_layout
        self.branch_layout = None if branch is None else (branch,)
        try:
            yield
        finally:
            self.branch_layout = previous

    def denoise(
        self,
        x_t: torch.Tensor,
        timestep: torch.Tensor | float,
        cond: Conditioning,
        guidance_scale: float | None = None,
        *,
        embedded_guidance: float | None = None,
    ) -> torch.Tensor | None:
        """One transformer call on unpacked latents x_t (items, C, h, w); returns the velocity
        prediction (items, C, h, w), or None when a capture stopped it early.

        ``guidance_scale`` > 1 is true CFG as the pipeline runs it: a conditional call, then an
        unconditional one (captured as branches "cond" and "uncond"), combined as
        ``uncond + guidance_scale (cond - uncond)``. ``embedded_guidance`` feeds
        guidance-distilled (dev) models; it is ignored by models without guidance embeddings.
        """
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.full((x_t.shape[0],), float(timestep), device=x_t.device)
        use_cfg = guidance_scale is not None and guidance_scale > 1.0
        if use_cfg and cond.uncond is None:
            raise DiffprobeError("CFG needs an unconditional embedding: encode_prompt(negative='')")
        guidance = self.embedded_guidance if embedded_guidance is None else embedded_guidance
        height, width = x_t.shape[-2:]
        passes = [("cond", cond.cond), ("uncond", cond.uncond)] if use_cfg else [(None, cond.cond)]
        predictions, stopped = [], False
        for branch, embeds in passes:
            # every pass runs, so an early stop still captures both branches
            with self._branch(branch), catch_stop(self.denoiser) as stop:
                output = self.denoiser(**self._kwargs(x_t, timestep, embeds, guidance))
            if stop.stopped:
                stopped = True
                continue
            predictions.append(self._unpack(self._prediction(output), height, width))
        if stopped:
            return None
        if use_cfg:
            conditional, uncond = predictions
            return uncond + guidance_scale * (conditional - uncond)
        return predictions[0]

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        steps: int = 25,
        guidance_scale: float | None = None,
        seed: int | Sequence[int] = 0,
        size: int | None = None,
        output_type: str = "np",
        **pipeline_kwargs: Any,
    ) -> Any:
        """The pipeline's generation (see :meth:`Model.generate`). ``guidance_scale`` is the
        pipeline's embedded guidance; pass ``true_cfg_scale`` and ``negative_prompt`` for true
        CFG, whose alternating calls are captured as branches "cond" and "uncond"."""
        pipeline_kwargs.setdefault("max_sequence_length", self.max_sequence_length)
        # the pipeline's own rule (FluxPipeline.__call__: do_true_cfg)
        has_negative = pipeline_kwargs.get("negative_prompt") is not None or (
            pipeline_kwargs.get("negative_prompt_embeds") is not None
            and pipeline_kwargs.get("negative_pooled_prompt_embeds") is not None
        )
        true_cfg = float(pipeline_kwargs.get("true_cfg_scale", 1.0)) > 1 and has_negative
        # each step calls the transformer on the conditional batch, then the unconditional one
        order = itertools.cycle([("cond",), ("uncond",)] if true_cfg else [None])

        with branches_per_call(self, lambda batch: next(order)):
            return super().generate(
                prompts,
                steps=steps,
                guidance_scale=guidance_scale,
                seed=seed,
                size=size,
                output_type=output_type,
                **pipeline_kwargs,
            )
