"""What the inspector's pages ask for, as JSON-ready dictionaries and PNG bytes: the runs and
their stages, the anomaly stage's norm maps, detections and hand labels (with precision and
recall against the detector), the per-channel activity of an extraction run, images of a run's
items. Everything reads files of the given runs; labels are the only thing written."""

from __future__ import annotations

import csv
import io
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffprobe.analysis.anomalies import compare_with_labels
from diffprobe.app.safety import Refused, inside
from diffprobe.data.anomaly_labels import (
    labels_to_table,
    read_label_file,
    save_label_table,
    write_label_file,
)
from diffprobe.io import write_json

LABELS = "labels"  # the folder of label files inside an anomaly stage
LABEL_TABLE = "table.npz"  # the same labels as a table (diffprobe anomalies --labels reads both)
SCORES = "label_scores.json"  # beside labels/: that folder holds only label files and the table


@dataclass
class StageRef:
    """What the inspector knows of one stage folder (given by the caller, found on disk)."""

    kind: str
    path: Path
    name: str


@dataclass
class RunRef:
    root: Path
    stages: list[StageRef]
    cache: dict = field(default_factory=dict)


class Views:
    """The inspector's data, over runs found by the caller (``runs``: root -> stages)."""

    def __init__(self, runs: Sequence[RunRef]) -> None:
        self.runs = list(runs)
        self.lock = threading.Lock()

    # ------------------------------------------------------------- addressing

    def run(self, index: Any) -> RunRef:
        try:
            return self.runs[int(index)]
        except (TypeError, ValueError, IndexError):
            raise Refused(404, f"no run {index!r}") from None

    def stage(self, run: Any, stage: Any) -> tuple[RunRef, StageRef]:
        ref = self.run(run)
        try:
            return ref, ref.stages[int(stage)]
        except (TypeError, ValueError, IndexError):
            raise Refused(404, f"no stage {stage!r}") from None

    def file(self, run: Any, relative: str) -> Path:
        path = inside(self.run(run).root, relative)
        if not path.is_file():
            raise Refused(404, "not a file")
        return path

    def listing(self) -> list[dict]:
        out = []
        for index, ref in enumerate(self.runs):
            stages = []
            for number, stage in enumerate(ref.stages):
                rel = stage.path.relative_to(ref.root).as_posix()
                prefix = "" if rel == "." else rel + "/"
                figures = sorted(p.name for p in stage.path.glob("*.png"))
                entry = {"id": number, "kind": stage.kind, "name": stage.name,
                         "figures": [prefix + f for f in figures]}  # fmt: skip
                if stage.kind == "extract":
                    entry["levels"] = _noise_count(stage.path)
                stages.append(entry)
            out.append({"id": index, "name": ref.root.name, "path": str(ref.root),
                        "stages": stages})  # fmt: skip
        return out

    # ------------------------------------------------------------- anomalies

    def _norms(self, ref: RunRef, stage: StageRef) -> dict[str, np.ndarray]:
        key = ("norms", stage.name)
        if key not in ref.cache:
            path = stage.path / "norm_maps.npz"
            if not path.is_file():
                raise Refused(404, "this anomaly stage has no norm_maps.npz")
            with np.load(path, allow_pickle=False) as data:
                ref.cache[key] = {k: data[k] for k in data.files}
        return ref.cache[key]

    def _detections(self, stage: StageRef, key: str) -> dict[str, np.ndarray]:
        site, noise, condition = key.split("|")
        rows = _read_rows(stage.path / "high_norm_detections.csv")
        rows = [r for r in rows if (r["site"], r["noise"], r["condition"]) == (site, noise,
                                                                               condition)]  # fmt: skip
        return {
            "item": np.asarray([int(r["item"]) for r in rows], np.int64),
            "y": np.asarray([int(r["y"]) for r in rows], np.int64),
            "x": np.asarray([int(r["x"]) for r in rows], np.int64),
            "score": np.asarray([float(r["score"]) for r in rows], np.float64),
        }

    def _ids(self, stage: StageRef) -> list[str]:
        rows = _read_rows(stage.path / "high_norm_per_image.csv")
        ids: dict[int, str] = {}
        for r in rows:
            ids.setdefault(int(r["item"]), r["item_id"])
        return [ids[i] for i in sorted(ids)]

    def anomalies(self, run: Any, stage: Any) -> dict:
        ref, found = self.stage(run, stage)
        norms = self._norms(ref, found)
        keys = list(norms)
        ids = self._ids(found)
        return {
            "keys": keys,
            "items": int(norms[keys[0]].shape[0]) if keys else 0,
            "grids": {k: list(v.shape[1:3]) for k, v in norms.items()},
            "ids": ids,
            "detections": {k: _listed(self._detections(found, k)) for k in keys},
            "labels": self.labels(found),
            "scores": self.scores(found),
        }

    def norm_png(self, run: Any, stage: Any, key: str, item: Any, scale: int = 0) -> bytes:
        ref, found = self.stage(run, stage)
        norms = self._norms(ref, found)
        if key not in norms:
            raise Refused(404, f"no norm map {key!r}")
        try:
            grid = norms[key][int(item)]
        except (ValueError, IndexError):
            raise Refused(404, f"no item {item!r}") from None
        return _colour_png(grid, scale or max(4, 512 // max(grid.shape)))

    def labels(self, stage: StageRef) -> dict[str, list[dict]]:
        """``"item|site"`` -> the marked groups of every label file of the stage."""
        folder = stage.path / LABELS
        found: dict[str, list[dict]] = {}
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            label = read_label_file(path)
            found[f"{label['index']}|{label['site'] or ''}"] = label["groups"]
        return found

    def save_labels(self, run: Any, stage: Any, key: str, item: Any, groups: list) -> dict:
        """Write one image's label file (``labels/<item>_<site>.json``), the label table and the
        scores; returns the scores."""
        ref, found = self.stage(run, stage)
        if found.kind != "anomalies":
            raise Refused(403, "labels go into an anomaly stage")
        norms = self._norms(ref, found)
        if key not in norms:
            raise Refused(404, f"no norm map {key!r}")
        site = key.split("|")[0]
        height, width = norms[key].shape[1:3]
        try:
            index = int(item)
            cleaned = [{"x": int(g["x"]), "y": int(g["y"])} for g in groups]
        except (TypeError, ValueError, KeyError):
            raise Refused(400, "labels are {item, groups: [{x, y}]}") from None
        if not 0 <= index < norms[key].shape[0]:
            raise Refused(400, f"item {index} is not in the stage")
        if any(not (0 <= g["x"] < width and 0 <= g["y"] < height) for g in cleaned):
            raise Refused(400, f"a group lies outside the {height}x{width} grid")
        ids = self._ids(found)
        folder = found.path / LABELS
        with self.lock:
            write_label_file(folder / f"{index:05d}_{_file_safe(site)}.json", ids[index], cleaned,
                             index=index, site=site, grid=(height, width))  # fmt: skip
            table = labels_to_table(folder, ids)
            save_label_table(table, folder / LABEL_TABLE)
            scores = self._score(found, norms, table)
            write_json(found.path / SCORES, scores)
        return scores

    def _score(self, stage: StageRef, norms: dict, table: dict) -> dict:
        rows = []
        for key in norms:
            site, noise, condition = key.split("|")
            if not ((table["image_site"] == site) | (table["image_site"] == "")).any():
                continue
            result = compare_with_labels(self._detections(stage, key), table, site=site,
                                         tolerance=1)  # fmt: skip
            rows.append({"site": site, "noise": noise, "condition": condition, **result})
        return {"images": int(len(table["image_item"])), "groups": int(len(table["item"])),
                "rows": [{k: _plain(v) for k, v in r.items()} for r in rows]}  # fmt: skip

    def scores(self, stage: StageRef) -> dict:
        path = stage.path / SCORES
        if not path.is_file():
            return {"images": 0, "groups": 0, "rows": []}
        import json

        return json.loads(path.read_text())

    # ------------------------------------------------------------- dreams and priors

    def _relative(self, index: int, path: Path) -> str:
        return path.relative_to(self.runs[index].root).as_posix()

    def dreams(self, channel: int, site: str | None = None) -> list[dict]:
        """Dream results of ``channel`` in every dream stage (layout of ``diffprobe dream``:
        ``channel_0003/`` or ``feature_00003/`` holding ``grid.png`` and per timestep
        ``seed_S.png``, ``stats.json`` and ``snapshots/seed_S_step_NNNN.png``), of ``site`` only
        where given (the site ``dream.json`` names)."""
        import json

        found = []
        for index, ref in enumerate(self.runs):
            for stage in ref.stages:
                if stage.kind != "dream":
                    continue
                try:
                    dreamed = json.loads((stage.path / "dream.json").read_text()).get("site")
                except (OSError, ValueError, AttributeError):
                    dreamed = None
                if site and dreamed and dreamed != site:
                    continue
                for name in (f"channel_{channel:04d}", f"feature_{channel:05d}"):
                    folder = stage.path / name
                    if not folder.is_dir() or folder.is_symlink():
                        continue
                    steps = []
                    for leaf in sorted(p for p in folder.glob("timestep_*") if p.is_dir()):
                        snapshots = sorted(leaf.glob("snapshots/seed_0_step_*.png"))
                        stats = leaf / "stats.json"
                        steps.append({
                            "name": leaf.name,
                            "snapshots": [self._relative(index, p) for p in snapshots],
                            "final": [self._relative(index, p) for p in sorted(leaf.glob("seed_*.png"))],
                            "stats": json.loads(stats.read_text()) if stats.is_file() else [],
                        })  # fmt: skip
                    grid = folder / "grid.png"
                    found.append({"run": index, "stage": stage.name, "folder": name, "site": dreamed,
                                  "grid": self._relative(index, grid) if grid.is_file() else None,
                                  "timesteps": steps})  # fmt: skip
        return found

    def priors(self, channel: int) -> list[dict]:
        """Prior images of ``channel`` in every steer stage (``diffprobe steer --prior``:
        ``<site>/channel_0003/images/prior_image_J.png``, and ``baseline/images``)."""
        found = []
        for index, ref in enumerate(self.runs):
            for stage in ref.stages:
                if stage.kind != "steer":
                    continue
                for folder in sorted(stage.path.glob(f"*/channel_{channel:04d}/images")):
                    images = sorted(folder.glob("*.png"))[:16]
                    found.append({"run": index, "stage": stage.name,
                                  "folder": folder.parent.relative_to(stage.path).as_posix(),
                                  "images": [self._relative(index, p) for p in images]})  # fmt: skip
        return found

    # ------------------------------------------------------------- features of a run

    def _store(self, ref: RunRef, stage: StageRef):
        from diffprobe.extract.store import open_run

        key = ("store", stage.name)
        if key not in ref.cache:
            ref.cache[key] = open_run(stage.path)
        return ref.cache[key]

    def feature_axes(self, run: Any, stage: Any) -> dict:
        ref, found = self.stage(run, stage)
        if found.kind != "extract":
            raise Refused(404, "features are read from an extraction run")
        store = self._store(ref, found)
        levels = [g.get("noise_level", g.get("timestep")) for g in store.info["noise"]]
        return {"sites": store.sites, "conditions": store.conditions, "noise": store.noise_keys,
                "levels": levels, "pooling": store.info.get("pooling"),
                "items": len(store.manifest)}  # fmt: skip

    def activity(self, run: Any, stage: Any, site: str, condition: str) -> dict:
        """Mean activation of every channel at every noise level, (noise, channels), over the
        run's items (spatial features are averaged over positions first)."""
        ref, found = self.stage(run, stage)
        store = self._store(ref, found)
        if site not in store.sites or condition not in store.conditions:
            raise Refused(404, "no such site or condition in the run")
        key = ("activity", found.name, site, condition)
        if key not in ref.cache:
            per_noise = [_per_item(store.get(site, n, condition)) for n in store.noise_keys]
            ref.cache[key] = np.stack(per_noise)  # (noise, items, channels)
        values = ref.cache[key]
        return {"noise": store.noise_keys, "mean": values.mean(axis=1).T.round(5).tolist(),
                "channels": int(values.shape[2])}  # fmt: skip

    def top_items(self, run: Any, stage: Any, site: str, condition: str, channel: int,
                  noise: int, k: int = 8) -> list[dict]:  # fmt: skip
        ref, found = self.stage(run, stage)
        self.activity(run, stage, site, condition)
        values = ref.cache[("activity", found.name, site, condition)]
        if not (0 <= channel < values.shape[2] and 0 <= noise < values.shape[0]):
            raise Refused(404, "no such channel or noise level")
        column = values[noise, :, channel]
        order = np.argsort(-column, kind="stable")[:k]
        manifest = self._store(ref, found).manifest
        return [{"item": int(i), "id": manifest[i]["id"], "value": round(float(column[i]), 5),
                 "caption": manifest[i].get("caption") or manifest[i].get("label") or ""}
                for i in order]  # fmt: skip

    def item_png(self, run: Any, stage: Any, item: Any) -> bytes:
        """The image of one item of an extraction run: shapes-world items are drawn again,
        files are read only when they lie inside one of the served runs."""
        from PIL import Image

        from diffprobe.data.sources import manifest_images

        ref, found = self.stage(run, stage)
        store = self._store(ref, found)
        try:
            entry = store.manifest[int(item)]
        except (ValueError, IndexError):
            raise Refused(404, f"no item {item!r}") from None
        kind = store.info["data"]["kind"]
        out = io.BytesIO()
        if kind != "shapes":
            path = Path(entry.get("path", "")).resolve()
            if not any(r.root.resolve() in path.parents for r in self.runs):
                # never read outside the runs; a grey square says the image is elsewhere
                Image.new("RGB", (128, 128), (190, 190, 190)).save(out, format="PNG")
                return out.getvalue()
        image = manifest_images([entry], kind, int(store.info["image_size"]))[0]
        Image.fromarray(image).resize((128, 128), Image.NEAREST).save(out, format="PNG")
        return out.getvalue()


def _noise_count(run: Path) -> int:
    import json

    try:
        return len(json.loads((run / "run.json").read_text()).get("noise", []))
    except (OSError, ValueError, AttributeError):
        return 0


def _per_item(array: np.ndarray) -> np.ndarray:
    """(items, channels) from pooled (items, channels) or spatial (items, channels, H, W) or
    token (items, tokens, channels) features."""
    array = np.asarray(array, np.float32)
    if array.ndim == 2:
        return array
    if array.ndim == 4:
        return array.mean(axis=(2, 3))
    if array.ndim == 3:
        return array.mean(axis=1)
    raise Refused(404, f"features of shape {array.shape} have no channel axis")


def _colour_png(grid: np.ndarray, scale: int) -> bytes:
    from matplotlib import colormaps
    from PIL import Image

    values = np.asarray(grid, np.float64)
    top = values.max() if values.size and values.max() > 0 else 1.0
    rgba = colormaps["magma"](values / top)
    pixels = (rgba[..., :3] * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels).resize(
        (pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST
    )
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def _read_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(line for line in handle if not line.startswith("#")))
    except OSError:
        return []


def _listed(detections: dict[str, np.ndarray]) -> list[dict]:
    return [{"item": int(i), "y": int(y), "x": int(x), "score": round(float(s), 4)}
            for i, y, x, s in zip(detections["item"], detections["y"], detections["x"],
                                  detections["score"], strict=True)]  # fmt: skip


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _file_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text) or "all"
