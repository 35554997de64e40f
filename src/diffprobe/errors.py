"""Errors a user can act on: each says what was given, what was expected, and what to do."""

from __future__ import annotations

import difflib


class DiffprobeError(Exception):
    """Base class of diffprobe's own errors (bad input, unreachable models, bad sites)."""


class UnknownModelError(DiffprobeError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownSiteError(DiffprobeError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class ModelLoadError(DiffprobeError):
    pass


class ImageSizeError(DiffprobeError, ValueError):
    pass


def did_you_mean(word: str, choices: list[str], n: int = 3) -> list[str]:
    """Close matches of ``word`` among ``choices`` (best first)."""
    return difflib.get_close_matches(word, choices, n=n, cutoff=0.6)
