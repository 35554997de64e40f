"""Sparse autoencoders: a TopK SAE, its training, the SAELens / sparsify / openai layouts,
evaluation and steering helpers (docs/sae.md).

>>> from diffprobe.sae import TopKSAE, train_sae, load_sae, save_sae
>>> sae = train_sae(activations, k=32, expansion=16)   # (tokens, d_in) -> a TopKSAE
>>> codes = sae.encode(activations)                     # (tokens, d_sae), zeros but k per row
"""

from diffprobe.sae.evaluate import SAEEvaluation, evaluate_sae, sae_splice
from diffprobe.sae.formats import LAYOUTS, SAEFormatError, detect_layout, load_sae, save_sae
from diffprobe.sae.generation import (
    feature_activity,
    generation_batches,
    generation_source,
    masked_ablation_codes,
    sae_edit,
    splice_test,
    steer_feature,
    steering_strengths,
    top_examples,
)
from diffprobe.sae.model import SAEError, SAEOutput, SparseCodes, TopKSAE
from diffprobe.sae.sources import (
    ActivationSource,
    ArraySource,
    IterableSource,
    MapSource,
    as_source,
    open_activations,
    run_source,
    to_tokens,
)
from diffprobe.sae.steering import decoder_direction, edit_codes, masked_ablation, sae_steer
from diffprobe.sae.train import SAETrainer, TrainConfig, train_sae

__all__ = [
    "top_examples",
    "steering_strengths",
    "steer_feature",
    "splice_test",
    "sae_edit",
    "masked_ablation_codes",
    "generation_source",
    "generation_batches",
    "feature_activity",
    "LAYOUTS",
    "ActivationSource",
    "ArraySource",
    "IterableSource",
    "MapSource",
    "SAEError",
    "SAEEvaluation",
    "SAEFormatError",
    "SAEOutput",
    "SAETrainer",
    "SparseCodes",
    "TopKSAE",
    "TrainConfig",
    "as_source",
    "decoder_direction",
    "detect_layout",
    "edit_codes",
    "evaluate_sae",
    "load_sae",
    "masked_ablation",
    "open_activations",
    "run_source",
    "sae_splice",
    "sae_steer",
    "save_sae",
    "to_tokens",
    "train_sae",
]
