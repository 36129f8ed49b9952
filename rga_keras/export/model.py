"""The model an export starts from: is it an RGA re-id model, loading it, its relation path, its BatchNorm
statistics, and the one function every artefact computes (images → L2-normalised embedding)."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from rga_keras import models
from rga_keras.layers import RELATIONS, RGAOptions
from rga_keras.models import RGAReID, RGAResNetBackbone, count_parameters


class ExportError(RuntimeError):
    """The model cannot be exported as asked (not a re-id model, bad options, an artefact that fails)."""


class ParityError(ExportError):
    """An artefact missed a parity threshold; ``report`` holds every measured number."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


def check_choice(name: str, value: Any, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_percentile(name: str, value: Any) -> None:
    if value != "auto" and not (isinstance(value, (int, float)) and 0 < value <= 100):
        raise ValueError(f"{name} must be 'auto' or a percentile in (0, 100], got {value!r}")


def reid_model_info(model: Any) -> dict:
    """Check that ``model`` is an RGA re-id model (`rga_keras.RGAReID`) and describe it; `ExportError`
    saying why not otherwise. Baseline models (no RGA module) are re-id models too."""
    if not isinstance(model, RGAReID):
        raise ExportError(f"{type(model).__name__} '{getattr(model, 'name', '?')}' is not an RGA re-id model "
                          f"(rga_keras.RGAReID, as rga_keras.build_rga_resnet50 builds)")
    backbone = model.backbone
    return {
        "keras_name": model.name,
        "input_size": list(backbone.image_shape[:2]),
        "embedding_dim": int(model.output["features"].shape[-1]),
        "parameters": count_parameters(model),
        "rga": {layer.name: layer.mode for layer in backbone.rga_layers},
        "relation": backbone.rga_options.relation if backbone.rga_layers else None,
    }


def load_reid_model(path: str | os.PathLike) -> RGAReID:
    """Load a ``.keras`` file and check it is an RGA re-id model (clear `ExportError` otherwise); a file
    written by rga-keras 0.1 is converted (`rga_keras.load_reid_model`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ExportError(f"model file {path} does not exist")
    if not path.is_file() or path.suffix != ".keras":
        raise ExportError(f"expected a Keras model file ending in .keras (model.save('model.keras')), got {path}")
    if not zipfile.is_zipfile(path):  # Keras itself would say "File not found" about an existing file
        raise ExportError(f"could not load {path} as a Keras model: a .keras file is a zip archive, this one is not "
                          "(truncated, or not saved by model.save)")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as err:  # a zip that is not a model, unknown classes, ...: say which file and why
        raise ExportError(f"could not load {path} as a Keras model: {type(err).__name__}: {err}") from None
    try:
        return models.as_reid_model(model, source=str(path))
    except ValueError as err:
        raise ExportError(str(err)) from None


def with_relation(model: RGAReID, relation: str) -> RGAReID:
    """The same network and weights with every RGA module on the "fused" or "explicit" relation path.

    Both paths compute the same function with the same weights (docs/DESIGN.md §1); they differ in cost.
    """
    check_choice("relation", relation, RELATIONS)
    reid_model_info(model)
    backbone = model.backbone
    config = {**backbone.get_config(), "rga_options": RGAOptions.make(backbone.rga_options, relation=relation)}
    clone = RGAReID(RGAResNetBackbone.from_config(config), model.num_classes, name=model.name)
    clone.set_weights(model.get_weights())
    return clone


def estimate_batchnorm_statistics(model: keras.Model, images: np.ndarray) -> None:
    """Set every BatchNorm's moving mean/variance to its statistics over ``images`` (one training-mode pass).

    For untrained models (dry runs, size and latency benchmarks): with initial statistics (mean 0,
    variance 1) a random ResNet gives nearly the same embedding for every image (pairwise cosine ≈ 0.99999);
    with estimated ones every layer sees normalised activations. A random network stays chaotic, though:
    tiny weight changes (float16 rounding) move its embeddings, so its reduced-precision parity means nothing.
    """
    layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0  # moving statistics := this batch's statistics
        model(tf.constant(images, tf.float32), training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


def embed_function(embedder: keras.Model) -> Callable:
    def embed(images):
        return {"embedding": tf.math.l2_normalize(embedder(images, training=False), axis=-1)}

    return embed


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.einsum("ij,ij->i", a, b) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
