"""The tokenizer of the embedded models: CLIP's byte-level BPE layout with merges learned from
the shapes world's training captions (a ``CLIPTokenizer``; no download)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def caption_corpus() -> list[str]:
    """Every caption the training split can produce: each combination × each template."""
    from diffprobe.data import shapes

    corpus = []
    for shape, colour, size, quadrant, background in shapes.combinations("train"):
        factors = {"shape": shape, "colour": colour, "size": size, "quadrant": quadrant,
                   "background": background}  # fmt: skip
        for template in range(len(shapes.CAPTION_TEMPLATES)):
            corpus.append(shapes.caption(factors, template))
    return corpus


def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP byte -> printable character table, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return [chr(c) for c in characters]


def build_tokenizer(corpus: Iterable[str], model_max_length: int = 77):
    """A ``CLIPTokenizer`` with CLIP's layout and merges learned from ``corpus``.

    The vocabulary is laid out as CLIP's: the 256 byte characters, the same with ``</w>``, one
    token per merge in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` (also the
    padding and unknown token). Every byte is in it, so any text tokenises; words of the
    corpus become single tokens.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    learner = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    learner.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # stop only when every word is one token
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    learner.train_from_iterator(list(corpus), trainer)
    merges = [tuple(pair) for pair in json.loads(learner.to_str())["model"]["merges"]]

    alphabet = _byte_alphabet()
    tokens = alphabet + [character + "</w>" for character in alphabet]
    tokens += ["".join(pair) for pair in merges] + [_BOS, _EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise AssertionError("duplicate token in the learned vocabulary")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_tokenizer(tokenizer, directory: Path) -> None:
    """``save_pretrained`` plus CLIP's ``vocab.json`` / ``merges.txt`` for older transformers."""
    tokenizer.save_pretrained(directory)
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (directory / "vocab.json").write_text(json.dumps(state["vocab"], ensure_ascii=False))
    lines = ["#version: 0.2"] + [" ".join(pair) for pair in state["merges"]]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids (items, 77) exactly as ``StableDiffusionPipeline.encode_prompt`` makes them."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
