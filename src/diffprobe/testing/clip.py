"""A tiny offline CLIP tokenizer and text-encoder config (the text tower of SD, SDXL, SD3, FLUX).

``dummy_clip_tokenizer()`` writes a character-level CLIP BPE vocabulary to a temporary folder
and loads it as a ``CLIPTokenizer``; ``dummy_clip_text_config(tokenizer)`` is a 5-layer text
config of width 32, the sizes diffusers' own tests use.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

CLIP_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=5,
    layer_norm_eps=1e-05,
    max_position_embeddings=77,
    hidden_act="gelu",
)


def _clip_vocab() -> dict[str, int]:
    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    return vocab


def dummy_clip_tokenizer(max_length: int = 77):
    """A character-level CLIPTokenizer (vocabulary of about 140 symbols), offline.

    The tokenizer reads its vocabulary files when it is built; they are written to a temporary
    folder that is removed again.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="diffprobe-clip-vocab-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(_clip_vocab()))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(
            str(folder / "vocab.json"),
            str(folder / "merges.txt"),
            model_max_length=max_length,
            pad_token="<|endoftext|>",
        )


def dummy_clip_text_config(tokenizer, projection: int | None = None, **overrides):
    from transformers import CLIPTextConfig

    config = dict(
        CLIP_TEXT,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if projection is not None:
        config["projection_dim"] = projection
    config.update(overrides)
    return CLIPTextConfig(**config)
