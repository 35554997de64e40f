"""Text towers: how each text encoder of a pipeline feeds it (for the lens and attribution).

Each adapter returns its towers (:meth:`diffprobe.models.Model.text_towers`) from the
pipeline's encoders alone, so full-size layouts can be read from encoders built on the meta
device. The helpers here read the numbers every CLIP and T5 encoder has.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Tower:
    """How one text encoder feeds its pipeline.

    ``pipeline_layer``: the ``hidden_states`` index the pipeline reads for its token embeddings
    (``None``: the encoder feeds only a pooled vector, FLUX's CLIP); ``pipeline_norm``: whether
    what the pipeline reads is after the final norm (CLIP ``last_hidden_state``, T5's last
    hidden state) or not (CLIP ``hidden_states[-2]``). ``tokens`` and
    ``features`` locate the encoder's part of ``prompt_embeds`` (items, tokens, features);
    ``pooled`` its part of the pooled embeds (items, features), ``None`` if it has none.
    ``tokenizer`` is the pipeline attribute holding the encoder's tokenizer.
    """

    encoder: str
    kind: str  # "clip" or "t5"
    num_layers: int
    pipeline_layer: int | None
    pipeline_norm: bool
    tokens: slice | None
    features: slice | None
    pooled: slice | None
    tokenizer: str = "tokenizer"

    def layers(self, norm: str = "pipeline") -> list[int]:
        """The lens layers: 0 .. the last one (the pipeline's own with ``norm="pipeline"``)."""
        if self.kind == "t5" or self.pipeline_layer is None or norm == "final":
            return list(range(self.num_layers + 1))
        return list(range(self.pipeline_layer + 1))

    def applies_norm(self, layer: int, norm: str) -> bool:
        """Whether the lens readout of ``layer`` applies the encoder's final norm."""
        if self.kind == "t5":
            return layer < self.num_layers  # T5's last hidden state is already normalised
        return norm == "final" or self.pipeline_norm or self.pipeline_layer is None

    def readout_text(self, norm: str) -> str:
        if self.kind == "t5":
            return (
                "final_layer_norm(hidden_states[ℓ]) for ℓ < L; hidden_states[L] (T5's last "
                "hidden state is already normalised)"
            )
        if self.pipeline_layer is None:
            return "no token embeddings: the pipeline reads only the pooled vector"
        if self.applies_norm(0, norm):
            return "final_layer_norm(hidden_states[ℓ])"
        return (
            f"hidden_states[ℓ] without the final layer norm, as the pipeline reads "
            f"hidden_states[{self.pipeline_layer - self.num_layers - 1}]"
        )


def tokenizer_of(encoder_name: str) -> str:
    """The pipeline attribute of an encoder's tokenizer: ``text_encoder_2`` -> ``tokenizer_2``."""
    return encoder_name.replace("text_encoder", "tokenizer", 1)


def clip_layers(encoder: nn.Module) -> int:
    return int(encoder.config.num_hidden_layers)


def clip_width(encoder: nn.Module) -> int:
    return int(encoder.config.hidden_size)


def clip_pooled_width(encoder: nn.Module) -> int:
    """Width of the pooled vector: the projection's when the encoder has one."""
    projection = getattr(encoder, "text_projection", None)
    return int(projection.out_features) if projection is not None else clip_width(encoder)


def t5_layers(encoder: nn.Module) -> int:
    return int(encoder.config.num_layers)


def last_layer_tower(name: str, encoder: nn.Module, kind: str) -> Tower:
    """The tower of a single encoder whose normalised last layer is the whole of
    ``prompt_embeds`` (SD 1.x/2.x CLIP, IF's T5)."""
    layers = clip_layers(encoder) if kind == "clip" else t5_layers(encoder)
    return Tower(
        name, kind, layers, layers, True, slice(None), slice(None), None, tokenizer_of(name)
    )
