"""Captured values by site, with the CFG branch as an explicit axis.

A :class:`Cache` holds :class:`Record` s. Reading a site never mixes branches: ``cache[site]``
(= ``cache.stack(site)``) and ``cache.last(site)`` need no choice when the site has records of
one branch only (``"none"`` without CFG), and raise "pick a branch" when it has records of both
halves of a CFG batch; then ``cache[site, "cond"]`` / ``cache.stack(site, branch="cond")``
choose one and ``cache.view(site)`` gives all of them on an explicit branch axis.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from diffprobe.errors import DiffprobeError


class CacheError(DiffprobeError, KeyError):
    """A site or branch the cache has no record of, or a read that would mix branches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class Record:
    """One captured value: ``value`` is (items, ...) of one CFG branch.

    ``call``: the denoiser call within the context (0-based), None outside denoiser calls (text
    encoders, VAE); ``timestep``: the denoiser's timestep argument of that call; ``branch``:
    ``"uncond"``, ``"cond"`` or ``"none"`` (a batch that is not CFG-doubled); ``noise_level``:
    the call's noise level when the model can tell (a diffprobe model), else None.
    """

    site: str
    value: torch.Tensor
    call: int | None
    timestep: float | None
    branch: str
    noise_level: float | None = None


@dataclass
class SiteView:
    """Every record of one site: ``values`` is (calls, branches, items, ...), ``branches``
    names axis 1, ``calls`` / ``timesteps`` / ``noise_levels`` label axis 0."""

    site: str
    values: torch.Tensor
    branches: tuple[str, ...]
    calls: tuple[int | None, ...]
    timesteps: tuple[float | None, ...]
    noise_levels: tuple[float | None, ...]

    def branch(self, name: str) -> torch.Tensor:
        """The values of one branch: (calls, items, ...)."""
        if name not in self.branches:
            raise CacheError(
                f"site '{self.site}' has no branch {name!r}; it has {', '.join(self.branches)}"
            )
        return self.values[:, self.branches.index(name)]


def _stack(site: str, values: list[torch.Tensor]) -> torch.Tensor:
    shapes = sorted({tuple(v.shape) for v in values})
    if len(shapes) > 1:
        raise CacheError(
            f"records of '{site}' have different shapes {', '.join(map(str, shapes))} and do not "
            "stack; read them one by one with cache.records(site)"
        )
    return torch.stack(values)


class Cache:
    """Captured records by site, in the order they were recorded."""

    def __init__(self) -> None:
        self._records: dict[str, list[Record]] = defaultdict(list)

    def add(self, record: Record) -> None:
        self._records[record.site].append(record)

    @property
    def sites(self) -> list[str]:
        return list(self._records)

    def _all(self, site: str) -> list[Record]:
        if site not in self._records:
            raise CacheError(
                f"nothing captured at '{site}'; captured: {', '.join(self.sites) or 'nothing'}"
            )
        return self._records[site]

    def records(
        self, site: str, branch: str | None = None, call: int | None = None
    ) -> list[Record]:
        """Records of ``site``, optionally only one CFG branch and/or one denoiser call."""
        return [
            r
            for r in self._all(site)
            if (branch is None or r.branch == branch) and (call is None or r.call == call)
        ]

    def branches(self, site: str) -> tuple[str, ...]:
        """The branches ``site`` has records of, in order of appearance."""
        return tuple(dict.fromkeys(r.branch for r in self._all(site)))

    def _of_branch(self, site: str, branch: str | None) -> list[Record]:
        present = self.branches(site)
        if branch is None:
            if len(present) > 1:
                first = "cond" if "cond" in present else present[-1]
                raise CacheError(
                    f"site '{site}' has records of the {' and '.join(present)} branches; pick "
                    f"one: cache['{site}', '{first}'] or cache.stack('{site}', branch='{first}')"
                    f", or cache.view('{site}') for all of them"
                )
            return self._all(site)
        if branch not in present:
            raise CacheError(
                f"no record of '{site}' with branch {branch!r}; it has {', '.join(present)}"
            )
        return self.records(site, branch)

    def stack(self, site: str, branch: str | None = None) -> torch.Tensor:
        """Values of ``site`` of one branch on a new leading axis: (records, items, ...).

        ``branch`` may be left out when the site has records of one branch only."""
        return _stack(site, [r.value for r in self._of_branch(site, branch)])

    def last(self, site: str, branch: str | None = None) -> torch.Tensor:
        """The most recent value of ``site`` of one branch (items, ...)."""
        return self._of_branch(site, branch)[-1].value

    def view(self, site: str) -> SiteView:
        """All records of ``site``, branches on their own axis: (calls, branches, items, ...).

        Needs every denoiser call to hold the same branches (true of one CFG batch per call);
        records outside denoiser calls are one row each."""
        rows: list[list[Record]] = []
        for record in self._all(site):
            if rows and record.call is not None and rows[-1][0].call == record.call:
                rows[-1].append(record)
            else:
                rows.append([record])
        branches = tuple(r.branch for r in rows[0])
        for row in rows:
            if tuple(r.branch for r in row) != branches:
                raise CacheError(
                    f"denoiser calls of '{site}' hold different branches (call {rows[0][0].call}: "
                    f"{', '.join(branches)}; call {row[0].call}: "
                    f"{', '.join(r.branch for r in row)}); read one branch with "
                    f"cache.stack('{site}', branch=...)"
                )
        values = _stack(site, [_stack(site, [r.value for r in row]) for row in rows])
        return SiteView(
            site,
            values,
            branches,
            tuple(row[0].call for row in rows),
            tuple(row[0].timestep for row in rows),
            tuple(row[0].noise_level for row in rows),
        )

    def __getitem__(self, key: str | tuple[str, str]) -> torch.Tensor:
        """``cache[site]`` or ``cache[site, branch]``: see :meth:`stack`."""
        if isinstance(key, tuple):
            site, branch = key
            return self.stack(site, branch)
        return self.stack(key)

    def __contains__(self, site: str) -> bool:
        return site in self._records

    def __len__(self) -> int:
        return sum(len(v) for v in self._records.values())

    def __repr__(self) -> str:
        parts = [
            f"{site}: {len(found)} × {tuple(found[-1].value.shape)} "
            f"({', '.join(self.branches(site))})"
            for site, found in self._records.items()
        ]
        return f"<Cache {'; '.join(parts) or 'empty'}>"

    def clear(self) -> None:
        self._records.clear()
