"""Streaming attribution maps into zarr: one prompt at a time, float16.

``<out>/maps.zarr`` (zarr v3, readable with plain ``zarr.open_group``):

- ``maps``: float16 (prompts, text positions, layers, timesteps, rows, columns), one chunk per
  (prompt, text position); NaN at padding positions and where nothing was written;
- ``outputs`` (MMDiT/FLUX): the output-space scores, same layout over ``output_sites``;
- attributes: ``sites``, ``output_sites``, ``grid``, and per prompt (``prompts``) its text,
  seed, noise levels and tokens (position, piece, encoder, special).

Each prompt's array is written as soon as its generation ends and then dropped, so peak memory
is one prompt's maps whatever the number of prompts.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

MAPS_STORE = "maps.zarr"


class MapStore:
    """Writes :class:`~diffprobe.stages.attribution.PromptAttribution` results to zarr."""

    def __init__(self, folder: str | Path, prompts: int) -> None:
        self.path = Path(folder) / MAPS_STORE
        self.prompts = prompts
        self.group: Any = None
        self.entries: list[dict] = [{} for _ in range(prompts)]

    def _create(self, result: Any) -> None:
        import zarr

        self.group = zarr.open_group(str(self.path), mode="w")
        for name, values in (
            ("maps", result.maps),
            ("outputs", result.outputs),
        ):
            if values is None:
                continue
            _, layers, steps, rows, columns = values.shape
            self.group.create_array(
                name,
                shape=(self.prompts, result.text_length, layers, steps, rows, columns),
                chunks=(1, 1, layers, steps, rows, columns),
                dtype="float16",
                fill_value=np.nan,
            )
        self.group.attrs.update(
            {
                "layout": "(prompts, text positions, layers, timesteps, rows, columns)",
                "sites": result.sites,
                "output_sites": result.output_sites,
                "grid": list(result.maps.shape[-2:]),
                "branch": "conditional (cond half under CFG, whole batch without)",
            }
        )

    def write(self, index: int, result: Any) -> None:
        if self.group is None:
            self._create(result)
        positions = [t.position for t in result.tokens]
        for name, values in (("maps", result.maps), ("outputs", result.outputs)):
            if values is None or name not in self.group:
                continue
            array = self.group[name]
            for row, position in enumerate(positions):
                array[index, position] = values[row].astype(np.float16)
        self.entries[index] = {
            "prompt": result.prompt,
            "seed": result.seed,
            "noise_levels": [float(v) for v in result.noise_levels],
            "tokens": [asdict(t) for t in result.tokens],
        }
        self.group.attrs["prompts"] = self.entries
