"""THINGS odd-one-out data for alignment: concepts, triplets, noise ceiling, human embeddings.

The image side of the THINGS layout (``things_concepts.tsv`` + ``images/``) is read by
:func:`diffprobe.data.sources.things` for extraction; this module reads what alignment needs on
top of it and validates it, so that a bad file is reported by path before any analysis::

    root/concepts/things_concepts.tsv   row order = concept index (``uniqueID`` column); the
                                        layout of the THINGS release and the alignment paper
    root/things_concepts.tsv            the flat layout (read when concepts/ has no table)
    root/images/<uniqueID>.jpg          or a folder images/<uniqueID>/ per concept
    root/triplets/train_90.npy          (triplets, 3) 0-based concept indices, column 2 the odd
    root/triplets/test_10.npy           one out (columns 0 and 1 the most similar pair); plain
                                        text (.txt/.tsv/.csv, N×3 integers) is read as well
    root/triplets/noise_ceiling.json    optional: {"ceiling": float, ...}
    root/triplets/repeated.npy          optional: (repeated, repeats) odd-one-out concept of
                                        every response; the ceiling is computed from it when no
                                        noise_ceiling.json is present

Without either file, a root of exactly :data:`THINGS_CONCEPTS` (1,854) concepts is taken as the
real THINGS database and gets the published human noise ceiling :data:`THINGS_CEILING` (0.673,
the value human_alignment and gLocal plot against); any other root has no ceiling unless given.

Items of an extraction run are mapped to concepts by :meth:`Things.item_concepts` (the THINGS
source names items ``<uniqueID>/<file>``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffprobe.data.sources import (
    DataError,
    read_text_file,
    read_things_concepts,
    things_concepts_path,
    things_image_files,
)

log = logging.getLogger(__name__)

TRIPLET_SPLITS = {"train": "train_90", "test": "test_10"}
THINGS_CONCEPTS = 1854
THINGS_CEILING = 0.673
THINGS_CEILING_SOURCE = (
    "THINGS default 0.673 (human noise ceiling of the 1,854-concept THINGS triplets)"
)
TEXT_SUFFIXES = (".txt", ".tsv", ".csv")


def validate_triplets(triplets: np.ndarray, n_concepts: int, where: str = "triplets") -> np.ndarray:
    """Check a (triplets, 3) array of 0-based concept indices; returns it as int64.

    Raises :class:`DataError` naming ``where`` and the first bad row when the shape is wrong,
    values are not integers, an index is outside ``[0, n_concepts)`` or a triplet repeats an
    item.
    """
    array = np.asarray(triplets)
    if array.size == 0:
        raise DataError(
            f"{where} holds no triplets; it needs rows of three 0-based concept indices, "
            "column 2 the odd one out"
        )
    if array.ndim != 2 or array.shape[1] != 3:
        raise DataError(
            f"{where}: expected an array of shape (triplets, 3), got {array.shape}; each row "
            "is three 0-based concept indices, column 2 the odd one out"
        )
    if array.dtype.kind == "f":
        whole = np.isfinite(array) & (array == np.round(array))
        if not whole.all():
            row = int(np.flatnonzero(~whole.all(axis=1))[0])
            raise DataError(
                f"{where}: row {row} {array[row].tolist()} holds non-integer values; "
                "triplets are 0-based integer concept indices"
            )
    elif array.dtype.kind not in "iu":
        raise DataError(
            f"{where}: expected integer concept indices, got {_dtype_name(array.dtype)}; "
            "triplets are 0-based integer rows of things_concepts.tsv"
        )
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


def _dtype_name(dtype: np.dtype) -> str:
    kinds = {"U": "text", "S": "bytes", "O": "Python objects", "b": "booleans", "c": "complex"}
    return f"{kinds.get(dtype.kind, 'values')} (dtype {dtype})"


def load_array(path: str | Path, what: str) -> np.ndarray:
    """The array of a ``.npy`` file, never unpickling: :class:`DataError` naming ``path`` when
    it is missing, not a ``.npy`` array, truncated or holds Python objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist" if not path.exists() else
                        f"{what} {path} is not a file")  # fmt: skip
    with path.open("rb") as handle:
        if handle.read(6) != b"\x93NUMPY":
            raise DataError(
                f"{what} {path} is not a .npy file (no numpy header); save a numeric array "
                "with numpy.save"
            )
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        reason = (
            "it holds Python objects, which diffprobe never unpickles"
            if "allow_pickle" in str(err) and "Object arrays" in str(err)
            else f"it is not a readable .npy array ({str(err).split('. ')[0]})"
        )
        raise DataError(f"{what} {path}: {reason}; save a numeric array with numpy.save") from None
    except (OSError, EOFError) as err:
        raise DataError(
            f"{what} {path}: it is not a readable .npy array ({err or 'empty file'}); save a "
            "numeric array with numpy.save"
        ) from None
    return array


def _load_text_table(path: Path, what: str) -> np.ndarray:
    """Numbers separated by spaces, tabs or commas, one row a line: float64 (rows, columns)."""
    text = read_text_file(path, what).replace(",", " ")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return np.zeros((0, 0))
    try:
        return np.loadtxt(lines, ndmin=2)
    except ValueError as err:
        raise DataError(
            f"{what} {path}: cannot read it as rows of numbers ({err}); write one row a line, "
            "numbers separated by spaces, tabs or commas"
        ) from None


def read_triplets(path: str | Path, n_concepts: int) -> np.ndarray:
    """Triplets from ``.npy`` or plain text (N×3 integers separated by spaces, tabs or commas),
    validated against ``n_concepts``: int64 (triplets, 3)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"triplet file {path} does not exist; pass test, train, all or the path of a "
            "triplet file (.npy or text, N×3)"
            if not path.exists()
            else f"triplet file {path} is not a file"
        )
    if path.suffix.lower() == ".npy":
        array = load_array(path, "triplet file")
    else:
        array = _load_text_table(path, "triplet file")
    return validate_triplets(array, n_concepts, f"triplet file {path}")


def read_embedding(path: str | Path, n_concepts: int) -> np.ndarray:
    """A (concepts, dims) embedding from ``.npy`` or plain text (e.g. the 66-d SPoSE embedding),
    one row per concept in ``things_concepts.tsv`` order: float64."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        array = load_array(path, "embedding file")
    else:
        if not path.exists():
            raise DataError(f"embedding file {path} does not exist; pass a .npy or text file")
        array = _load_text_table(path, "embedding file")
    if array.dtype.kind not in "iuf":
        raise DataError(f"embedding file {path}: expected numbers, got {_dtype_name(array.dtype)}")
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
                f"no item of the run belongs to a concept of {things_concepts_path(self.root)} "
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


def noise_ceiling(choices: np.ndarray) -> float:
    """Leave-one-out agreement of repeated choices (repeated, repeats), labels of the odd one out.

    Each response is predicted by the most frequent label among the other responses to the same
    triplet, ties split evenly; returns the mean score over all responses.
    """
    choices = np.asarray(choices)
    if choices.ndim != 2 or choices.shape[1] < 2:
        raise DataError(
            f"repeated choices must be (triplets, repeats >= 2), got shape {choices.shape}"
        )
    scores = []
    for row in choices:
        labels, counts = np.unique(row, return_counts=True)
        for label, count in zip(labels, counts, strict=True):
            others = counts - (labels == label)
            modes = others == others.max()
            scores.append(count * float(modes[labels == label][0]) / modes.sum())
    return float(np.sum(scores) / choices.size)


def _read_ceiling(path: Path) -> float:
    """The ``ceiling`` number of a ``noise_ceiling.json``."""
    try:
        stored = json.loads(read_text_file(path, "noise ceiling file"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"noise ceiling file {path} is not valid JSON ({err}); it needs "
            '{"ceiling": <accuracy between 1/3 and 1>}'
        ) from None
    if not isinstance(stored, dict) or "ceiling" not in stored:
        raise DataError(
            f"noise ceiling file {path} has no 'ceiling' entry; it needs "
            '{"ceiling": <accuracy between 1/3 and 1>} (or remove it, or pass --ceiling)'
        )
    value = stored["ceiling"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise DataError(
            f"noise ceiling file {path}: 'ceiling' is {value!r}, not a number between 1/3 and 1"
        )
    return float(value)


def load_things(root: str | Path, check_images: bool = True) -> Things:
    """Read and validate a THINGS root: concepts, the train / test triplets found under
    ``triplets/`` and the noise ceiling. With ``check_images`` every concept must have at least
    one image (files are listed, not decoded)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"THINGS root {root} is not a folder")
    concepts = read_things_concepts(root)
    ids = [row["uniqueID"] for row in concepts]
    if len(set(ids)) != len(ids):
        duplicate = next(uid for uid in ids if ids.count(uid) > 1)
        raise DataError(f"{things_concepts_path(root)}: uniqueID {duplicate!r} appears twice")
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
        source = str(folder / "noise_ceiling.json")
        ceiling = _read_ceiling(folder / "noise_ceiling.json")
    elif (folder / "repeated.npy").is_file():
        choices = load_array(folder / "repeated.npy", "repeated choices file")
        if choices.ndim != 2 or choices.shape[1] < 2 or choices.dtype.kind not in "iu":
            raise DataError(
                f"repeated choices file {folder / 'repeated.npy'}: expected integers of shape "
                f"(triplets, repeats >= 2), the odd-one-out concept of every response, got "
                f"{_dtype_name(choices.dtype)} of shape {choices.shape}"
            )
        ceiling, source = noise_ceiling(choices), str(folder / "repeated.npy")
    if ceiling is None and len(ids) == THINGS_CONCEPTS:
        ceiling, source = THINGS_CEILING, THINGS_CEILING_SOURCE
    if ceiling is not None and not 1 / 3 < ceiling <= 1:
        raise DataError(f"noise ceiling {ceiling} from {source} is outside (1/3, 1]")
    return Things(root, concepts, triplets, ceiling, source)
