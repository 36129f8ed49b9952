"""The model an export starts from: is it an RGA re-id model, loading it, its relation path, its BatchNorm
statistics, and the one function every artefact computes (images → L2-normalised embedding)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from rga_keras.checks import check_choice
from rga_keras.export.formats import BuildJob
from rga_keras.layers import RELATIONS, RGAOptions
from rga_keras.models import FEATURES, RGAReID, RGAResNetBackbone, count_parameters, embedding_model


class ExportError(RuntimeError):
    """The model cannot be exported as asked (not a re-id model, bad options, an artefact that fails)."""


class ParityError(ExportError):
    """An artefact missed a parity threshold; ``report`` holds every measured number."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


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


def write_float_saved_model(model: keras.Model, source_dir: str | os.PathLike, feature: str = "after_bn") -> Path:
    """A plain float32 SavedModel of the embedding function (fixed H, W; no input checks): what the TFLite and
    ONNX models are converted from.

    Its signature ``serving_default`` (images → {"embedding"}) becomes the TFLite model's signature.
    """
    info = reid_model_info(model)
    check_choice("feature", feature, FEATURES)
    height, width = info["input_size"]
    embedder = embedding_model(model, feature)
    archive = keras.export.ExportArchive()
    archive.add_endpoint("serving_default", embed_function(embedder),
                         input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name="images")])
    archive.write_out(str(source_dir), verbose=False)
    return Path(source_dir)


def float_saved_model(job: BuildJob) -> Path:
    """The float32 SavedModel of the job's embedding (`write_float_saved_model`) that the TFLite and ONNX models are
    converted from, written once per export."""
    return job.once("float_saved_model",
                    lambda: write_float_saved_model(job.model, job.staging / "float_source", job.feature))
