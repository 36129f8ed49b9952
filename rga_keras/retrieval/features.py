"""The features file: L2-normalised embeddings, their image paths, and what made them, in one HDF5 file.

Layout (HDF5, written by h5py): dataset ``features`` float32 (n, d), dataset ``paths`` (n,) UTF-8 strings,
and file attributes ``format`` = "rga-keras features", ``version``, ``model`` (the model's path),
``model_sha256``, ``model_format``, ``feature`` ("" where the model file does not say), ``input_size``
[H, W] and ``flip``. Files are written atomically (`rga_keras.files.atomic_write`): an interrupted write
leaves the previous file, or none.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from rga_keras.files import atomic_write
from rga_keras.reading import naming
from rga_keras.retrieval.models import Embedder, model_sha256

FILE_FORMAT = "rga-keras features"
FILE_VERSION = 1
# What made the embeddings; vectors can be compared only when all of these agree (the model path may differ).
SOURCE_KEYS = ("model_sha256", "feature", "input_size", "flip")


@dataclass(frozen=True)
class FeatureSet:
    """Embeddings (n, d) float32, their image ``paths`` and their ``source``: model, model_sha256,
    model_format, feature, input_size [H, W], flip."""

    features: np.ndarray
    paths: list[str]
    source: dict

    def describe(self) -> str:
        return describe(len(self.paths), self.features.shape[1], self.source)


def write_features(path: str | os.PathLike, data: FeatureSet) -> Path:
    """Write ``data`` to ``path`` (HDF5) atomically."""
    features = np.asarray(data.features, np.float32)
    if features.ndim != 2 or len(features) != len(data.paths) or not len(features):
        raise ValueError(f"expected (n, d) features for the n = {len(data.paths)} paths, got {features.shape}")
    return write_feature_chunks(path, data.source, [(features, data.paths)], features.shape)


def write_feature_chunks(path: str | os.PathLike, source: dict, chunks: Iterable[tuple[np.ndarray, Sequence[str]]],
                         shape: tuple[int, int]) -> Path:
    """Write a features file of ``shape`` (rows, d) from ``chunks`` of (features, paths), atomically, holding one
    chunk in memory at a time: files larger than memory are written (and appended to) this way."""
    import h5py

    rows, dim = (int(v) for v in shape)

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as out:
            features = out.create_dataset("features", (rows, dim), np.float32)  # contiguous: memory-mappable
            paths = out.create_dataset("paths", (rows,), dtype=h5py.string_dtype())
            done = 0
            for vectors, names in chunks:
                vectors = np.asarray(vectors, np.float32)
                if vectors.ndim != 2 or vectors.shape[1] != dim or len(vectors) != len(names) \
                        or done + len(vectors) > rows:
                    raise ValueError(f"expected ({dim}-d) features with one path each, {rows} rows in all; got "
                                     f"{vectors.shape} for {len(names)} paths after {done} rows")
                features[done:done + len(vectors)] = vectors
                paths[done:done + len(vectors)] = list(names)
                done += len(vectors)
            if done != rows:
                raise ValueError(f"expected {rows} rows, got {done}")
            out.attrs.update(format=FILE_FORMAT, version=FILE_VERSION, **{
                **source, "feature": source["feature"] or "", "input_size": np.asarray(source["input_size"], np.int64)})

    return atomic_write(path, write)


def is_features_candidate(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HDF5 file, hence to be read as a features file (never an image)."""
    import h5py

    path = Path(path).expanduser()
    return path.is_file() and h5py.is_hdf5(path)


def read_features(path: str | os.PathLike) -> FeatureSet:
    """Read a features file into memory; ValueError saying why for a file that is not one."""
    with open_features(path) as file:
        return FeatureSet(np.array(file.features), file.paths_at(np.arange(len(file.features))), file.source)


class FeaturesFile:
    """An open features file whose vectors stay on disk: ``features`` is a read-only `numpy.memmap` of the
    HDF5 dataset (rga-embed writes it contiguous and uncompressed; a file written otherwise is read into
    memory), ``paths_at(ids)`` reads only the paths asked for. `open_features` makes one; close it after use."""

    def __init__(self, path: Path) -> None:
        import h5py

        self.path = path
        with naming(path, "an rga-embed features file (HDF5)"):
            self._file = h5py.File(path, "r")
        try:
            with naming(path, "an rga-embed features file (HDF5)"):
                self.source = _checked_source(path, self._file)
                self._data = data = self._file["features"]
                self._paths = self._file["paths"]
                self._offset = data.id.get_offset()  # None unless contiguous (h5py: never for compressed data)
                if self._offset is not None and data.dtype == np.dtype("<f4") and data.size:
                    self.features = np.memmap(path, np.float32, "r", offset=self._offset, shape=data.shape)
                else:
                    self._offset = None
                    self.features = data[()].astype(np.float32, copy=False)
        except BaseException:
            self._file.close()
            raise

    def paths_at(self, ids: np.ndarray) -> list[str]:
        """The paths of rows ``ids`` (any order, repeats allowed)."""
        ids = np.asarray(ids, np.int64)
        unique, where = np.unique(ids, return_inverse=True)
        contiguous = len(unique) and unique[-1] - unique[0] + 1 == len(unique)
        found = (self._paths[unique[0]:unique[-1] + 1] if contiguous  # a slice: much faster than a point list
                 else self._paths[unique] if len(unique) else [])  # h5py reads increasing indices
        names = [p.decode() if isinstance(p, bytes) else str(p) for p in found]
        return [names[i] for i in where.reshape(-1)]

    def describe(self) -> str:
        return describe(len(self.features), self.features.shape[1], self.source)

    def chunks(self, rows: int = 1 << 14) -> Iterator[tuple[np.ndarray, list[str]]]:
        """The file's (features, paths), ``rows`` at a time, in order (for copying it)."""
        for start in range(0, len(self.features), rows):
            stop = min(start + rows, len(self.features))
            yield self.rows(start, stop), self.paths_at(np.arange(start, stop))

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any order) read with one ``pread`` each rather than through the memory map: gathering
        rows spread over a large file through the map would map far more of it than it reads (the kernel maps
        the pages around each fault: a 40,000-row sample of a 7.6 GiB file mapped 5.2 GiB)."""
        ids = np.asarray(ids, np.int64)
        if self._offset is None:
            return np.asarray(self.features[ids])
        out = np.empty((len(ids), self.features.shape[1]), np.float32)
        size = out.shape[1] * 4
        with open(self.path, "rb", buffering=0) as handle:
            for i, row in enumerate(ids):
                out[i] = np.frombuffer(os.pread(handle.fileno(), size, self._offset + int(row) * size), np.float32)
        return out

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` read into memory (through HDF5, not the memory map: a pass over a large file then
        leaves no mapped pages behind)."""
        return self._data[start:stop].astype(np.float32, copy=False)

    def close(self) -> None:
        self.features = None
        self._file.close()

    def __enter__(self) -> "FeaturesFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_features(path: str | os.PathLike) -> FeaturesFile:
    """Open a features file without reading its vectors (`FeaturesFile`); ValueError saying why for a file
    that is not one."""
    import h5py

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"features file {path} does not exist")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path} is not a features file (rga-embed writes HDF5; this is not HDF5)")
    return FeaturesFile(path)


def _checked_source(path: Path, file) -> dict:
    """The ``source`` of an open features file, after checking that it is one."""
    if file.attrs.get("format") != FILE_FORMAT or "features" not in file or "paths" not in file:
        raise ValueError(f"{path} is an HDF5 file but not an rga-embed features file")
    if file.attrs.get("version", 0) > FILE_VERSION:
        raise ValueError(f"{path} is a version {file.attrs['version']} features file; this rga-keras reads "
                         f"version {FILE_VERSION}")
    keys = ("model", "model_sha256", "model_format", "feature", "input_size", "flip")
    missing = [key for key in ("version", *keys) if key not in file.attrs]
    if missing:
        raise ValueError(f"{path} is an incomplete rga-embed features file: it lacks the attribute(s) "
                         f"{', '.join(missing)} (written by another program, or damaged)")
    shape = file["features"].shape
    if len(shape) != 2 or shape[0] != len(file["paths"]):
        raise ValueError(f"{path} is damaged: {len(file['paths'])} paths but features of shape {shape}")
    source = {key: file.attrs[key] for key in keys}
    return {**source, "model": str(source["model"]), "model_sha256": str(source["model_sha256"]),
            "model_format": str(source["model_format"]), "feature": str(source["feature"]) or None,
            "flip": bool(source["flip"]), "input_size": [int(v) for v in source["input_size"]]}


def describe(rows: int, dim: int, source: dict) -> str:
    """One line about a set of embeddings: how many, their dimension and what made them."""
    s = source
    return (f"{rows} images x {dim}-d, model {s['model']} ({s['model_format']}, sha256 {s['model_sha256'][:12]}), "
            f"feature {s['feature'] or 'unknown'}, input {s['input_size'][0]}x{s['input_size'][1]}, flip "
            f"{'on' if s['flip'] else 'off'}")


def feature_source(embedder: Embedder, flip: bool) -> dict:
    """The ``source`` of embeddings made by ``embedder`` (with flip averaging or not)."""
    return {"model": str(embedder.path.absolute()), "model_sha256": model_sha256(embedder.path),
            "model_format": embedder.format, "feature": embedder.feature, "input_size": list(embedder.input_size),
            "flip": bool(flip)}


def check_same_source(reference: dict, other: dict, what: str, against: str = "the gallery") -> None:
    """ValueError unless embeddings with source ``other`` (``what``) can be compared with ``reference``'s
    (``against``): the same model file (by hash), feature, input size and flip setting (`SOURCE_KEYS`)."""
    for key in SOURCE_KEYS:
        if reference[key] != other[key]:
            found, wanted = (f"model {s['model']} (sha256 {s['model_sha256'][:12]})" if key == "model_sha256"
                             else f"{key} {s[key]}" for s in (other, reference))
            raise ValueError(f"{what} comes from {found}, but {against} from {wanted}: embeddings of different "
                             "models or settings cannot be compared")


def append_features(data: FeatureSet, features: np.ndarray, paths: list[str]) -> FeatureSet:
    """``data`` with rows added (same source); ValueError if their dimension differs."""
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[1] != data.features.shape[1]:
        raise ValueError(f"new features are {features.shape[1:]}-d, the file's are {data.features.shape[1]}-d")
    return replace(data, features=np.concatenate([data.features, features]), paths=[*data.paths, *paths])
