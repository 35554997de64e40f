"""Data sources for extraction: an image folder, the THINGS layout, the shapes world.

Every source is a list of :class:`Item` (id, label, optional caption, a loader) built once up
front, so unreadable files are found and reported by path before any model work, and the item
manifest (with content hashes) is fixed before indices are assigned.

``open_source(spec)`` understands:
- ``shapes:N`` or ``shapes:N:SEED`` or ``shapes:N:SEED:heldout``: N items of the shapes world;
- a folder with ``concepts/things_concepts.tsv`` or ``things_concepts.tsv``: the THINGS layout (``images/<uniqueID>/*``);
- any other folder: images found recursively; the label is the first sub-folder's name, or
  comes from ``labels.csv`` (columns ``path,label[,caption]``) when that file is present.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffprobe.errors import DiffprobeError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class DataError(DiffprobeError):
    pass


class UnreadableImageError(DataError):
    """An image file that cannot be decoded; ``reason`` says why (without the path)."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(
            f"cannot read image {path}: {reason}. Fix or remove it, or pass --on-error skip to "
            "leave it out (it is then listed in run.json)"
        )


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


def _read_image(path: Path, data: bytes | None = None) -> np.ndarray:
    """Decode the whole image file at ``path`` (or its bytes ``data``) to uint8 RGB
    (height, width, 3), the first frame of an animation.

    8-bit modes (grey, palette, RGBA, LA, CMYK, ...) go through PIL's ``convert("RGB")``,
    which drops alpha. Deeper images keep their real range instead of being clipped at 255:
    16-bit grey (modes ``I;16*``, and ``I`` with values in 0..65535) is divided by 257 and
    rounded, so 65535 is 255; float images (mode ``F``) must hold values in [0, 1], which are
    multiplied by 255 and rounded. Other integer or float ranges, NaN and infinity raise
    :class:`DataError`, as does a file that is truncated or not an image.
    """
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            img.load()  # decodes every byte: a truncated file fails here, not mid-run
            if img.mode.startswith("I") or img.mode == "F":
                grey = _deep_to_uint8(np.asarray(img), img.mode, path)
                return np.repeat(grey[..., None], 3, axis=-1)
            return np.asarray(img.convert("RGB"))
    except UnreadableImageError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds
        raise UnreadableImageError(path, f"{type(err).__name__}: {err}") from None


def _deep_to_uint8(values: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey image (height, width) as uint8 (see
    :func:`_read_image` for the rules)."""
    finite = np.isfinite(values) if values.dtype.kind == "f" else np.ones(values.shape, bool)
    if not finite.all():
        raise UnreadableImageError(path, f"mode {mode} image holds NaN or infinite pixels")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F":
        if low < 0 or high > 1:
            raise UnreadableImageError(
                path,
                f"float image with values in [{low:g}, {high:g}], and diffprobe reads float "
                "images as intensities in [0, 1] (rescale it, or save it as 8-bit)",
            )
        return np.round(values.astype(np.float64) * 255).astype(np.uint8)
    if low < 0 or high > 65535:
        raise UnreadableImageError(
            path,
            f"mode {mode} image with values in [{low:g}, {high:g}], and diffprobe reads 8- and "
            "16-bit images (save it as an 8- or 16-bit PNG)",
        )
    return np.round(values.astype(np.float64) / 257).astype(np.uint8)


def _center_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def _file_items(
    paths: list[tuple[Path, str, str | None, str]], on_error: str
) -> tuple[list[Item], list[dict]]:
    """Items of image files, each decoded in full once here (and again when loaded, so no
    image is kept in memory) so that a truncated, empty or foreign file is named before any
    model work: :class:`DataError` with ``on_error="fail"``, else listed in ``skipped``."""
    import os
    import sys

    from tqdm.auto import tqdm

    # a bar only where decoding takes more than a few seconds; --quiet sets TQDM_DISABLE
    quiet = len(paths) < 1000 or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    items, skipped = [], []
    for path, label, caption, item_id in tqdm(
        paths, desc="checking images", unit="image", leave=False, file=sys.stderr, disable=quiet
    ):
        try:
            try:
                data = path.read_bytes()
            except OSError as err:
                raise UnreadableImageError(path, err.strerror or str(err)) from None
            _read_image(path, data)
        except UnreadableImageError as err:
            if on_error == "fail":
                raise
            problem = {"path": str(path), "error": err.reason}
            log.warning("skipping unreadable image %s (%s)", path, err.reason)
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


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` (a BOM is dropped), or :class:`DataError` naming it when it
    is missing, not a file, unreadable or not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path} does not exist; check the path")
    if not path.is_file():
        raise DataError(f"{what} {path} is not a file; pass the file itself")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{what} {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise DataError(f"cannot read {what} {path}: {err.strerror or err}") from None


def image_folder(root: Path, on_error: str = "fail") -> Source:
    root = Path(root)
    labels_csv = root / "labels.csv"
    entries = []
    if labels_csv.is_file():
        rows = csv.DictReader(read_text_file(labels_csv, "label file").splitlines())
        for row in rows:
            if "path" not in row or "label" not in row:
                raise DataError(f"{labels_csv} needs the columns path,label[,caption]")
            entries.append(
                (root / row["path"], row["label"], row.get("caption") or None, row["path"])
            )
        if not entries:
            raise DataError(f"{labels_csv} lists no images; add rows path,label[,caption]")
    else:
        found = sorted(root.rglob("*"))
        for path in (p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()):
            relative = path.relative_to(root)
            label = relative.parts[0] if len(relative.parts) > 1 else ""
            entries.append((path, label, None, relative.as_posix()))
        if not found:
            raise DataError(f"data folder {root} is empty; put image files in it")
        if not entries:
            others = [p.relative_to(root).as_posix() for p in found if p.is_file()]
            seen = f" (it holds {len(others)} other files, e.g. {others[0]})" if others else ""
            raise DataError(
                f"no image files in data folder {root}{seen}; diffprobe reads "
                f"{', '.join(sorted(IMAGE_SUFFIXES))}"
            )
    items, skipped = _file_items(entries, on_error)
    return Source("folder", str(root), items, skipped)


THINGS_CONCEPT_TABLES = ("concepts/things_concepts.tsv", "things_concepts.tsv")


def things_concepts_path(root: Path) -> Path | None:
    """The concept table of a THINGS root: ``concepts/things_concepts.tsv`` (the layout of the
    THINGS release and the alignment paper) or ``things_concepts.tsv`` (flat), the first found;
    None when neither exists."""
    for relative in THINGS_CONCEPT_TABLES:
        if (Path(root) / relative).is_file():
            return Path(root) / relative
    return None


def read_things_concepts(root: Path) -> list[dict]:
    """Rows of ``root/concepts/things_concepts.tsv`` or ``root/things_concepts.tsv``
    (tab-separated, a ``uniqueID`` column); row order is the concept index."""
    table = things_concepts_path(root)
    if table is None:
        raise DataError(
            f"{root} is not a THINGS root: its concept table is missing (neither "
            f"{Path(root) / THINGS_CONCEPT_TABLES[0]} nor {Path(root) / THINGS_CONCEPT_TABLES[1]} "
            "exists); a THINGS root holds "
            "concepts/things_concepts.tsv (or things_concepts.tsv: a uniqueID column, one row per "
            "concept), images/ and triplets/"
        )
    rows = list(csv.DictReader(read_text_file(table, "concept table").splitlines(), delimiter="\t"))
    if not rows or "uniqueID" not in rows[0]:
        raise DataError(
            f"{table} needs a tab-separated header with a uniqueID column and one row per concept"
        )
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


# the shapes world is drawn in memory (12 KB an image): a typo such as shapes:2560000 would
# fill it before any work
MAX_SHAPES_ITEMS = 100_000


def parse_shapes_spec(text: str) -> tuple[int, int, str]:
    """``shapes:N[:SEED[:SPLIT]]`` -> (N, SEED, SPLIT); :class:`DataError` naming ``text``
    unless 1 <= N <= MAX_SHAPES_ITEMS, SEED >= 0 and SPLIT is one of the world's splits."""
    from diffprobe.data.shapes import SPLITS

    usage = (
        f"expected shapes:N[:SEED[:SPLIT]] with N items (1 to {MAX_SHAPES_ITEMS}), a seed >= 0 "
        f"and SPLIT one of {', '.join(SPLITS)}, e.g. shapes:256 or shapes:256:0:heldout"
    )
    parts = text.split(":")[1:]
    if not 1 <= len(parts) <= 3:
        raise DataError(f"data '{text}': {usage}")
    try:
        n = int(parts[0])
        seed = int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise DataError(f"data '{text}': N and SEED must be whole numbers; {usage}") from None
    split = parts[2] if len(parts) > 2 else "train"
    if not 1 <= n <= MAX_SHAPES_ITEMS or seed < 0 or split not in SPLITS:
        raise DataError(f"data '{text}': {usage}")
    return n, seed, split


def open_source(spec: str | Path, on_error: str = "fail") -> Source:
    """Open a data source from its command-line form (see the module docstring)."""
    if on_error not in ("skip", "fail"):
        raise DataError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
    text = str(spec)
    if text.startswith("shapes:"):
        return shapes(*parse_shapes_spec(text))
    root = Path(text).expanduser()
    if not root.exists():
        raise DataError(
            f"data '{text}' does not exist; pass an image folder, a THINGS root (with "
            "things_concepts.tsv) or shapes:N (e.g. shapes:256)"
        )
    if not root.is_dir():
        raise DataError(
            f"data '{text}' is a file, not a folder; pass the folder that holds the images, a "
            "THINGS root (with things_concepts.tsv) or shapes:N (e.g. shapes:256)"
        )
    if things_concepts_path(root) is not None:
        return things(root, on_error)
    return image_folder(root, on_error)


def read_captions(path: Path, source: Source) -> list[str]:
    """Per-item captions from a file: a CSV/TSV with ``id,caption`` columns, or plain text with
    one caption per line in item order."""
    path = Path(path)
    text = read_text_file(path, "captions file")
    if not text.strip():
        raise DataError(
            f"captions file {path} is empty; it needs one caption per item ({len(source)}), "
            "one a line in item order or as id,caption CSV rows"
        )
    if path.suffix.lower() in (".csv", ".tsv"):
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
        if not rows or "id" not in rows[0] or "caption" not in rows[0]:
            raise DataError(
                f"captions file {path} needs a header with the columns id,caption and a row "
                "per item"
            )
        by_id = {r["id"]: r["caption"] for r in rows}
        missing = [it.id for it in source.items if it.id not in by_id]
        if missing:
            raise DataError(
                f"captions file {path} has no caption for {len(missing)} of {len(source)} "
                f"items, e.g. {missing[:3]}; add a row id,caption for each"
            )
        return [by_id[it.id] or "" for it in source.items]
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != len(source):
        raise DataError(
            f"captions file {path} has {len(lines)} captions for {len(source)} items; it needs "
            "one non-empty line per item, in item order"
        )
    return lines


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (items, H, W, 3) -> uint8 (items, size, size, 3) (PIL bicubic; as is when equal)."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([_resize(image, size) for image in images])


def array_source(
    images: np.ndarray,
    description: str,
    ids: list[str] | None = None,
    labels: list[str] | None = None,
    captions: list[str | None] | None = None,
    kind: str = "arrays",
) -> Source:
    """A source of in-memory uint8 images (items, H, W, 3): item ``i`` is ``ids[i]`` (default
    ``item-i``), with its label and caption, hashed like every other item."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"images must be uint8 (items, H, W, 3), got {images.dtype} {images.shape}")
    n = len(images)
    ids = ids or [f"item-{i}" for i in range(n)]
    labels = labels or [""] * n
    captions = captions or [None] * n
    items = [
        Item(id=ids[i], label=labels[i], caption=captions[i],
             sha256=hashlib.sha256(images[i].tobytes()).hexdigest(),
             loader=lambda image=images[i]: image)
        for i in range(n)
    ]  # fmt: skip
    return Source(kind, description, items)


_SHAPES_ID = re.compile(r"shapes-(\d+)-(\w+)-(\d+)")


def manifest_images(manifest: list[dict], kind: str, size: int) -> np.ndarray:
    """uint8 (items, size, size, 3) images of a run's manifest (``run.json``'s ``items``), at
    the run's image size: shapes-world items (``kind`` "shapes") are drawn again from their ids,
    image-folder and THINGS items read from their paths; both are checked against the
    manifest's sha256 (:class:`DataError` when an image moved or changed)."""
    from diffprobe.data import shapes as world

    images = []
    for item in manifest:
        if kind == "shapes":
            match = _SHAPES_ID.fullmatch(item["id"])
            if not match:
                raise DataError(f"shapes item id {item['id']!r} is not shapes-SEED-SPLIT-INDEX")
            seed, split, index = int(match.group(1)), match.group(2), int(match.group(3))
            image = world.sample(1, seed=seed, split=split, start=index).images[0]
            if item.get("sha256") and hashlib.sha256(image.tobytes()).hexdigest() != item["sha256"]:
                raise DataError(
                    f"regenerated shapes item {item['id']} differs from the one extracted "
                    "(sha256); the shapes world changed since the run: re-extract it"
                )
            images.append(image)
            continue
        path = item.get("path")
        if not path or not Path(path).is_file():
            raise DataError(
                f"image of item {item['id']} is not at {path!r}; the run's images must stay where "
                "they were extracted from"
            )
        data = Path(path).read_bytes()
        if item.get("sha256") and hashlib.sha256(data).hexdigest() != item["sha256"]:
            raise DataError(f"{path} changed since the run was extracted (sha256); re-extract it")
        images.append(_resize(_center_square(_read_image(Path(path), data)), size))
    return resize_images(np.stack(images), size)
