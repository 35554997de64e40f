"""Stable Diffusion 3 and 3.5: MMDiT on rectified flow.

Pipeline: ``StableDiffusion3Pipeline``: ``vae`` (AutoencoderKL, 16 latent channels, shift and
scale), ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (CLIP-G), both
``CLIPTextModelWithProjection``, ``text_encoder_3`` (T5-XXL encoder, may be absent) and
``transformer`` (``SD3Transformer2DModel``). Sites, for an image of ``size`` px (SD3: f = 8,
patch 2, width 1536 for SD3-medium):

- ``transformer.transformer_blocks.N``: a ``JointTransformerBlock``; default element
  ``hidden_states``, the image tokens (items, (size / 16)², width);
  ``:encoder_hidden_states``, the text tokens (items, 77 + T5 tokens, width). The last block is
  ``context_pre_only``: it returns no text tokens, and reading them there is an error;
- ``transformer.transformer_blocks.N.attn``: the joint attention, image-token output first;
- ``text_encoder.text_model.encoder.layers.N``, ``text_encoder_2.text_model.encoder.layers.N``,
  ``text_encoder_3.encoder.block.N``: text-encoder layers.

Latents: ``(mean - shift_factor) * scaling_factor`` of the VAE posterior mean,
(items, 16, size / 8, size / 8).

Noise level and timestep. A noise level ``p`` is a point of the *training* schedule:
``sigma = p``, ``x_t = (1 - sigma) x_0 + sigma noise``, and the transformer receives
``timestep = sigma * 1000`` (what the pipeline passes: the scheduler's ``timesteps`` are always
``sigmas * num_train_timesteps``). The scheduler's ``shift`` s (3.0 for SD3) only decides which
sigmas the *sampler* visits: ``set_timesteps(N)`` maps an evenly spaced grid u from 1 down to
about 0 to ``sigma = s u / (1 + (s - 1) u)``, and step ``i`` runs at ``scheduler.sigmas[i]``;
that sigma is the step's noise level ``p``. The shift does not enter the relation between
``p``, sigma and timestep, and ``add_noise`` at a visited timestep equals the scheduler's own
``scale_noise``. The transformer predicts the velocity
``noise - x_0``; ``denoise`` returns it unchanged.

CFG: with ``guidance_scale > 1`` the pipeline runs one batch ``[uncond, cond]`` (uncond from the
negative prompt, "" by default); captures split into branches "uncond" and "cond". The extra
pass of skip-layer guidance (``skip_guidance_layers``, recommended for SD3.5-medium) runs the
conditional batch alone; ``generate`` labels it branch "none".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from diffprobe.hooks.attention import AttentionSite
from diffprobe.hooks.engine import BRANCHES
from diffprobe.models.attention_sites import pattern_sites
from diffprobe.models.base import Conditioning, Model, TextEncoding
from diffprobe.models.geometry import BATCH, CLIP_TOKENS, SizeRule, meta_empty, vae_factor
from diffprobe.models.registry import register_adapter
from diffprobe.models.towers import (
    Tower,
    clip_layers,
    clip_pooled_width,
    clip_width,
    t5_layers,
    tokenizer_of,
)

# the pipeline's default max_sequence_length: T5 tokens after the 77 CLIP tokens
SD3_T5_TOKENS = 256


@contextlib.contextmanager
def branches_per_call(
    model: Model, decide: Callable[[int], tuple[str, ...] | None]
) -> Iterator[None]:
    """Set ``model.branch_layout`` before every denoiser call to ``decide(batch)``.

    For pipelines whose denoiser calls differ in branch layout within one generation (separate
    cond and uncond calls, an extra conditional pass). The hook runs before the hook engine's
    own (``prepend``), so each call is labelled by the layout decided for it.
    """
    previous = model.branch_layout

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        model.branch_layout = decide(int(hidden.shape[0]))

    handle = model.denoiser.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()
        model.branch_layout = previous


def encoder_layers(
    tokenizer: Any, encoder: torch.nn.Module, prompts: Sequence[str], max_length: int, **tokenize
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Every hidden state of one text encoder, tokenized as the pipelines do (padded to
    ``max_length``, truncated): ((embeddings, layer 1, ..., layer L), input ids)."""
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
        **tokenize,
    )
    ids = tokens.input_ids.to(encoder.device)
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
    return tuple(out.hidden_states), ids


@register_adapter
class StableDiffusion3Model(Model):
    family = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"
    denoiser_classes = ("SD3Transformer2DModel",)
    flow_matching = True
    default_guidance_scale = 7.0
    # MMDiT blocks return (encoder_hidden_states, hidden_states): text tokens, image tokens
    tuple_elements = {"JointTransformerBlock": ("encoder_hidden_states", "hidden_states")}
    default_encoder = "text_encoder_3"
    optional_text_encoders = ("text_encoder_3",)

    def __init__(self, pipe: Any, spec: Any = None, name: str | None = None):
        super().__init__(pipe, spec, name)
        # T5 tokens, for encode_prompt, encode_text and generate alike (the pipeline's default)
        self.max_sequence_length = self.t5_tokens(pipe.transformer.config)

    def default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * int(self.pipe.vae_scale_factor)

    @classmethod
    def size_rule_for(cls, configs: Mapping[str, Mapping[str, Any]]) -> SizeRule:
        """Multiples of VAE factor × patch size, up to what the position embedding covers."""
        factor, config = vae_factor(configs.get("vae")), configs["transformer"]
        patch = int(config.get("patch_size", 1))
        reasons = (f"VAE factor {factor}", f"patch size {patch}")
        largest = config.get("pos_embed_max_size")
        if not largest:
            return SizeRule(factor * patch, reasons)
        return SizeRule(
            factor * patch,
            reasons,
            int(largest) * patch * factor,
            f"its position embedding (pos_embed_max_size {largest}) covers",
        )

    @classmethod
    def denoiser_input(
        cls, config: Mapping[str, Any], latent_size: int
    ) -> tuple[tuple[int, ...], int | None]:
        """Latents (channels, height, width), cut into (latent_size / patch)² image tokens."""
        patch = int(config.get("patch_size", 1))
        return (int(config["in_channels"]), latent_size, latent_size), (latent_size // patch) ** 2

    @classmethod
    def t5_tokens(cls, denoiser_config: Mapping[str, Any] | None) -> int:
        return SD3_T5_TOKENS

    @classmethod
    def meta_denoiser_inputs(
        cls, config: Mapping[str, Any], geometry: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Latent ``hidden_states``, 333 text tokens (77 CLIP + 256 T5, the pipeline's default
        ``max_sequence_length``), ``pooled_projections``, a timestep."""
        text_tokens = CLIP_TOKENS + cls.t5_tokens(config)
        return {
            "hidden_states": meta_empty(BATCH, *geometry["input_shape"]),
            "encoder_hidden_states": meta_empty(
                BATCH, text_tokens, int(config["joint_attention_dim"])
            ),
            "pooled_projections": meta_empty(BATCH, int(config["pooled_projection_dim"])),
            "timestep": meta_empty(BATCH),
        }

    @classmethod
    def attention_sites(cls, pipe: Any) -> list[AttentionSite]:
        """Joint attention of every MMDiT block (``attn``; SD3.5's image-only ``attn2`` is left out): one ``[image, text]`` sequence, text = 77 CLIP positions then the T5 tokens."""
        return pattern_sites(
            pipe.transformer,
            "transformer",
            r"transformer_blocks\.\d+\.attn",
            "joint",
            text_first=False,
        )

    @classmethod
    def text_towers(cls, pipe: Any) -> dict[str, Tower]:
        """CLIP-L and CLIP-G read at ``hidden_states[-2]`` side by side in the first 77 tokens
        (zero-padded to T5's width), their pooled vectors side by side; T5's last layer in the
        tokens after them."""
        found: dict[str, Tower] = {}
        tokens = int(pipe.tokenizer_max_length)
        start = pooled_start = 0
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, name)
            layers, width = clip_layers(encoder), clip_width(encoder)
            pooled = clip_pooled_width(encoder)
            found[name] = Tower(name, "clip", layers, layers - 1, False, slice(0, tokens),
                                slice(start, start + width),
                                slice(pooled_start, pooled_start + pooled),
                                tokenizer_of(name))  # fmt: skip
            start, pooled_start = start + width, pooled_start + pooled
        if getattr(pipe, "text_encoder_3", None) is not None:
            layers = t5_layers(pipe.text_encoder_3)
            found["text_encoder_3"] = Tower("text_encoder_3", "t5", layers, layers, True,
                                            slice(tokens, None), slice(None), None,
                                            "tokenizer_3")  # fmt: skip
        return found

    @classmethod
    def default_tower(cls, towers: Mapping[str, Tower]) -> str | None:
        # loaded without T5 (text_encoder_3=None), the lens reads CLIP-G
        return "text_encoder_3" if "text_encoder_3" in towers else "text_encoder_2"

    def generation_uses_cfg(self, guidance_scale: float) -> bool:
        # StableDiffusion3Pipeline.do_classifier_free_guidance
        return guidance_scale > 1

    def encode_images(self, images: Any, size: int | None = None) -> torch.Tensor:
        """Pixels -> latents (items, C, size/f, size/f): ``(mean - shift_factor) *
        scaling_factor`` of the VAE posterior mean (deterministic)."""
        pixels = self.prepare_images(images, size)
        vae = self.pipe.vae
        with torch.no_grad():
            mean = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        shift = vae.config.shift_factor or 0.0
        return ((mean - shift) * vae.config.scaling_factor).to(self.dtype)

    def _encode_prompt(
        self, prompts: list[str], negative: list[str] | None, uncond: bool
    ) -> Conditioning:
        """The pipeline's own ``encode_prompt``: ``encoder_hidden_states`` (items, 77 + T5
        tokens, joint width: penultimate CLIP-L | CLIP-G layers zero-padded to T5 width, then
        T5) and ``pooled_projections`` (items, CLIP-L + CLIP-G projection); the pipeline's
        unconditional default is the encoding of ""."""
        with torch.no_grad():
            cond, unconditional, pooled, unconditional_pooled = self.pipe.encode_prompt(
                prompts,
                None,
                None,
                device=self.device,
                do_classifier_free_guidance=uncond,
                negative_prompt=negative,
                max_sequence_length=self.max_sequence_length,
            )
        return Conditioning(
            {"encoder_hidden_states": cond, "pooled_projections": pooled},
            {"encoder_hidden_states": unconditional, "pooled_projections": unconditional_pooled}
            if uncond
            else None,
            prompts,
        )

    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        """Every layer of CLIP-L, CLIP-G and T5 (when loaded). CLIP: (embeddings, layer 1, ...,
        layer L) before the final layer norm, 77 tokens; T5: (embeddings, block 1, ...,
        block L-1, final-norm output), ``max_sequence_length`` tokens. No attention masks: the
        pipeline runs the encoders on padded ids without one."""
        pipe = self.pipe
        towers = [
            ("text_encoder", pipe.tokenizer, pipe.tokenizer_max_length, {}),
            ("text_encoder_2", pipe.tokenizer_2, pipe.tokenizer_max_length, {}),
        ]
        if pipe.text_encoder_3 is not None:
            towers.append(
                (
                    "text_encoder_3",
                    pipe.tokenizer_3,
                    self.max_sequence_length,
                    {"add_special_tokens": True},
                )
            )
        hidden, ids = {}, {}
        for name, tokenizer, length, tokenize in towers:
            hidden[name], ids[name] = encoder_layers(
                tokenizer, getattr(pipe, name), prompts, length, **tokenize
            )
        return TextEncoding(hidden, ids, dict.fromkeys(hidden))

    def denoiser_kwargs(
        self, x_t: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]
    ) -> dict[str, Any]:
        """``timestep`` is passed as is: sigma * 1000, as the pipeline does."""
        return {
            "hidden_states": x_t,
            "timestep": timestep,
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "pooled_projections": cond["pooled_projections"],
            "return_dict": False,
        }

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
        """The pipeline's generation (see :meth:`Model.generate`); CFG batches are labelled
        "uncond"/"cond", a skip-layer-guidance pass "none"."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        pipeline_kwargs.setdefault("max_sequence_length", self.max_sequence_length)
        items = len(prompts) * int(pipeline_kwargs.get("num_images_per_prompt") or 1)
        cfg = self.generation_uses_cfg(guidance_scale)

        def layout(batch: int) -> tuple[str, ...] | None:
            return BRANCHES if cfg and batch == 2 * items else None

        with branches_per_call(self, layout):
            return super().generate(
                prompts,
                steps=steps,
                guidance_scale=guidance_scale,
                seed=seed,
                size=size,
                output_type=output_type,
                **pipeline_kwargs,
            )
