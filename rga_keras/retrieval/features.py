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

import numpy as np

from rga_keras.files import atomic_write
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
        s = self.source
        return (f"{len(self.paths)} images x {self.features.shape[1]}-d, model {s['model']} ({s['model_format']}, "
                f"sha256 {s['model_sha256'][:12]}), feature {s['feature'] or 'unknown'}, input "
                f"{s['input_size'][0]}x{s['input_size'][1]}, flip {'on' if s['flip'] else 'off'}")


def write_features(path: str | os.PathLike, data: FeatureSet) -> Path:
    """Write ``data`` to ``path`` (HDF5) atomically."""
    import h5py

    features = np.asarray(data.features, np.float32)
    if features.ndim != 2 or len(features) != len(data.paths) or not len(features):
        raise ValueError(f"expected (n, d) features for the n = {len(data.paths)} paths, got {features.shape}")

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as out:
            out.create_dataset("features", data=features)
            out.create_dataset("paths", data=list(data.paths), dtype=h5py.string_dtype())
            out.attrs.update(format=FILE_FORMAT, version=FILE_VERSION, **{
                **data.source, "feature": data.source["feature"] or "",
                "input_size": np.asarray(data.source["input_size"], np.int64)})

    return atomic_write(path, write)


def is_features_candidate(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HDF5 file, hence to be read as a features file (never an image)."""
    import h5py

    path = Path(path).expanduser()
    return path.is_file() and h5py.is_hdf5(path)


def read_features(path: str | os.PathLike) -> FeatureSet:
    """Read a features file; ValueError saying why for a file that is not one."""
    import h5py

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"features file {path} does not exist")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path} is not a features file (rga-embed writes HDF5; this is not HDF5)")
    with h5py.File(path, "r") as file:
        if file.attrs.get("format") != FILE_FORMAT or "features" not in file or "paths" not in file:
            raise ValueError(f"{path} is an HDF5 file but not an rga-embed features file")
        if file.attrs["version"] > FILE_VERSION:
            raise ValueError(f"{path} is a version {file.attrs['version']} features file; this rga-keras reads "
                             f"version {FILE_VERSION}")
        features = file["features"][()]
        paths = [p.decode() if isinstance(p, bytes) else str(p) for p in file["paths"][()]]
        keys = ("model", "model_sha256", "model_format", "feature", "input_size", "flip")
        source = {key: file.attrs[key] for key in keys}
    if features.ndim != 2 or len(features) != len(paths):
        raise ValueError(f"{path} is damaged: {len(paths)} paths but features of shape {features.shape}")
    source = {**source, "feature": source["feature"] or None, "flip": bool(source["flip"]),
              "input_size": [int(v) for v in source["input_size"]]}
    return FeatureSet(features.astype(np.float32, copy=False), paths, source)


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
