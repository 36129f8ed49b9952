"""Person re-id dataset readers: train / query / gallery lists from the release layouts (docs/DESIGN.md §5).

Every reader returns a :class:`ReidDataset`. Training identities are relabelled 0..K-1 (in the order
of their original ids); query and gallery keep the original ids, since evaluation only compares them.
Identity -1 (Market-1501's junk boxes) is dropped everywhere; identity 0 (Market's distractors) stays
in the gallery (docs/DESIGN.md §4); ids below -1 are not identities and are refused, as are ids past `ID_MAX`
(the pipeline carries them as int32). Camera ids are the numbers in the release (Market ``c1`` → 1).
List files are UTF-8, with or without a byte-order mark (`rga_keras.reading.read_text`).
"""
from __future__ import annotations

import csv
import io
import os
import re
import warnings
from pathlib import Path

from rga_keras.data._cache import read_marker
from rga_keras.data.cuhk03 import read_cuhk03
from rga_keras.data.image_check import find_corrupt
from rga_keras.data.samples import SPLITS, DatasetWarning, ReidDataset, Sample, count_split
from rga_keras.data.synthetic import ensure_synthetic
from rga_keras.reading import read_text

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
JUNK_ID = -1
ID_MAX = 2**31 - 1  # ids travel as int32 through the tf.data pipeline

# Official counts as (identities, images) once junk is dropped; identity 0 counts as one gallery id.
OFFICIAL_COUNTS = {
    "market1501": {"train": (751, 12936), "query": (750, 3368), "gallery": (751, 15913)},
    "dukemtmc": {"train": (702, 16522), "query": (702, 2228), "gallery": (1110, 17661)},
    "msmt17": {"train": (1041, 32621), "query": (3060, 11659), "gallery": (3060, 82161)},
    "cuhk03-labeled": {"train": (767, 7368), "query": (700, 1400), "gallery": (700, 5328)},
    "cuhk03-detected": {"train": (767, 7365), "query": (700, 1400), "gallery": (700, 5332)},
}

_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")


def load_dataset(name: str, root: str | Path | None = None, *, strict: bool = False, check_images: bool = True,
                 **kwargs) -> ReidDataset:
    """Read a dataset in one of the layouts of docs/DESIGN.md §5.

    name: ``market1501``, ``dukemtmc``, ``msmt17`` (kwarg ``include_val=True`` adds list_val.txt to
    training, as in the official 32,621-image training set), ``cuhk03`` (kwargs ``split="labeled"`` or
    ``"detected"``, ``cache_dir``: the cache folder; images are extracted into its cuhk03/<split>/),
    ``folder`` (train/ or bounding_box_train/, query/, gallery/ or bounding_box_test/ holding
    Market-style names) or ``csv`` (a folder with train.csv, query.csv, gallery.csv of
    ``path,person_id,camera_id`` rows), or ``synthetic``: the built-in synthetic dataset
    (`rga_keras.data.synthetic`, generated on first use into ``root`` or the cache; kwargs are
    `ensure_synthetic`'s).
    root: the release folder, or a folder holding it one level down.
    strict: fail on the first file name or list line that does not parse, or image that is corrupt,
    instead of skipping it.
    check_images: read every JPEG through libjpeg in strict mode and skip (count, warn about) the ones that
    decode only with "Corrupt JPEG data" warnings (`rga_keras.data.image_check`; about 0.2 ms per image).
    """
    key = name.lower()
    if key == "synthetic":
        root, key = ensure_synthetic(root, **kwargs), "market1501"
        kwargs = {}
    if key not in _READERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if root is None:
        raise ValueError(f"{key}: the dataset root is not set (the folder holding the release)")
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{key}: dataset root {root} does not exist")
    reader, allowed = _READERS[key]
    unknown = set(kwargs) - set(allowed)
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise TypeError(f"{key}: unexpected argument(s) {sorted(unknown)}; accepted: {accepted}")
    skipped = _Skipped(strict)
    splits, expected, folder = reader(root, skipped, **kwargs)
    if check_images:
        splits = _without_corrupt(splits, skipped)
    return _finish(key if key != "cuhk03" else f"cuhk03-{kwargs.get('split', 'labeled')}",
                   splits, expected, folder, skipped, _SOURCES.get(key, {}))


# --------------------------------------------------------------------------- bookkeeping


class _Skipped:
    """Collects inputs that do not parse (in strict mode the first one raises) and the reader's notes."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.items: list[str] = []
        self.first = ""  # the first item with its reason
        self.notes: list[str] = []  # things a reader wants said in the dataset's summary
        self.warnings: list[str] = []  # said once the dataset is known not to be empty
        self.duplicates: list[str] = []  # list rows naming an image listed before, dropped

    def __call__(self, where: str, why: str) -> None:
        if self.strict:
            raise ValueError(f"{where}: {why}")
        self.first = self.first or f"{where}: {why}"
        self.items.append(where)

    def duplicate(self, where: str, line: int) -> None:
        """A list row naming an image listed before (on ``line``): dropped, counted in one note per dataset."""
        self.duplicates.append(f"{where} repeats line {line}")


def _without_corrupt(splits: dict[str, list[Sample]], skipped: _Skipped) -> dict[str, list[Sample]]:
    """The splits less the images that are corrupt JPEGs or unreadable: counted and the first named in the
    notes and a `DatasetWarning` (an error in strict mode)."""
    bad = find_corrupt(sorted({s.path for samples in splits.values() for s in samples}))
    if not bad:
        return splits
    first = min(bad)
    if skipped.strict:
        raise ValueError(f"{first}: {bad[first]}")
    note = f"skipped {len(bad)} corrupt images, the first: {first}: {bad[first]}"
    skipped.notes.append(note)
    skipped.warnings.append(f"{note}; pass check_images=False to keep them")
    return {k: [s for s in v if s.path not in bad] for k, v in splits.items()}



def _finish(name: str, splits: dict[str, list[Sample]], expected: dict | None, folder: Path,
            skipped: _Skipped, sources: dict[str, tuple[str, ...]]) -> ReidDataset:
    """Drop junk, relabel training ids, check counts, and collect the notes."""
    notes = []
    junk = sum(s.person_id == JUNK_ID for samples in splits.values() for s in samples)
    splits = {k: [s for s in v if s.person_id != JUNK_ID] for k, v in splits.items()}
    if not any(splits.values()):
        junk_note = f" ({junk} junk images, id -1)" if junk else ""
        first = f"; all {len(skipped.items)} entries were unusable, the first: {skipped.first}" if skipped.items else ""
        raise ValueError(f"{name}: no images found under {folder}{junk_note}{first}"
                         + "".join(f"; {note}" for note in skipped.notes))
    for message in skipped.warnings:
        warnings.warn(f"{name}: {message}", DatasetWarning, stacklevel=3)
    if junk:
        notes.append(f"dropped {junk} junk images (id -1)")
    if skipped.items:
        notes.append(f"skipped {len(skipped.items)} unusable entries, the first: {skipped.first}")
        warnings.warn(
            f"{name}: skipped {len(skipped.items)} files or lines that do not parse or name no image "
            f"(first: {skipped.first}); pass strict=True to fail on them instead",
            DatasetWarning, stacklevel=3)
    if skipped.duplicates:
        note = f"dropped {len(skipped.duplicates)} duplicate rows, the first: {skipped.duplicates[0]}"
        notes.append(note)
        warnings.warn(f"{name}: {note} (each image is used once)", DatasetWarning, stacklevel=3)
    notes += skipped.notes
    notes.append(_check_counts(name, splits, expected, folder))
    train_ids = sorted({s.person_id for s in splits["train"]})
    relabel = {pid: i for i, pid in enumerate(train_ids)}
    train = [s._replace(person_id=relabel[s.person_id]) for s in splits["train"]]
    where = {split: _source(folder, names) for split, names in sources.items()}
    return ReidDataset(name, train, splits["query"], splits["gallery"], len(train_ids),
                       tuple(n for n in notes if n), where)


def _source(folder: Path, names: tuple[str, ...]) -> str:
    """The file or folder a split was read from (the first of ``names`` present in ``folder``)."""
    return str(next((folder / n for n in names if (folder / n).exists()), folder / names[0]))


def _check_counts(name: str, splits: dict[str, list[Sample]], expected: dict | None, folder: Path) -> str:
    """Compare (ids, images) per split with the official release; warn when they differ."""
    if expected is None:
        return ""
    marker = read_marker(folder)
    if marker and marker.get("generator") == "rga-synth":
        return "synthetic (rga-synth), not the official release"
    found = {k: count_split(v) for k, v in splits.items()}
    diffs = [f"{k} {found[k][0]} ids/{found[k][1]} images (official {want[0]}/{want[1]})"
             for k, want in expected.items() if found[k] != want]
    if not diffs:
        return "counts match the official release"
    warnings.warn(f"{name} at {folder} is not the official release: " + "; ".join(diffs),
                  DatasetWarning, stacklevel=4)
    return "counts differ from the official release"


# --------------------------------------------------------------------------- layouts


def _find_layout(root: Path, required: tuple[str, ...], *, any_of: bool = False) -> Path | None:
    """``root`` if it holds every entry in ``required`` (``any_of``: at least one), else the first child that does."""
    if not root.is_dir():
        return None
    holds = any if any_of else all
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    return next((p for p in candidates if holds((p / r).exists() for r in required)), None)


def _layout_error(name: str, root: Path, expected: str) -> FileNotFoundError:
    present = sorted(p.name for p in root.iterdir()) if root.is_dir() else ["(not a folder)"]
    listing = ", ".join(present[:5]) + (f", … ({len(present)} entries)" if len(present) > 5 else "")
    return FileNotFoundError(f"{name}: expected {expected} in {root} or one level below; "
                             f"found: {listing or '(empty folder)'}")


def _market_sample(path: Path) -> Sample | str:
    """The sample a ``PPPP_cC*`` file name gives, or why it gives none."""
    match = _MARKET_NAME.match(path.name)
    if match is None:
        return "file name does not start with PPPP_cC (person id, camera)"
    return _id_problem(match[1], match[2]) or Sample(str(path), int(match[1]), int(match[2]))


def _id_problem(person_id: str, camera_id: str, names: tuple[str, str] = ("person id", "camera id")) -> str:
    """What is wrong with the ids as read (integers in text, called ``names``), or ""."""
    if int(person_id) < JUNK_ID:
        return f"{names[0]} {person_id} is below -1 (ids are >= 0, or -1 for junk)"
    for name, value in zip(names, (person_id, camera_id)):
        if abs(int(value)) > ID_MAX:
            return f"{name} {value} is out of range (at most {ID_MAX})"
    return ""


def _market_files(folder: Path, skipped: _Skipped) -> list[Sample]:
    """Samples from a flat folder of ``PPPP_cC*`` images (other files, e.g. Thumbs.db, are ignored)."""
    samples = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        sample = _market_sample(path)
        if isinstance(sample, str):
            skipped(str(path), sample)
        else:
            samples.append(sample)
    return samples


def _no_images(name: str, folder: Path) -> ValueError:
    """Why ``folder`` gave no sample: no image files at all, or none whose name could be used (the first's reason)."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        return ValueError(f"{name}: no images in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} files)")
    return ValueError(f"{name}: none of the {len(images)} images in {folder} could be used; the first, "
                      f"{images[0].name}: {_market_sample(images[0])} (Market-1501 names look like "
                      "0002_c1s1_000451_03.jpg)")


def _read_market(root: Path, skipped: _Skipped, expected_key: str):
    layout = ("bounding_box_train", "query", "bounding_box_test")
    folder = _find_layout(root, layout)
    if folder is None:
        raise _layout_error(expected_key, root, "bounding_box_train/, query/ and bounding_box_test/")
    splits = {split: _market_files(folder / sub, skipped) for split, sub in zip(SPLITS, layout)}
    for split, sub in zip(SPLITS, layout):
        if not splits[split]:
            raise _no_images(expected_key, folder / sub)
    return splits, OFFICIAL_COUNTS[expected_key], folder


def _read_folder(root: Path, skipped: _Skipped):
    names = {"train": ("train", "bounding_box_train"), "query": ("query",),
             "gallery": ("gallery", "bounding_box_test")}
    folder = _find_layout(root, tuple(o for options in names.values() for o in options), any_of=True)
    if folder is None:
        raise _layout_error("folder", root, "train/ (or bounding_box_train/), query/ and gallery/ "
                            "(or bounding_box_test/) holding PPPP_cC*.jpg images")
    folders = {split: next((folder / o for o in options if (folder / o).is_dir()), None)
               for split, options in names.items()}
    return {split: _market_files(f, skipped) if f else [] for split, f in folders.items()}, None, folder


def _read_msmt17(root: Path, skipped: _Skipped, include_val: bool = True):
    lists = ("list_train.txt", "list_query.txt", "list_gallery.txt")
    for train_dir, test_dir in (("train", "test"), ("mask_train_v2", "mask_test_v2")):
        folder = _find_layout(root, (train_dir, test_dir) + lists)
        if folder is not None:
            break
    else:
        raise _layout_error("msmt17", root, "MSMT17_V1 (train/, test/) or MSMT17_V2 (mask_train_v2/, "
                            "mask_test_v2/) with list_train.txt, list_query.txt, list_gallery.txt")
    train_lists = ["list_train.txt"] + (["list_val.txt"] if include_val else [])
    train = [s for f in train_lists if (folder / f).exists() for s in _msmt_list(folder, f, train_dir, skipped)]
    splits = {"train": train,
              "query": _msmt_list(folder, "list_query.txt", test_dir, skipped),
              "gallery": _msmt_list(folder, "list_gallery.txt", test_dir, skipped)}
    expected = dict(OFFICIAL_COUNTS["msmt17"])
    if not include_val:
        del expected["train"]
    return splits, expected, folder


def _msmt_list(folder: Path, list_name: str, image_dir: str, skipped: _Skipped) -> list[Sample]:
    """Lines ``relative/path pid``; the camera is the third ``_`` field of the file name."""
    samples = []
    lines = read_text(folder / list_name).splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            rel, pid = fields
            camera = int(Path(rel).name.split("_")[2])
            sample = Sample(str(folder / image_dir / rel), int(pid), camera)
        except (ValueError, IndexError):
            skipped(f"{folder / list_name}:{number}", f"expected 'path pid' with a name like "
                    f"0000_000_01_0303morning_0015_0.jpg, found {line!r}")
            continue
        problem = _id_problem(str(sample.person_id), str(sample.camera_id))
        if problem:
            skipped(f"{folder / list_name}:{number}", problem)
        else:
            samples.append(sample)
    for sample in samples[:1] + samples[-1:]:
        if not Path(sample.path).exists():
            raise FileNotFoundError(f"msmt17: {list_name} names {sample.path}, which does not exist "
                                    f"(are the list files and image folders from the same release?)")
    return samples


def _read_csv(root: Path, skipped: _Skipped):
    folder = _find_layout(root, tuple(f"{split}.csv" for split in SPLITS), any_of=True)
    if folder is None:
        raise _layout_error("csv", root, "train.csv, query.csv and/or gallery.csv (rows path,person_id,camera_id)")
    files = {split: folder / f"{split}.csv" for split in SPLITS}
    splits = {split: _csv_rows(f, folder, skipped) if f.exists() else [] for split, f in files.items()}
    outside = [s.path for samples in splits.values() for s in samples if not _inside(s.path, folder)]
    if outside:
        skipped.notes.append(f"{len(outside)} images outside {folder} (absolute paths or links, e.g. {outside[0]})")
    return splits, None, folder


_CSV_HEADER = ["path", "person_id", "camera_id"]


def _csv_rows(file: Path, folder: Path, skipped: _Skipped) -> list[Sample]:
    """Rows ``path,person_id,camera_id`` (an optional header row of those names), UTF-8 with or without a BOM;
    empty cells after the third (a spreadsheet's) are ignored.

    A relative path is taken from the file's folder and must stay inside ``folder`` (the dataset root);
    images elsewhere need an absolute path. A row that does not parse is an error naming its line (a list
    is written by hand or by a script, so one bad row usually means all are); a row naming a missing
    image is skipped (an error with ``strict``); a row naming an image already listed (the same file, links
    followed) is dropped with a note, or an error when it gives the image other ids.
    """
    samples, first_line = [], {}
    for number, row in enumerate(csv.reader(io.StringIO(read_text(file), newline="")), 1):
        cells = [c.strip() for c in row]
        while len(cells) > len(_CSV_HEADER) and not cells[-1]:  # the empty cells a spreadsheet adds at the end
            cells.pop()
        if not any(cells) or (number == 1 and [c.lower() for c in cells] == _CSV_HEADER):
            continue
        where = f"{file}:{number}"
        sample = _csv_sample(cells, file, folder, where)
        if not Path(sample.path).is_file():
            skipped(where, f"image {sample.path} does not exist")
            continue
        key = os.path.realpath(sample.path)
        if key in first_line:
            line, earlier = first_line[key]
            if earlier.person_id != sample.person_id or earlier.camera_id != sample.camera_id:
                raise ValueError(f"{where}: {sample.path} is listed on line {line} already, with other ids "
                                 f"({earlier.person_id},{earlier.camera_id} there, {sample.person_id},"
                                 f"{sample.camera_id} here): which is right?")
            skipped.duplicate(where, line)
            continue
        first_line[key] = (number, sample)
        samples.append(sample)
    return samples


def _csv_sample(cells: list[str], file: Path, folder: Path, where: str) -> Sample:
    """One parsed row, or a ValueError saying what is wrong with it."""
    expected = "expected 3 comma-separated columns path,person_id,camera_id"
    if len(cells) != 3:
        other = next((sep for sep in ";\t|" if len(cells) == 1 and sep in cells[0]), None)
        hint = f" (the separator must be a comma, this row uses {other!r})" if other else ""
        raise ValueError(f"{where}: {expected}, found {len(cells)} column(s){hint}: {','.join(cells)!r}")
    path, pid, camera = cells
    for name, value in (("person_id", pid), ("camera_id", camera)):
        if not re.fullmatch(r"-?\d+", value):
            raise ValueError(f"{where}: {name} must be an integer, found {value!r}")
    problem = _id_problem(pid, camera, ("person_id", "camera_id"))
    if problem:
        raise ValueError(f"{where}: {problem}")
    if not path:
        raise ValueError(f"{where}: the path column is empty")
    full = os.path.normpath(file.parent / path)
    if not Path(path).is_absolute() and not Path(full).is_relative_to(os.path.normpath(folder)):
        raise ValueError(f"{where}: relative path {path!r} leads outside the dataset folder {folder}; "
                         f"write it as an absolute path to use an image from elsewhere")
    return Sample(full, int(pid), int(camera))


def _inside(path: str, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder`` once links are followed (a link inside leading out is outside)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def _read_cuhk03(root: Path, skipped: _Skipped, split: str = "labeled", cache_dir: str | Path | None = None):
    splits, folder = read_cuhk03(root, split, cache_dir)
    return splits, OFFICIAL_COUNTS[f"cuhk03-{split}"], folder


_READERS = {
    "market1501": (lambda root, skipped: _read_market(root, skipped, "market1501"), ()),
    "dukemtmc": (lambda root, skipped: _read_market(root, skipped, "dukemtmc"), ()),
    "msmt17": (_read_msmt17, ("include_val",)),
    "cuhk03": (_read_cuhk03, ("split", "cache_dir")),
    "folder": (_read_folder, ()),
    "csv": (_read_csv, ()),
}
DATASETS = (*_READERS, "synthetic")  # the names load_dataset reads
# Where each layout's splits come from, for messages about a split (first name present in the release folder).
_SOURCES = {
    "market1501": {"train": ("bounding_box_train",), "query": ("query",), "gallery": ("bounding_box_test",)},
    "dukemtmc": {"train": ("bounding_box_train",), "query": ("query",), "gallery": ("bounding_box_test",)},
    "msmt17": {"train": ("list_train.txt",), "query": ("list_query.txt",), "gallery": ("list_gallery.txt",)},
    "folder": {"train": ("train", "bounding_box_train"), "query": ("query",),
               "gallery": ("gallery", "bounding_box_test")},
    "csv": {split: (f"{split}.csv",) for split in SPLITS},
}
