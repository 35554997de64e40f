"""THINGS odd-one-out data for alignment: concepts, triplets, noise ceiling, human embeddings.

The image side of the THINGS layout (``things_concepts.tsv`` + ``images/``) is read by
:func:`diffprobe.data.sources.things` for extraction; this module reads what alignment needs on
top of it and validates it, so that a bad file is reported by path before any analysis::

    root/things_concepts.tsv            row order = concept index (``uniqueID`` column)
    root/images/<uniqueID>.jpg          or a folder images/<uniqueID>/ per concept
    root/triplets/train_90.npy          (triplets, 3) 0-based concept indices, column 2 the odd
    root/triplets/test_10.npy           one out (columns 0 and 1 the most similar pair); plain
                                        text (.txt/.tsv/.csv, N×3 integers) is read as well
    root/triplets/noise_ceiling.json    optional: {"ceiling": float, ...}
    root/triplets/repeated.npy          optional: (repeated, repeats) odd-one-out concept of
                                        every response; the ceiling is computed from it when no
                                        noise_ceiling.json is present

Items of an extraction run are mapped to concepts by :meth:`Things.item_concepts` (the THINGS
source names items ``<uniqueID>/<file>``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffprobe.data.sources import DataError, read_things_concepts, things_image_files

log = logging.getLogger(__name__)

TRIPLET_SPLITS = {"train": "train_90", "test": "test_10"}
TEXT_SUFFIXES = (".txt", ".tsv", ".csv")


def validate_triplets(triplets: np.ndarray, n_concepts: int, where: str = "triplets") -> np.ndarray:
    """Check a (triplets, 3) array of 0-based concept indices; returns it as int64.

    Raises :class:`DataError` naming ``where`` and the first bad row when the shape is wrong,
    values are not integers, an index is outside ``[0, n_concepts)`` or a triplet repeats an
    item.
    """
    array = np.asarray(triplets)
    if array.ndim != 2 or array.shape[1] != 3:
        raise DataError(f"{where}: expected an array of shape (triplets, 3), got {array.shape}")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            row = int(np.flatnonzero(~np.all(array == np.round(array), axis=1))[0])
            raise DataError(
                f"{where}: row {row} {array[row].tolist()} holds non-integer values; "
                "triplets are 0-based integer concept indices"
            )
    elif array.dtype.kind not in "iu":
        raise DataError(f"{where}: expected integer concept indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    outside = (array < 0) | (array >= n_concepts)
    if outside.any():
        row = int(np.flatnonzero(outside.any(axis=1))[0])
        raise DataError(
            f"{where}: {int(outside.any(axis=1).sum())} triplets have concept indices outside "
            f"0..{n_concepts - 1} (there are {n_concepts} concepts), first at row {row}: "
            f"{array[row].tolist()}; indices are 0-based rows of things_concepts.tsv (subtract 1 "
            "from 1-based files)"
        )
    repeated = (
        (array[:, 0] == array[:, 1]) | (array[:, 0] == array[:, 2]) | (array[:, 1] == array[:, 2])
    )
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        raise DataError(
            f"{where}: {int(repeated.sum())} triplets repeat a concept, first at row {row}: "
            f"{array[row].tolist()}; every triplet needs three different concepts"
        )
    return array


def read_triplets(path: str | Path, n_concepts: int) -> np.ndarray:
    """Triplets from ``.npy`` or plain text (N×3 integers separated by spaces, tabs or commas),
    validated against ``n_concepts``: int64 (triplets, 3)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"triplet file {path} does not exist")
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    else:
        text = path.read_text().replace(",", " ")
        try:
            array = np.loadtxt(text.splitlines(), ndmin=2)
        except ValueError as err:
            raise DataError(f"{path}: cannot read N×3 integers ({err})") from None
    return validate_triplets(array, n_concepts, str(path))


def read_embedding(path: str | Path, n_concepts: int) -> np.ndarray:
    """A (concepts, dims) embedding from ``.npy`` or plain text (e.g. the 66-d SPoSE embedding),
    one row per concept in ``things_concepts.tsv`` order: float64."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"embedding file {path} does not exist")
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    else:
        array = np.loadtxt(path.read_text().replace(",", " ").splitlines(), ndmin=2)
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != n_concepts:
        raise DataError(
            f"{path}: expected an embedding of shape ({n_concepts}, dims), one row per "
            f"concept, got {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise DataError(f"{path}: the embedding holds NaN or infinite values")
    return array


@dataclass
class Things:
    """Concepts, triplet sets and the noise ceiling of a THINGS root (see the module docstring)."""

    root: Path
    concepts: list[dict]
    triplets: dict[str, np.ndarray] = field(default_factory=dict)
    ceiling: float | None = None
    ceiling_source: str = "none"

    @property
    def n_concepts(self) -> int:
        return len(self.concepts)

    @property
    def unique_ids(self) -> list[str]:
        return [row["uniqueID"] for row in self.concepts]

    def get_triplets(self, which: str | Path = "test") -> np.ndarray:
        """``"train"``, ``"test"``, ``"all"`` (both), or the path of a triplet file."""
        if which == "all":
            if not self.triplets:
                raise DataError(f"{self.root / 'triplets'} holds no triplet files")
            return np.concatenate(list(self.triplets.values()))
        if which in self.triplets:
            return self.triplets[which]
        if str(which) in TRIPLET_SPLITS:
            raise DataError(
                f"{self.root / 'triplets'} has no {TRIPLET_SPLITS[str(which)]}.npy (or .txt); "
                f"it has {', '.join(self.triplets) or 'no triplet files'}; pass a triplet file path"
            )
        return read_triplets(Path(which), self.n_concepts)

    def item_concepts(self, manifest: list[dict]) -> np.ndarray:
        """Concept index of every item of a run manifest: int64 (items,), -1 where unknown.

        An item belongs to concept ``uid`` when its id starts with ``uid/`` (the THINGS source),
        else when its label equals a ``uniqueID`` (an image folder with one sub-folder per
        concept), else when its label equals a concept's unique ``Word``.
        """
        by_uid = {uid: index for index, uid in enumerate(self.unique_ids)}
        words: dict[str, int] = {}
        for index, row in enumerate(self.concepts):
            word = row.get("Word")
            if word:
                words[word] = -2 if word in words else index  # -2: ambiguous
        concepts = np.full(len(manifest), -1, dtype=np.int64)
        for position, item in enumerate(manifest):
            prefix = str(item.get("id", "")).split("/")[0]
            label = item.get("label") or ""
            if prefix in by_uid:
                concepts[position] = by_uid[prefix]
            elif label in by_uid:
                concepts[position] = by_uid[label]
            elif words.get(label, -1) >= 0:
                concepts[position] = words[label]
        unknown = int((concepts < 0).sum())
        if unknown == len(concepts):
            example = manifest[0] if manifest else {}
            raise DataError(
                f"no item of the run belongs to a concept of {self.root / 'things_concepts.tsv'} "
                f"(e.g. item id {example.get('id')!r}, label {example.get('label')!r}); extract "
                "from the THINGS root itself (--data ROOT) so item ids are <uniqueID>/<file>"
            )
        if unknown:
            log.warning("%d of %d items match no concept and are left out", unknown, len(concepts))
        return concepts


def _find_triplet_file(folder: Path, stem: str) -> Path | None:
    for suffix in (".npy", *TEXT_SUFFIXES):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def load_things(root: str | Path, check_images: bool = True) -> Things:
    """Read and validate a THINGS root: concepts, the train / test triplets found under
    ``triplets/`` and the noise ceiling. With ``check_images`` every concept must have at least
    one image (files are listed, not decoded)."""
    from diffprobe.data.things_export import noise_ceiling

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"THINGS root {root} is not a folder")
    concepts = read_things_concepts(root)
    ids = [row["uniqueID"] for row in concepts]
    if len(set(ids)) != len(ids):
        duplicate = next(uid for uid in ids if ids.count(uid) > 1)
        raise DataError(f"{root / 'things_concepts.tsv'}: uniqueID {duplicate!r} appears twice")
    if check_images:
        for index, uid in enumerate(ids):
            if not things_image_files(root, uid):
                raise DataError(
                    f"concept '{uid}' (row {index} of things_concepts.tsv) has no image: expected "
                    f"{root / 'images' / uid}.jpg or image files in {root / 'images' / uid}/"
                )
    folder = root / "triplets"
    triplets = {}
    for name, stem in TRIPLET_SPLITS.items():
        path = _find_triplet_file(folder, stem)
        if path is not None:
            triplets[name] = read_triplets(path, len(ids))
    ceiling, source = None, "none"
    if (folder / "noise_ceiling.json").is_file():
        stored = json.loads((folder / "noise_ceiling.json").read_text())
        if "ceiling" not in stored:
            raise DataError(f"{folder / 'noise_ceiling.json'} has no 'ceiling' entry")
        ceiling, source = float(stored["ceiling"]), str(folder / "noise_ceiling.json")
    elif (folder / "repeated.npy").is_file():
        choices = np.load(folder / "repeated.npy", allow_pickle=False)
        ceiling, source = noise_ceiling(choices), str(folder / "repeated.npy")
    if ceiling is not None and not 1 / 3 < ceiling <= 1:
        raise DataError(f"noise ceiling {ceiling} from {source} is outside (1/3, 1]")
    return Things(root, concepts, triplets, ceiling, source)


SHAPES_FACTOR_NAMES = ("hue_cos", "hue_sin", "curved", "convex", "pointed", "fill")


def shapes_factor_embedding(concepts: list[dict]) -> np.ndarray:
    """The true factors of the shapes-world concepts (a THINGS export): (concepts, 6) =
    cos and sin of the hue, and the four shape features of ``things_export.SHAPE_FEATURES``
    (the quantities the export's ground-truth similarity is built from); column names in
    ``SHAPES_FACTOR_NAMES``."""
    from diffprobe.data.things_export import SHAPE_FEATURES

    if not concepts or not {"hue_degrees", "shape"} <= set(concepts[0]):
        raise DataError(
            "the true factors need the shapes-world columns hue_degrees and shape in "
            "things_concepts.tsv (written by diffprobe.data.things_export)"
        )
    hue = np.radians([float(row["hue_degrees"]) for row in concepts])
    shape = np.array([SHAPE_FEATURES[row["shape"]] for row in concepts], dtype=np.float64)
    return np.column_stack([np.cos(hue), np.sin(hue), shape])
