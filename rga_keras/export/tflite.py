"""TFLite models (float32, float16, dynamic-range, int8), builtin ops only, and running them with LiteRT.

The int8 model keeps two op types in float32 by default. The relation products (BATCH_MATMUL of two
activations, the θ·(Φᵀ W) terms of the fused relation path): LiteRT's XNNPACK delegate has no int8 kernel
for them, so a full-integer model runs them in slow reference kernels (docs/BENCHMARKS.md). The additions
(ADD: residual sums, relation sums, biases), where a small term added to a large one is lost to one int8
step: in float they cost 5 % of the int8 model's time at 256×128 and lift its embeddings' cosine to the
float model from 0.979 to 0.984 on the longest-trained demo model (docs/EXPORT.md). Its activation ranges are
percentiles of each tensor's per-image extremes over the calibration images rather than TFLite's plain
min/max, which a few outlying images stretch (`percentile_ranges`).
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from rga_keras.export.model import (ExportError, check_choice, check_percentile, cosine_rows, embed_function,
                                    reid_model_info)
from rga_keras.models import FEATURES, embedding_model

TFLITE_KINDS = ("float32", "float16", "dynamic", "int8")
INT8_FLOAT_OPS = ("BATCH_MATMUL", "ADD")  # ops the int8 model keeps in float32 by default (see above)
# Activation ranges of the int8 model: a percentile over the calibration images of each tensor's per-image
# maximum (and 100 - it of the per-image minimum); 100 = TFLite's own min/max over all images. "auto" (the
# default) tries these and keeps the one whose embeddings best match the float model's (docs/EXPORT.md).
INT8_RANGE_PERCENTILES = (100.0, 99.0, 95.0, 90.0, 80.0)  # tried by range_percentile="auto"


def write_tflite_source(model: keras.Model, source_dir: str | os.PathLike, feature: str = "after_bn") -> Path:
    """A plain float32 SavedModel of the embedding function (fixed H, W; no input checks) to convert from.

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


def convert_tflite(
    source_dir: str | os.PathLike,
    kind: str,
    *,
    representative_images: np.ndarray | None = None,
    int8_io: bool = False,
    float_ops: Sequence[str] = INT8_FLOAT_OPS,
    range_percentile: float | str = "auto",
    info: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> bytes:
    """Convert the SavedModel of `write_tflite_source` to a TFLite flatbuffer, builtin ops only.

    kind: "float32"; "float16" (float16 weights); "dynamic" (dynamic-range: int8 weights); "int8" (int8
    weights and activations, calibrated on ``representative_images`` (n, H, W, 3) raw pixels). For int8,
    ``float_ops`` are TFLite op names kept in float32 (selective quantisation; empty: full integer),
    ``range_percentile`` sets the activation ranges (`percentile_ranges`; 100: TFLite's min/max; "auto":
    each of `INT8_RANGE_PERCENTILES`, keeping the model whose embeddings of ``representative_images`` have
    the highest mean cosine to the float model's; ``info`` (a dict) gets "range_percentile" and
    "calibration_cosine" {percentile: mean cosine}), and ``int8_io`` makes the model take uint8 pixels and
    return int8 embeddings (scale and zero point in the model) instead of float32. ``log`` receives a line
    per int8 step (calibration, each candidate's cosine), which can take minutes at 256×128.
    """
    check_choice("kind", kind, TFLITE_KINDS)
    check_percentile("range_percentile", range_percentile)
    if kind != "int8" and int8_io:
        raise ValueError("int8_io applies to the int8 model only")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(source_dir), signature_keys=["serving_default"])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no SELECT_TF_OPS fallback
    if kind != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if kind != "int8":
        return converter.convert()

    images = np.asarray(representative_images, np.float32) if representative_images is not None else None
    if images is None or images.ndim != 4 or len(images) == 0:
        raise ValueError("the int8 model needs representative_images, a non-empty (n, H, W, 3) array of raw pixels, "
                         f"got {None if images is None else images.shape}")

    def representative():
        for image in images:
            yield [image[None]]

    converter.representative_dataset = representative
    # Selective quantisation and calibrated ranges: TFLite's quantisation debugger calibrates once
    # (`calibrated_model`, float32 with each activation's min/max) and quantises with a denylist.
    with warnings.catch_warnings():  # the debugger runs TF's own (deprecated) tf.lite.Interpreter
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated", category=UserWarning)
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=representative,
            debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops) or None))
    log = log or (lambda line: None)
    percentiles = INT8_RANGE_PERCENTILES if range_percentile == "auto" else (float(range_percentile),)
    if len(percentiles) > 1:
        tried = ", ".join(f"{p:g}" for p in percentiles)
        log(f"int8: calibrated; choosing activation ranges among percentiles {tried}")
    calibrated, scores = _raw_pixel_input(debugger.calibrated_model), {}
    debugger.calibrated_model = calibrated
    extremes = _activation_extremes(calibrated, images) if percentiles != (100.0,) else None
    for percentile in percentiles:
        if extremes is not None:
            debugger.calibrated_model = _set_ranges(calibrated, extremes, percentile)
        candidate = debugger.get_nondebug_quantized_model()
        if len(percentiles) == 1:
            flatbuffer, best = candidate, percentile
            break
        # Choose by the embeddings' cosine to the float model on the calibration images themselves.
        embed = TFLiteEmbedder(candidate)
        got = np.concatenate([embed(images[i : i + 32]) for i in range(0, len(images), 32)])
        scores[percentile] = float(cosine_rows(got, extremes[3]).mean())
        log(f"int8: ranges at percentile {percentile:g}: mean cosine {scores[percentile]:.4f} to the float "
            f"model on the calibration images")
        if scores[percentile] >= max(scores.values()):
            flatbuffer, best = candidate, percentile
    if info is not None:
        info.update(range_percentile=best, calibration_cosine=scores)
    if int8_io:
        from tensorflow.lite.python.util import modify_model_io_type  # what the converter itself uses

        flatbuffer = modify_model_io_type(flatbuffer, tf.uint8, tf.int8)
    return flatbuffer


def _activation_extremes(calibrated: bytes,
                         images: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Run a calibrated (float32) TFLite model on each image: the activations that carry a calibrated range,
    their per-image minima and maxima (n, tensors), and the model's outputs (n, d)."""
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.tools import flatbuffer_utils

    graph = flatbuffer_utils.read_model_from_bytearray(calibrated).subgraphs[0]
    # activations: weights carry no calibrated range, and the input (raw pixels) has a known one
    ranged = [i for i, t in enumerate(graph.tensors) if t.quantization is not None and t.quantization.min is not None
              and len(t.quantization.min) == 1 and i not in graph.inputs]
    with warnings.catch_warnings():  # keeping every tensor is the point here, not a debugging leftover
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors", category=UserWarning)
        interpreter = Interpreter(model_content=bytes(calibrated), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    source, output = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    lows, highs, outputs = np.empty((len(images), len(ranged))), np.empty((len(images), len(ranged))), []
    for n, image in enumerate(images):
        interpreter.set_tensor(source, image[None].astype(np.float32))
        interpreter.invoke()
        for j, i in enumerate(ranged):
            values = interpreter.get_tensor(i)
            lows[n, j], highs[n, j] = values.min(), values.max()
        outputs.append(interpreter.get_tensor(output)[0].copy())
    return ranged, lows, highs, np.array(outputs)


def _raw_pixel_input(calibrated: bytes) -> bytes:
    """The model input's range set to [0, 255], not the calibration images' extremes: raw pixels then map onto
    the int8 grid with scale 1 (an ``int8_io`` model takes raw uint8 pixels as they are) and none is clipped."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(calibrated)
    for i in model.subgraphs[0].inputs:
        quantization = model.subgraphs[0].tensors[i].quantization
        quantization.min, quantization.max = np.array([0.0], np.float32), np.array([255.0], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _set_ranges(calibrated: bytes, extremes: tuple, percentile: float) -> bytes:
    from tensorflow.lite.tools import flatbuffer_utils

    ranged, lows, highs, _ = extremes
    model = flatbuffer_utils.read_model_from_bytearray(calibrated)
    # Over the images where the extreme is non-zero: a tensor that is zero (after ReLU) on most images
    # keeps the range of the images where it carries signal. A tensor that is zero on every image keeps
    # TFLite's range: a zero-width range gives a scale so tiny that XNNPACK refuses the op (slow kernels).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no image left
        low = np.nanpercentile(np.where(lows < 0, lows, np.nan), 100 - percentile, axis=0)
        high = np.nanpercentile(np.where(highs > 0, highs, np.nan), percentile, axis=0)
    for j, i in enumerate(ranged):
        quantization = model.subgraphs[0].tensors[i].quantization
        if np.isnan(low[j]) and np.isnan(high[j]):
            continue
        quantization.min = np.array([0.0 if np.isnan(low[j]) else low[j]], np.float32)  # 0 exactly in range
        quantization.max = np.array([0.0 if np.isnan(high[j]) else high[j]], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def percentile_ranges(calibrated: bytes, images: np.ndarray, percentile: float) -> bytes:
    """Set each activation range of a calibrated TFLite model to a percentile over ``images``, not the extremes.

    TFLite's calibration keeps each tensor's min/max over all images, so a few images with outlying
    activations widen the int8 steps of every other image (RGA's relation features reach 100× their typical
    peak on some images of a weakly trained model). Here each tensor's max is the ``percentile`` of its
    positive per-image maxima and its min the (100 − ``percentile``) percentile of its negative per-image
    minima (0 kept inside; images where the tensor is 0 are left out, and a tensor that is 0 on every image
    keeps its calibrated range); values beyond saturate. The model input (raw pixels) keeps its range. ``calibrated``:
    `QuantizationDebugger.calibrated_model`; ``images``: the calibration images, raw pixels (n, H, W, 3).
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    return _set_ranges(calibrated, _activation_extremes(calibrated, images), percentile)


def tflite_ops(model: str | os.PathLike | bytes) -> dict:
    """The ops of a TFLite model as LiteRT's builtin resolver loads it (no delegate applied).

    Returns {"ops": {name: count}, "float_ops": {name: count} (ops computing float32, QUANTIZE/DEQUANTIZE
    excluded), "builtin_only": bool}. Loading fails with a clear error if the model needs ops that plain
    LiteRT does not have (SELECT_TF_OPS / Flex or custom ops).
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        interpreter = Interpreter(experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                                  **_interpreter_source(model))
    except (RuntimeError, ValueError) as err:
        raise ExportError(f"the TFLite model does not load with LiteRT's builtin ops: {err}") from None
    tensors = interpreter.get_tensor_details()
    ops, float_ops = Counter(), Counter()
    for op in interpreter._get_ops_details():  # LiteRT's only op listing; used by TF's own tools too
        ops[op["op_name"]] += 1
        outputs = [tensors[i]["dtype"] for i in op["outputs"] if i >= 0]
        if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE") and any(d == np.float32 for d in outputs):
            float_ops[op["op_name"]] += 1
    builtin = all(not name.startswith("Flex") and name not in ("CUSTOM", "DELEGATE") for name in ops)
    return {"ops": dict(sorted(ops.items())), "float_ops": dict(sorted(float_ops.items())), "builtin_only": builtin}


def _interpreter_source(model: str | os.PathLike | bytes) -> dict:
    """LiteRT Interpreter keyword arguments for a flatbuffer in memory or a file path."""
    return {"model_content": bytes(model)} if isinstance(model, (bytes, bytearray)) else {"model_path": str(model)}


class TFLiteEmbedder:
    """Runs a TFLite embedding model with LiteRT: float32 raw pixels (n, H, W, 3) → float32 embeddings (n, d).

    Quantised inputs/outputs (an ``int8_io`` model) are converted with the model's own scale and zero point.
    Each batch size gets a fresh interpreter: resizing one LiteRT interpreter (2.3, XNNPACK delegate) to a
    larger batch than it first ran gave wrong embeddings from some int8 models (cosine 0.1–0.5 to the right
    ones), while a new interpreter at that batch is right (docs/EXPORT.md, "TFLite").
    """

    def __init__(self, model: str | os.PathLike | bytes, num_threads: int | None = None) -> None:
        self._source = _interpreter_source(model)
        self.num_threads = num_threads or cpu_count()
        self._new_interpreter()
        self.input_shape = tuple(int(d) for d in self._input["shape_signature"][1:])

    def _new_interpreter(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(num_threads=self.num_threads, **self._source)
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._batch = None  # not allocated yet

    def _prepare(self, batch: int) -> None:
        """Allocate for ``batch`` images: an interpreter already allocated for another batch is replaced, not
        resized (the LiteRT fault above)."""
        if batch == self._batch:
            return
        if self._batch is not None:
            self._new_interpreter()
        self.interpreter.resize_tensor_input(self._input["index"], [batch, *self.input_shape])
        self.interpreter.allocate_tensors()
        self._batch = batch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != self.input_shape or not len(images):
            raise ValueError(f"expected images of shape (n, {', '.join(map(str, self.input_shape))}) with n >= 1, "
                             f"got {images.shape}")
        self._prepare(len(images))
        dtype = self._input["dtype"]
        if dtype != np.float32:
            scale, zero = self._input["quantization"]
            info = np.iinfo(dtype)
            images = np.clip(np.round(images / scale + zero), info.min, info.max).astype(dtype)
        self.interpreter.set_tensor(self._input["index"], images)
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self._output["index"])
        if out.dtype != np.float32:
            scale, zero = self._output["quantization"]
            out = (out.astype(np.float32) - zero) * scale
        return out


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
