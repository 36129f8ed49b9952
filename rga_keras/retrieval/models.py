"""Embedding models of every format behind one callable: raw RGB pixels (n, H, W, 3) float32 0–255, already
resized to the model's input size → L2-normalised float32 embeddings (n, d).

Formats: a ``.keras`` re-id model (`rga_keras.load_reid_model`, embedding by `rga_keras.embedding_model`), and
every file format rga-export writes — a SavedModel version folder, a ``.tflite`` or an ``.onnx`` file — loaded by
that format's own ``load`` (`rga_keras.export.formats`), as the export's checks ran it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rga_keras.checks import check_choice
from rga_keras.export.formats import FILE_FORMATS, file_format_module, file_format_of
from rga_keras.models import FEATURES, embedding_model, load_reid_model
from rga_keras.retrieval.topk import unit_rows

MODEL_FORMATS = ("keras", *FILE_FORMATS)


@dataclass(frozen=True)
class Embedder:
    """A loaded model: ``embedder(images)`` gives L2-normalised float32 embeddings (n, d).

    ``feature`` is "after_bn"/"before_bn", or None where the file does not say (TFLite, an ONNX file not
    written by rga-export). ``keras_model``: the re-id model itself for a ``.keras`` file (attention maps are
    drawn from it), None for the other formats.
    """

    path: Path
    format: str
    input_size: tuple[int, int]
    feature: str | None
    run: Callable[[np.ndarray], np.ndarray]
    keras_model: Any = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Embeddings of raw RGB pixels 0-255 (n, H, W, 3); a batch whose pixels are all <= 1 is refused as
        images scaled to [0, 1] (the rule of the SavedModel's serving_default, docs/EXPORT.md)."""
        images = np.asarray(images, np.float32)
        if images.size and images.max() <= 1.0:
            raise ValueError("every pixel of the batch is <= 1: the images look scaled to [0, 1]; pass raw RGB "
                             "pixel values 0-255, as decoding the image file gives them, without scaling")
        return unit_rows(np.asarray(self.run(images), np.float32))


def model_format(path: str | os.PathLike) -> str:
    """The format of the model at ``path`` (one of `MODEL_FORMATS`); a clear error for anything else."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist")
    if path.suffix.lower() == ".keras":
        return "keras"
    found = file_format_of(path)
    if found is not None:
        return found
    if path.is_dir():
        versions = sorted(p.name for p in path.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file())
        hint = f"; it holds SavedModel versions, pass one of them, e.g. {path / versions[-1]}" if versions else ""
        raise ValueError(f"model folder {path} is not a SavedModel (no saved_model.pb){hint}")
    raise ValueError(f"unsupported model {path}: expected a .keras, .tflite or .onnx file or a SavedModel version "
                     "folder")


def load_embedder(path: str | os.PathLike, feature: str | None = None) -> Embedder:
    """Load the model at ``path`` (any of `MODEL_FORMATS`) as an `Embedder`.

    ``feature`` picks a ``.keras`` model's embedding (default "after_bn"); an exported model has its feature
    built in, and asking for another one is an error. Errors say which file and why (ValueError,
    FileNotFoundError; ImportError for ``.onnx`` without onnxruntime).
    """
    if feature is not None:
        check_choice("feature", feature, FEATURES)
    path = Path(path).expanduser()
    fmt = model_format(path)
    if fmt == "keras":
        embedder = _load_keras(path, feature)
    else:  # an exported artefact, run as the export checked it (rga_keras.export.formats)
        runner = file_format_module(fmt).load(path)
        embedder = Embedder(path, fmt, runner.input_size, runner.feature or feature, runner.run)
    if feature is not None and embedder.feature not in (None, feature):
        raise ValueError(f"{path} computes the {embedder.feature} feature, not {feature}")
    return embedder


def model_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a model file, or of a folder's files (relative names and contents, in sorted order)."""
    path = Path(path).expanduser()
    if path.is_file():
        return _file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file)}\0".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_keras(path: Path, feature: str | None) -> Embedder:
    model = load_reid_model(path)
    feature = feature or "after_bn"
    embed = embedding_model(model, feature)
    size = tuple(int(d) for d in model.input.shape[1:3])
    return Embedder(path, "keras", size, feature, embed.predict_on_batch, model)
