"""Hand-made labels of high-norm anomalies: one JSON file per image that was looked at (the
labelling tool writes them), and a table of numpy arrays built from them (``.npz``, no pickle).

A label file::

    {"format": "diffprobe-anomaly-labels/1", "item": "<run item id>", "index": 3,
     "site": "unet.up_blocks.1" | null, "grid": [16, 16] | null,
     "groups": [{"x": column, "y": row}, ...]}

``groups`` are the upper-left tokens of the marked 2×2 groups in the site's token grid; an empty
list records an image that was looked at and holds none. Detections are matched against the
table by :func:`diffprobe.analysis.anomalies.compare_with_labels`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from diffprobe.data.sources import DataError
from diffprobe.io import write_bytes, write_json

LABEL_FORMAT = "diffprobe-anomaly-labels/1"
LABEL_TABLE_FORMAT = "diffprobe-anomaly-label-table/1"


class LabelError(DataError):
    """A label file or label table that cannot be read or does not fit the run."""


def write_label_file(
    path: str | Path,
    item: str,
    groups: Iterable[dict | tuple[int, int]],
    *,
    index: int | None = None,
    site: str | None = None,
    grid: tuple[int, int] | None = None,
) -> Path:
    """Write the hand-marked anomalies of one image (a JSON file).

    ``groups``: ``{"x": column, "y": row}`` (or ``(y, x)``) of each group's upper-left token in the
    site's token grid. ``item`` is the run's item id; ``index`` its position in the run; ``site``
    limits the labels to one site (None: every site). An empty ``groups`` records that the image
    was looked at and holds no anomaly (it still counts for precision)."""
    entries = []
    for g in groups:
        y, x = (g["y"], g["x"]) if isinstance(g, dict) else g
        entries.append({"x": int(x), "y": int(y)})
    payload = {
        "format": LABEL_FORMAT,
        "item": str(item),
        "index": index,
        "site": site,
        "grid": list(grid) if grid is not None else None,
        "groups": entries,
    }
    path = Path(path)
    return write_json(path, payload)


def read_label_file(path: str | Path) -> dict:
    """One label file -> ``{"item", "index", "site", "grid", "groups": [{"x", "y"}]}``."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LabelError(f"cannot read label file {path}: {err}") from None
    if not isinstance(payload, dict) or "item" not in payload or "groups" not in payload:
        raise LabelError(
            f"label file {path} needs the keys 'item' and 'groups' ([{{'x': .., 'y': ..}}]); "
            "write it with diffprobe.data.anomaly_labels.write_label_file"
        )
    for g in payload["groups"]:
        if not isinstance(g, dict) or not {"x", "y"} <= set(g):
            raise LabelError(f"label file {path}: every group needs 'x' and 'y', got {g!r}")
    return {
        "item": str(payload["item"]),
        "index": payload.get("index"),
        "site": payload.get("site"),
        "grid": payload.get("grid"),
        "groups": [{"x": int(g["x"]), "y": int(g["y"])} for g in payload["groups"]],
    }


def labels_to_table(
    files: str | Path | Iterable[str | Path], item_ids: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Label files (a folder of ``*.json`` or a list of files) -> a table of numpy arrays.

    ``item``, ``item_id``, ``site``, ``y``, ``x``: one entry per labelled group;
    ``image_item``, ``image_item_id``, ``image_site``: one entry per label file (the images that
    were looked at). ``item`` is the index in ``item_ids`` (the run's manifest order) when given,
    else the file's ``index``. ``site`` is "" for labels that apply to every site."""
    if isinstance(files, (str, Path)) and Path(files).is_dir():
        paths = sorted(Path(files).glob("*.json"))
        if not paths:
            raise LabelError(f"no label files (*.json) in {files}")
    elif isinstance(files, (str, Path)):
        paths = [Path(files)]
    else:
        paths = [Path(p) for p in files]
    lookup = {item_id: i for i, item_id in enumerate(item_ids)} if item_ids is not None else None
    table: dict[str, list] = {
        k: []
        for k in ("item", "item_id", "site", "y", "x", "image_item", "image_item_id", "image_site")
    }
    for path in paths:
        label = read_label_file(path)
        if lookup is not None:
            if label["item"] not in lookup:
                raise LabelError(
                    f"label file {path} names item '{label['item']}', which is not in the run"
                )
            index = lookup[label["item"]]
            if label["index"] is not None and int(label["index"]) != index:
                raise LabelError(
                    f"label file {path}: item '{label['item']}' is item {index} of the run, the "
                    f"file says index {label['index']}; fix or drop its 'index'"
                )
        elif label["index"] is None:
            raise LabelError(
                f"label file {path} has no 'index'; pass item_ids (the run's item ids)"
            )
        else:
            index = int(label["index"])
        site = label["site"] or ""
        table["image_item"].append(index)
        table["image_item_id"].append(label["item"])
        table["image_site"].append(site)
        for g in label["groups"]:
            table["item"].append(index)
            table["item_id"].append(label["item"])
            table["site"].append(site)
            table["y"].append(g["y"])
            table["x"].append(g["x"])
    return {
        k: np.asarray(v, dtype=str if "id" in k or "site" in k else np.int64)
        for k, v in table.items()
    }


def save_label_table(table: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write a label table as ``.npz`` (string columns as unicode arrays: no pickle needed)."""
    path = Path(path)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        format=np.asarray(LABEL_TABLE_FORMAT),
        **{k: np.asarray(v) for k, v in table.items()},
    )
    return write_bytes(path, buffer.getvalue())


def load_label_table(path: str | Path) -> dict[str, np.ndarray]:
    """Read a table written by :func:`save_label_table` (``allow_pickle=False``)."""
    with np.load(Path(path), allow_pickle=False) as data:
        if "format" not in data or str(data["format"]) != LABEL_TABLE_FORMAT:
            raise LabelError(
                f"{path} is not a diffprobe anomaly label table ({LABEL_TABLE_FORMAT})"
            )
        return {k: data[k] for k in data.files if k != "format"}
