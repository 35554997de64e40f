"""A tiny offline T5 encoder and tokenizer (the text tower of SD3, FLUX and DeepFloyd IF).

``dummy_t5_tokenizer()`` builds a character-level ``T5TokenizerFast`` from a ``tokenizers``
Unigram vocabulary in memory (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, as in T5); no file and
no network. ``dummy_t5_encoder(tokenizer, d_model)`` is a random 2-block ``T5EncoderModel`` of the
sizes diffusers' tests use (``hf-internal-testing/tiny-random-t5``: d_kv 8, 4 heads, d_ff 37), with
the gated-GELU feed-forward of T5 v1.1, the version SD3 and FLUX ship.
"""

from __future__ import annotations

import string

import torch


def dummy_t5_tokenizer():
    """A character-level T5TokenizerFast (about 150 pieces), offline."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    symbols = string.ascii_letters + string.digits + string.punctuation
    pieces += [(symbol, -3.0) for symbol in symbols]
    # word-initial letters, so that "a red circle" does not spend one token per space
    pieces += [("\u2581" + letter, -3.5) for letter in string.ascii_letters]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def dummy_t5_encoder(tokenizer, d_model: int = 32, num_layers: int = 2, seed: int = 0):
    """A random ``T5EncoderModel`` with ``d_model`` channels, in eval mode."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_heads=4,
        num_layers=num_layers,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()
