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

ACTIVITY = "features"  # an activity run of ``diffprobe features capture``
ANALYSIS = "features-analysis"  # its analysis (``diffprobe features analyse``)
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
                elif stage.kind == ACTIVITY:
                    entry["levels"] = _timestep_count(stage.path)
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

    def dreams(self, channel: int, site: str | None = None, kind: str | None = None) -> list[dict]:
        """Dream results of ``channel`` in every dream stage (layout of ``diffprobe dream``:
        ``channel_0003/`` or ``feature_00003/`` holding ``grid.png`` and per timestep
        ``seed_S.png``, ``stats.json`` and ``snapshots/seed_S_step_NNNN.png``), of ``site`` only
        where given (the site ``dream.json`` names), of channels or SAE features only where
        ``kind`` (``channel`` or ``feature``) is given."""
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
                names = {"channel": f"channel_{channel:04d}", "feature": f"feature_{channel:05d}"}
                for name in [v for k, v in names.items() if kind in (None, k)]:
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

    def priors(self, channel: int, site: str | None = None) -> list[dict]:
        """Prior images of ``channel`` in every steer stage (``diffprobe steer --prior``:
        ``<site>/channel_0003/images/prior_image_J.png``, and ``baseline/images``), of ``site``
        only where given."""
        from diffprobe.extract.store import site_key

        found = []
        pattern = f"{site_key(site) if site else '*'}/channel_{channel:04d}/images"
        for index, ref in enumerate(self.runs):
            for stage in ref.stages:
                if stage.kind != "steer":
                    continue
                for folder in sorted(stage.path.glob(pattern)):
                    if folder.is_symlink() or folder.parent.is_symlink():
                        continue
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
        if found.kind == ACTIVITY:
            return self._activity_axes(ref, found)
        if found.kind != "extract":
            raise Refused(404, "features are read from an extraction run or an activity run")
        store = self._store(ref, found)
        levels = [g.get("noise_level", g.get("timestep")) for g in store.info["noise"]]
        return {"sites": store.sites, "conditions": store.conditions, "noise": store.noise_keys,
                "levels": levels, "pooling": store.info.get("pooling"),
                "items": len(store.manifest)}  # fmt: skip

    def activity(self, run: Any, stage: Any, site: str, condition: str) -> dict:
        """Mean activation of every channel at every noise level, (noise, channels), over the
        run's items (spatial features are averaged over positions first)."""
        ref, found = self.stage(run, stage)
        if found.kind == ACTIVITY:
            return self._activity_profile(ref, found, site, condition)
        if found.kind != "extract":
            raise Refused(404, "features are read from an extraction run or an activity run")
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
                  noise: int, k: int = 8, window: str | None = None) -> list[dict]:  # fmt: skip
        ref, found = self.stage(run, stage)
        if found.kind == ACTIVITY:
            return self._activity_top(ref, found, site, condition, channel, noise, k, window)
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

    # ------------------------------------------------------------- activity runs

    def _activity_run(self, ref: RunRef, stage: StageRef):
        from diffprobe.extract.generation import ActivityError, open_activity

        key = ("activity-run", stage.name)
        if key not in ref.cache:
            try:
                ref.cache[key] = open_activity(stage.path)
            except ActivityError as err:
                raise Refused(404, str(err)) from None
        return ref.cache[key]

    def _analysis_of(self, activity: StageRef) -> tuple[int, StageRef] | None:
        """The ``features analyse`` stage (in any served run) whose analysis.json names this
        activity run; the newest-named first where there are several."""
        import json

        target = activity.path.resolve()
        for index, ref in enumerate(self.runs):
            for stage in ref.stages:
                if stage.kind != ANALYSIS:
                    continue
                try:
                    named = json.loads((stage.path / "analysis.json").read_text()).get("run")
                except (OSError, ValueError, AttributeError):
                    continue
                if named and Path(named).resolve() == target:
                    return index, stage
        return None

    def _analysis_json(self, ref: RunRef, stage: StageRef, name: str) -> dict:
        import json

        key = ("analysis-json", stage.name, name)
        if key not in ref.cache:
            try:
                ref.cache[key] = json.loads((stage.path / name).read_text())
            except (OSError, ValueError):
                ref.cache[key] = {}
        return ref.cache[key]

    def _activity_axes(self, ref: RunRef, stage: StageRef) -> dict:
        run = self._activity_run(ref, stage)
        transforms = run.info.get("transforms") or {}
        units = {}
        for site in run.sites:
            name = str(transforms.get(site) or "").lower()
            units[site] = "channel" if not name else "SAE feature" if "sae" in name else "feature"
        analysis = self._analysis_of(stage)
        windows = []
        if analysis is not None:
            info = self._analysis_json(self.runs[analysis[0]], analysis[1], "analysis.json")
            windows = [f"t{lo:g}-{hi:g}" for lo, hi in info.get("windows", [])]
        return {
            "kind": ACTIVITY, "sites": run.sites, "conditions": run.branches,
            "noise": [f"t{t:g}" for t in run.timesteps], "levels": run.timesteps.tolist(),
            "axis": "timestep", "units": units, "transforms": transforms,
            "items": len(run.items), "complete": run.complete,
            "analysis": None if analysis is None else {"run": analysis[0],
                                                       "stage": analysis[1].name},
            "windows": ["overall", *windows] if analysis is not None else [],
        }  # fmt: skip

    def _activity_values(self, ref: RunRef, stage: StageRef, site: str, branch: str):
        run = self._activity_run(ref, stage)
        if site not in run.sites or branch not in run.branches:
            raise Refused(404, "no such site or branch in the activity run")
        key = ("activity", stage.name, site, branch)
        if key not in ref.cache:
            from diffprobe.extract.generation import ActivityError

            try:  # a capture still running shows what is stored so far
                values = run.get(site, branch, allow_incomplete=True)
            except ActivityError as err:
                raise Refused(404, str(err)) from None
            ref.cache[key] = np.transpose(values, (1, 0, 2))  # (timesteps, items, channels)
        return run, ref.cache[key]

    def _activity_profile(self, ref: RunRef, stage: StageRef, site: str, branch: str) -> dict:
        """Mean over items per stored timestep, and the analysis' peaks (timesteps on the
        interpolated grid) and active ranges of every channel where an analysis names the run."""
        run, values = self._activity_values(ref, stage, site, branch)
        out = {"noise": [f"t{t:g}" for t in run.timesteps],
               "mean": values.mean(axis=1).T.round(5).tolist(),
               "channels": int(values.shape[2]), "peaks": None, "active": None}  # fmt: skip
        analysis = self._analysis_of(stage)
        if analysis is not None:
            owner = self.runs[analysis[0]]
            info = self._analysis_json(owner, analysis[1], "analysis.json")
            if site in info.get("sites", []) and info.get("branch") == branch:
                peaks = self._analysis_json(owner, analysis[1], "activity_peaks.json").get(site, {})
                active = self._analysis_json(owner, analysis[1], "active_timesteps.json")
                out["peaks"] = [[p.get("timestep") for p in peaks.get(str(c), [])]
                                for c in range(out["channels"])]  # fmt: skip
                out["active"] = [active.get(site, {}).get(str(c), [])
                                 for c in range(out["channels"])]  # fmt: skip
                out["profile"] = info.get("profile")
        return out

    def _activity_top(self, ref: RunRef, stage: StageRef, site: str, branch: str, channel: int,
                      noise: int, k: int, window: str | None) -> list[dict]:  # fmt: skip
        """The top items of a channel: at stored timestep ``noise`` (argsort of the stored
        activity), or from the analysis' ``top_examples.json`` for ``window`` (``overall`` or
        ``t<low>-<high>``). Each with its generated image (a path inside the served run)."""
        run, values = self._activity_values(ref, stage, site, branch)
        if not (0 <= channel < values.shape[2] and 0 <= noise < values.shape[0]):
            raise Refused(404, "no such channel or timestep")
        base = stage.path.relative_to(ref.root)
        if window:
            analysis = self._analysis_of(stage)
            if analysis is None:
                raise Refused(404, "no analysis of this activity run is served")
            owner = self.runs[analysis[0]]
            found = self._analysis_json(owner, analysis[1], "top_examples.json")
            listed = found.get(site, {}).get(str(channel), {}).get(window)
            if listed is None:
                raise Refused(404, f"the analysis has no top examples {window!r} of this channel")
            rows = [(int(r["item"]), float(r["value"])) for r in listed]
        else:
            column = values[noise, :, channel]
            order = np.argsort(-column, kind="stable")[:k]
            rows = [(int(i), float(column[i])) for i in order]
        out = []
        for item, value in rows:
            if not 0 <= item < len(run.items):
                continue
            entry = run.items[item]
            image = entry.get("image")
            try:  # run.json is data: its image path must lie inside the run like any request
                image_ok = bool(image) and inside(stage.path, str(image), decoded=True).is_file()
            except Refused:
                image_ok = False
            out.append({"item": item, "id": entry.get("id", str(item)), "value": round(value, 5),
                        "caption": f"{entry.get('prompt', '')} · seed {entry.get('seed')}",
                        "image": (base / image).as_posix() if image_ok else None})  # fmt: skip
        return out

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


def _timestep_count(run: Path) -> int:
    import json

    try:
        return len(json.loads((run / "run.json").read_text()).get("timesteps") or [])
    except (OSError, ValueError, AttributeError):
        return 0


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
