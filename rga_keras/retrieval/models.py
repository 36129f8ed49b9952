"""Embedding models of every format behind one callable: raw RGB pixels (n, H, W, 3) float32 0–255, already
resized to the model's input size → L2-normalised float32 embeddings (n, d).

Formats: a ``.keras`` re-id model (`rga_keras.export.load_reid_model`, embedding by
`rga_keras.embedding_model`), a SavedModel version folder as rga-export writes it (its ``serving_default``
signature; feature and input size from ``assets/rga_metadata.json``), a ``.tflite`` file
(`rga_keras.export.TFLiteEmbedder`) and an ``.onnx`` file (`rga_keras.export.ONNXEmbedder`, ONNX Runtime;
input (n, H, W, 3); the feature from its metadata where rga-export wrote it).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from rga_keras.models import FEATURES
from rga_keras.retrieval.topk import unit_rows

MODEL_FORMATS = ("keras", "saved_model", "tflite", "onnx")


@dataclass(frozen=True)
class Embedder:
    """A loaded model: ``embedder(images)`` gives L2-normalised float32 embeddings (n, d).

    ``feature`` is "after_bn"/"before_bn", or None where the file does not say (TFLite, an ONNX file not
    written by rga-export).
    """

    path: Path
    format: str
    input_size: tuple[int, int]
    feature: str | None
    run: Callable[[np.ndarray], np.ndarray]

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
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "saved_model"
        versions = sorted(p.name for p in path.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file())
        hint = f"; it holds SavedModel versions, pass one of them, e.g. {path / versions[-1]}" if versions else ""
        raise ValueError(f"model folder {path} is not a SavedModel (no saved_model.pb){hint}")
    suffix = path.suffix.lower()
    if suffix in (".keras", ".tflite", ".onnx"):
        return suffix[1:]
    raise ValueError(f"unsupported model {path}: expected a .keras, .tflite or .onnx file or a SavedModel version "
                     "folder")


def load_embedder(path: str | os.PathLike, feature: str | None = None) -> Embedder:
    """Load the model at ``path`` (any of `MODEL_FORMATS`) as an `Embedder`.

    ``feature`` picks a ``.keras`` model's embedding (default "after_bn"); an exported model has its feature
    built in, and asking for another one is an error. Errors say which file and why (ValueError,
    FileNotFoundError; ImportError for ``.onnx`` without onnxruntime).
    """
    if feature is not None and feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    path = Path(path).expanduser()
    fmt = model_format(path)
    embedder = {"keras": _load_keras, "saved_model": _load_saved_model, "tflite": _load_tflite,
                "onnx": _load_onnx}[fmt](path, feature)
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
    from rga_keras import embedding_model
    from rga_keras.export import ExportError, load_reid_model

    try:
        model = load_reid_model(path)
    except ExportError as err:
        raise ValueError(str(err)) from None
    feature = feature or "after_bn"
    embed = embedding_model(model, feature)
    size = tuple(int(d) for d in model.input.shape[1:3])
    return Embedder(path, "keras", size, feature, embed.predict_on_batch)


def _load_saved_model(path: Path, feature: str | None) -> Embedder:
    import tensorflow as tf

    from rga_keras.export import METADATA_FILE

    try:
        signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    except KeyError:
        raise ValueError(f"SavedModel {path} has no serving_default signature") from None
    except Exception as err:  # a damaged SavedModel: TF's own error, with the folder named
        raise ValueError(f"could not load SavedModel {path}: {type(err).__name__}: {err}") from None
    (name, spec), = signature.structured_input_signature[1].items()
    metadata = path / "assets" / METADATA_FILE
    if metadata.is_file():  # rga-export's: the input is declared (None, None, None, None) on purpose
        meta = json.loads(metadata.read_text())
        size, found = (meta["input"]["height"], meta["input"]["width"]), meta.get("feature")
    else:
        size, found = tuple(spec.shape[1:3]), None
        if len(spec.shape) != 4 or None in size:
            raise ValueError(f"SavedModel {path} has no {METADATA_FILE} and its serving_default input {name} "
                             f"{spec.shape} does not fix the image size")
    dtype = spec.dtype.as_numpy_dtype

    def run(images: np.ndarray) -> np.ndarray:
        if dtype == np.uint8:
            images = np.clip(np.round(images), 0, 255).astype(np.uint8)
        outputs = signature(**{name: tf.constant(images)})
        return (outputs["embedding"] if "embedding" in outputs else next(iter(outputs.values()))).numpy()

    return Embedder(path, "saved_model", (int(size[0]), int(size[1])), found, run)


def _load_tflite(path: Path, feature: str | None) -> Embedder:
    from rga_keras.export import TFLiteEmbedder

    try:
        embed = TFLiteEmbedder(path)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"could not load {path} as a TFLite model: {err}") from None
    if len(embed.input_shape) != 3 or embed.input_shape[2] != 3:
        raise ValueError(f"{path} takes input (n, {', '.join(map(str, embed.input_shape))}), not images "
                         "(n, H, W, 3)")
    return Embedder(path, "tflite", embed.input_shape[:2], feature, embed)


def _load_onnx(path: Path, feature: str | None) -> Embedder:
    from rga_keras.export import ONNXEmbedder

    try:
        embed = ONNXEmbedder(path)
    except ImportError:
        raise ImportError(f"reading {path} needs onnxruntime, which is not installed (pip install onnxruntime)") \
            from None
    except Exception as err:  # onnxruntime's own error types (InvalidProtobuf, ...)
        raise ValueError(f"could not load {path} as an ONNX model: {err}") from None
    shape = embed.input_shape
    if len(shape) != 3 or shape[2] != 3 or not all(isinstance(d, int) for d in shape[:2]):
        raise ValueError(f"{path} takes input of shape (n, {', '.join(map(str, shape))}), not images (n, H, W, 3) "
                         "of a fixed size")
    return Embedder(path, "onnx", (shape[0], shape[1]), embed.feature or feature, embed)
