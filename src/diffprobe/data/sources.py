"""Data sources for extraction: an image folder, the THINGS layout, the shapes world.

Every source is a list of :class:`Item` (id, label, optional caption, a loader) built once up
front, so unreadable files are found and reported by path before any model work, and the item
manifest (with content hashes) is fixed before indices are assigned.

``open_source(spec)`` understands:
- ``shapes:N`` or ``shapes:N:SEED`` or ``shapes:N:SEED:heldout``: N items of the shapes world;
- a folder with ``things_concepts.tsv``: the THINGS layout (``images/<uniqueID>/*``);
- any other folder: images found recursively; the label is the first sub-folder's name, or
  comes from ``labels.csv`` (columns ``path,label[,caption]``) when that file is present.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffprobe.errors import DiffprobeError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class DataError(DiffprobeError):
    pass


@dataclass
class Item:
    id: str
    label: str
    caption: str | None
    loader: Callable[[], np.ndarray] = field(repr=False)
    sha256: str = ""
    path: str | None = None

    def load(self) -> np.ndarray:
        return self.loader()


@dataclass
class Source:
    kind: str
    description: str
    items: list[Item]
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, indices) -> np.ndarray:
        """uint8 images (items, H, W, 3) for these indices (all must share one size)."""
        images = [self.items[i].load() for i in indices]
        sizes = {im.shape for im in images}
        if len(sizes) > 1:
            images = [_resize(im, max(s[0] for s in sizes)) for im in images]
        return np.stack(images)

    def manifest(self) -> list[dict]:
        return [
            {
                "id": it.id,
                "label": it.label,
                "caption": it.caption,
                "sha256": it.sha256,
                **({"path": it.path} if it.path else {}),
            }
            for it in self.items
        ]


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _center_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def _file_items(
    paths: list[tuple[Path, str, str | None, str]], on_error: str
) -> tuple[list[Item], list[dict]]:
    from PIL import Image

    items, skipped = [], []
    for path, label, caption, item_id in paths:
        try:
            data = path.read_bytes()
            with Image.open(path) as img:
                img.verify()
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds
            problem = {"path": str(path), "error": f"{type(err).__name__}: {err}"}
            if on_error == "fail":
                raise DataError(
                    f"cannot read image {path}: {problem['error']}. Fix or remove it, or pass "
                    "--on-error skip to leave it out (it is then listed in run.json)"
                ) from None
            log.warning("skipping unreadable image %s (%s)", path, problem["error"])
            skipped.append(problem)
            continue
        items.append(
            Item(
                id=item_id,
                label=label,
                caption=caption,
                path=str(path),
                sha256=hashlib.sha256(data).hexdigest(),
                loader=lambda p=path: _center_square(_read_image(p)),
            )
        )
    return items, skipped


def image_folder(root: Path, on_error: str = "fail") -> Source:
    root = Path(root)
    labels_csv = root / "labels.csv"
    entries = []
    if labels_csv.is_file():
        with labels_csv.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if "path" not in row or "label" not in row:
                    raise DataError(f"{labels_csv} needs the columns path,label[,caption]")
                entries.append(
                    (root / row["path"], row["label"], row.get("caption") or None, row["path"])
                )
    else:
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            relative = path.relative_to(root)
            label = relative.parts[0] if len(relative.parts) > 1 else ""
            entries.append((path, label, None, relative.as_posix()))
    if not entries:
        raise DataError(
            f"no images found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    items, skipped = _file_items(entries, on_error)
    return Source("folder", str(root), items, skipped)


def read_things_concepts(root: Path) -> list[dict]:
    """Rows of ``root/things_concepts.tsv`` (tab-separated, a ``uniqueID`` column); row order is
    the concept index."""
    table = Path(root) / "things_concepts.tsv"
    if not table.is_file():
        raise DataError(f"{root} is not a THINGS root: no things_concepts.tsv in it")
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or "uniqueID" not in rows[0]:
        raise DataError(f"{table} needs a header with a uniqueID column")
    return rows


def things_image_files(root: Path, uid: str) -> list[Path]:
    """Image files of concept ``uid``: ``images/<uid>.jpg|.png|.jpeg`` and ``images/<uid>/*``."""
    images = Path(root) / "images"
    folder, single = images / uid, None
    for suffix in (".jpg", ".png", ".jpeg"):
        if (images / f"{uid}{suffix}").is_file():
            single = images / f"{uid}{suffix}"
    files = (
        sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if folder.is_dir()
        else []
    )
    return [single, *files] if single is not None else files


def things(root: Path, on_error: str = "fail") -> Source:
    """THINGS layout: ``things_concepts.tsv`` (row order = concept index) and
    ``images/<uniqueID>/*`` or ``images/<uniqueID>.jpg``. Labels are the concepts' ``Word``;
    item ids are ``<uniqueID>/<file name>``."""
    root = Path(root)
    entries = []
    for index, row in enumerate(read_things_concepts(root)):
        uid = row["uniqueID"]
        word = row.get("Word") or uid
        files = things_image_files(root, uid)
        if not files:
            raise DataError(f"concept '{uid}' (row {index}) has no image under {root / 'images'}")
        for path in files:
            entries.append((path, word, None, f"{uid}/{path.name}"))
    items, skipped = _file_items(entries, on_error)
    return Source("things", str(root), items, skipped)


def shapes(n: int, seed: int = 0, split: str = "train") -> Source:
    from diffprobe.data import shapes as world

    drawn = world.sample(n, seed=seed, split=split)
    items = []
    for i in range(n):
        image = drawn.images[i]
        colour = world.COLOUR_NAMES[drawn.factors["colour"][i]]
        label = f"{colour} {world.SHAPES[drawn.factors['shape'][i]]}"
        items.append(
            Item(
                id=f"shapes-{seed}-{split}-{i}",
                label=label,
                caption=drawn.captions[i],
                sha256=hashlib.sha256(image.tobytes()).hexdigest(),
                loader=lambda img=image: img,
            )
        )
    return Source("shapes", f"shapes world, {n} items, seed {seed}, split {split}", items)


def open_source(spec: str | Path, on_error: str = "fail") -> Source:
    """Open a data source from its command-line form (see the module docstring)."""
    if on_error not in ("skip", "fail"):
        raise DataError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
    text = str(spec)
    if text.startswith("shapes:"):
        parts = text.split(":")
        try:
            n = int(parts[1])
            seed = int(parts[2]) if len(parts) > 2 else 0
        except (IndexError, ValueError):
            raise DataError(
                f"'{text}': expected shapes:N[:SEED[:SPLIT]], e.g. shapes:256"
            ) from None
        split = parts[3] if len(parts) > 3 else "train"
        return shapes(n, seed, split)
    root = Path(text).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data '{text}' is neither a folder nor shapes:N; pass an image folder, a THINGS "
            "root (with things_concepts.tsv) or shapes:256"
        )
    if (root / "things_concepts.tsv").is_file():
        return things(root, on_error)
    return image_folder(root, on_error)


def read_captions(path: Path, source: Source) -> list[str]:
    """Per-item captions from a file: a CSV/TSV with ``id,caption`` columns, or plain text with
    one caption per line in item order."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".csv", ".tsv"):
        delimiter = "\t" if path.suffix == ".tsv" else ","
        rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
        if not rows or "id" not in rows[0] or "caption" not in rows[0]:
            raise DataError(f"{path} needs the columns id,caption")
        by_id = {r["id"]: r["caption"] for r in rows}
        missing = [it.id for it in source.items if it.id not in by_id]
        if missing:
            raise DataError(f"{path} has no caption for {len(missing)} items, e.g. {missing[:3]}")
        return [by_id[it.id] for it in source.items]
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != len(source):
        raise DataError(f"{path} has {len(lines)} captions for {len(source)} items")
    return lines
