"""TFLite models (float32, float16, dynamic-range, selective int8, full-integer int8, int16×8), builtin ops
only, and running them with LiteRT.

The selective int8 model keeps the relation products (BATCH_MATMUL of two activations, the θ·(Φᵀ W) terms of the
fused relation path) in float32 by default. Where they are int8 (the full-integer model), each right-hand
operand gets a range whose zero point is 0 (`zero_point_free_products`): LiteRT's XNNPACK delegate runs an int8
BATCH_MATMUL only then, and LiteRT's own kernel is 10-40× slower (docs/BENCHMARKS.md). Which other nodes stay in
float32 is measured, not fixed: TFLite's `QuantizationDebugger` runs the calibration images through a model
where every int8 op is checked against its float op, and a node whose own error exceeds `INT8_MAX_STEP_ERROR`
int8 steps (RMSE / scale) is kept in float32. Its activation ranges are percentiles of each tensor's per-image
extremes over the calibration images rather than TFLite's plain min/max, which a few outlying images stretch
(`set_ranges`). The full-integer model ("int8_full") has no float op at all (uint8 pixels in, int8 embedding
out) for int8-only accelerators; "int16x8" keeps activations in int16 (weights int8). The dynamic-range model
("dynamic", int8 weights, float activations) gives the ops that help most on the calibration images their
float32 weights back (`rga_keras.export.hybrid`): the accurate small option.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from rga_keras.checks import check_choice
from rga_keras.cores import available_cores
from rga_keras.export.flatbuffer import op_name, tflite_schema
from rga_keras.export.formats import BuildJob, ExportFormat, Runner
from rga_keras.export.hybrid import choose_float_weights
from rga_keras.export.model import ExportError, check_percentile, cosine_rows, float_saved_model
from rga_keras.native_logs import quiet_native_stderr

TFLITE_KINDS = ("float32", "float16", "dynamic", "int8", "int8_full", "int16x8")
INT8_FLOAT_OPS = ("BATCH_MATMUL",)  # ops the selective int8 model keeps in float32 by default (see above)
# A node of the selective int8 model whose own quantisation error (RMSE of its int8 output against its float
# op on the same dequantised inputs, over the calibration images) exceeds this many int8 steps stays float32.
# Rounding alone gives 1/√12 ≈ 0.29 steps; 0.7 is the threshold of TFLite's own debugger guide.
INT8_MAX_STEP_ERROR = 0.7
# Activation ranges of the int8 model: a percentile over the calibration images of each tensor's per-image
# maximum (and 100 - it of the per-image minimum); 100 = TFLite's own min/max over all images. "auto" (the
# default) tries these and keeps the one whose embeddings best match the float model's (docs/EXPORT.md).
INT8_RANGE_PERCENTILES = (100.0, 99.0, 95.0, 90.0, 80.0)  # tried by range_percentile="auto"


def convert_tflite(
    source_dir: str | os.PathLike,
    kind: str,
    *,
    representative_images: np.ndarray | None = None,
    int8_io: bool = False,
    float_ops: Sequence[str] = INT8_FLOAT_OPS,
    float_nodes: Sequence[str] | str = "auto",
    range_percentile: float | str = "auto",
    info: dict | None = None,
    log: Callable[[str], None] | None = None,
    float32: bytes | None = None,
) -> bytes:
    """Convert the SavedModel of `rga_keras.export.model.write_float_saved_model` to a TFLite flatbuffer, builtin
    ops only.

    kind: "float32"; "float16" (float16 weights, vector-shaped constants float32: `keep_vectors_float32`);
    "dynamic" (dynamic-range: int8 weights; given ``representative_images``, the ops whose float32 weights
    help most on them get those back within a size budget, `hybrid.choose_float_weights`, and ``info`` gets
    its "float_weight_ops"); "int8" (int8 weights and activations, calibrated on
    ``representative_images`` (n, H, W, 3) raw pixels, selective); "int8_full" (the same with no float op:
    uint8 pixels in, int8 embedding out); "int16x8" (int16 activations, int8 weights, calibrated likewise).
    For "int8", ``float_ops`` are TFLite op names kept in float32 and ``float_nodes`` op output tensor names
    kept in float32 ("auto": those whose debugger error exceeds `INT8_MAX_STEP_ERROR` steps, `_noisy_nodes`);
    ``range_percentile`` sets the activation ranges of both int8 kinds (`set_ranges`; 100: TFLite's
    min/max; "auto": each of `INT8_RANGE_PERCENTILES`, keeping the model whose embeddings of
    ``representative_images`` have the highest mean cosine to the float model's). ``info`` (a dict) gets
    "range_percentile", "calibration_cosine" {percentile: mean cosine} and, for "int8", "float_nodes"
    [{"tensor", "op", "step_error"}]. ``int8_io`` makes the "int8" model take uint8 pixels and return int8
    embeddings (scale and zero point in the model) instead of float32. ``log`` receives a line per
    calibration step, which can take minutes at 256×128. ``float32``: the "float32" conversion of the same
    source if already made (returned as it is for "float32"; the "float16" model's vector constants and the
    "dynamic" model's float32 weights come from it; converted here otherwise).
    """
    check_choice("kind", kind, TFLITE_KINDS)
    check_percentile("range_percentile", range_percentile)
    if kind != "int8" and int8_io:
        raise ValueError("int8_io applies to the int8 model only (int8_full always has integer input and output)")

    def converter_of(optimized: bool) -> tf.lite.TFLiteConverter:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(source_dir), signature_keys=["serving_default"])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no SELECT_TF_OPS fallback
        converter.optimizations = [tf.lite.Optimize.DEFAULT] if optimized else []
        return converter

    def float32_model() -> bytes:  # the float32 conversion: the one given, else made here
        return float32 if float32 is not None else converter_of(False).convert()

    if kind == "float32":
        return float32_model()
    converter = converter_of(True)
    if kind == "float16":
        converter.target_spec.supported_types = [tf.float16]
        return keep_vectors_float32(converter.convert(), float32_model())
    if kind == "dynamic" and representative_images is None:
        return converter.convert()

    images = np.asarray(representative_images, np.float32) if representative_images is not None else None
    if images is None or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"the {kind} model needs representative_images, a non-empty (n, H, W, 3) array of raw "
                         f"pixels, got {None if images is None else images.shape}")
    if kind == "dynamic":  # some ops given their float32 weights back, chosen on the calibration images
        flatbuffer, chosen = choose_float_weights(converter.convert(), float32_model(), images, _embed_all, log=log)
        if info is not None:
            info.update(chosen)
        return flatbuffer

    def representative():
        for image in images:
            yield [image[None]]

    converter.representative_dataset = representative
    log = log or (lambda line: None)
    if kind == "int16x8":
        # Ops without an int16 kernel (L2_NORMALIZATION) stay float32; TFLite's min/max ranges (int16 steps
        # are 256× finer than int8's, so outlying images cost little).
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        log("int16x8: calibrating")
        return _check_int16_additions(converter.convert())
    full = kind == "int8_full"
    float_ops = () if full else tuple(float_ops)
    # Selective quantisation and calibrated ranges: TFLite's quantisation debugger calibrates once
    # (`calibrated_model`, float32 with each activation's min/max) and quantises with a denylist.
    with _quiet_tf_interpreter():
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=representative,
            debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops) or None))
    percentiles = INT8_RANGE_PERCENTILES if range_percentile == "auto" else (float(range_percentile),)
    if len(percentiles) > 1:
        tried = ", ".join(f"{p:g}" for p in percentiles)
        log(f"{kind}: calibrated; choosing activation ranges among percentiles {tried}")
    calibrated, scores, ranged = raw_pixel_input(debugger.calibrated_model), {}, {}
    debugger.calibrated_model = calibrated
    extremes = activation_extremes(calibrated, images) if percentiles != (100.0,) else None
    for percentile in percentiles:
        ranged[percentile] = calibrated if extremes is None else set_ranges(calibrated, extremes, percentile)
        if "BATCH_MATMUL" not in float_ops:
            ranged[percentile] = zero_point_free_products(ranged[percentile])
        if len(percentiles) == 1:
            best = percentile
            break
        debugger.calibrated_model = ranged[percentile]
        # Choose by the embeddings' cosine to the float model on the calibration images themselves.
        got = _embed_all(debugger.get_nondebug_quantized_model(), images)
        scores[percentile] = float(cosine_rows(got, extremes[3]).mean())
        log(f"{kind}: ranges at percentile {percentile:g}: mean cosine {scores[percentile]:.4f} to the float "
            f"model on the calibration images")
        if scores[percentile] >= max(scores.values()):
            best = percentile
    debugger.calibrated_model = ranged[best]
    chosen = {"range_percentile": best, "calibration_cosine": scores}
    if not full:
        noisy = _noisy_nodes(debugger, float_ops) if float_nodes == "auto" else [
            {"tensor": name, "op": None, "step_error": None} for name in float_nodes]
        chosen["float_nodes"] = noisy
        log(f"int8: {len(noisy)} node(s) kept in float32 by their debugger error: "
            + (", ".join(f"{n['tensor']} ({n['op']})" for n in noisy) or "none"))
        with _quiet_tf_interpreter():
            debugger.options = tf.lite.experimental.QuantizationDebugOptions(
                denylisted_ops=list(float_ops) or None, denylisted_nodes=[n["tensor"] for n in noisy] or None)
    flatbuffer = debugger.get_nondebug_quantized_model()
    if info is not None:
        info.update(chosen)
    if int8_io or full:
        from tensorflow.lite.python.util import modify_model_io_type  # what the converter itself uses

        flatbuffer = modify_model_io_type(flatbuffer, tf.uint8, tf.int8)
    return flatbuffer


def _embed_all(flatbuffer: bytes, images: np.ndarray) -> np.ndarray:
    """Embeddings of ``images`` by a TFLite model, 32 at a time."""
    embed = TFLiteEmbedder(flatbuffer)
    return np.concatenate([embed(images[i : i + 32]) for i in range(0, len(images), 32)])


@contextlib.contextmanager
def _quiet_tf_interpreter():
    """The debugger runs TF's own (deprecated) tf.lite.Interpreter, which warns each time."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated", category=UserWarning)
        yield


def _noisy_nodes(debugger, float_ops: Sequence[str]) -> list[dict]:
    """The nodes whose own int8 error on the debugger's (calibration) images exceeds `INT8_MAX_STEP_ERROR` steps.

    The debug model checks every int8 op against its float op run on the same dequantised inputs
    (NumericVerify), so the error is the op's own, not what it inherits; divided by the output's int8 step it
    compares ops of any scale. Returns [{"tensor", "op", "step_error"}], largest error first.
    """
    with _quiet_tf_interpreter():
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops) or None)
        debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    dump.seek(0)
    rows = [{"tensor": row["tensor_name"], "op": row["op_name"],
             "step_error": float(np.sqrt(float(row["mean_squared_error"])) / float(row["scale"]))}
            for row in csv.DictReader(dump) if float(row["scale"]) > 0]
    return sorted((r for r in rows if r["step_error"] > INT8_MAX_STEP_ERROR), key=lambda r: -r["step_error"])


def keep_vectors_float32(float16: bytes, float32: bytes) -> bytes:
    """The float16-weight TFLite model ``float16`` with its vector-shaped constants (at most one dimension
    above 1: the input normalisation's mean and 1/std, biases, folded BatchNorm scales and offsets) in float32
    again, their values taken from ``float32``, the float32 conversion of the same model.

    The float16 converter stores every float constant in float16, with a DEQUANTIZE op before its use. These
    constants are where the float16 model's worst images go wrong (docs/EXPORT.md, "float16"): float16
    rounds the pixel mean 123.675 to 123.6875, shifting every normalised pixel, and the bias and BatchNorm
    offsets of the relation sums are added to terms they nearly cancel, so their 2⁻¹¹ relative rounding
    becomes a large relative error of the sum. They are a few thousand numbers (0.1 MiB). Each is found in
    ``float32`` by its shape and float16-rounded values (no names involved) and stored as float32, and its
    DEQUANTIZE op goes away.
    """
    schema, flatbuffer_utils = tflite_schema()

    def vectors(model, dtype):
        numpy_dtype = np.float32 if dtype == schema.TensorType.FLOAT32 else np.float16
        for graph in model.subgraphs:
            for tensor in graph.tensors:
                data = model.buffers[tensor.buffer].data
                if tensor.type == dtype and data is not None and sum(int(n) > 1 for n in tensor.shape) <= 1:
                    yield tensor, np.frombuffer(bytes(bytearray(data)), numpy_dtype)

    originals = {values.astype(np.float16).tobytes(): values
                 for _, values in vectors(flatbuffer_utils.read_model_from_bytearray(float32),
                                          schema.TensorType.FLOAT32)}
    model = flatbuffer_utils.read_model_from_bytearray(float16)
    restored = {id(tensor): originals.get(values.tobytes())
                for tensor, values in vectors(model, schema.TensorType.FLOAT16)}
    for graph in model.subgraphs:
        kept = []
        for op in graph.operators:
            source = graph.tensors[op.inputs[0]]
            values = restored.get(id(source)) if op_name(model, op) == "DEQUANTIZE" else None
            if values is None:
                kept.append(op)
                continue
            model.buffers[source.buffer].data = np.frombuffer(values.tobytes(), np.uint8)
            graph.tensors[op.outputs[0]].buffer, source.buffer = source.buffer, 0  # the float32 tensor holds it
        graph.operators = kept
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _check_int16_additions(flatbuffer: bytes) -> bytes:
    """Refuse an int16×8 model that LiteRT would abort on: its int16 ADD/SUB kernel needs the output's scale
    above 2·max(input scales) / 2¹⁵, which an output that was 0 on every calibration image (range [0, 0])
    misses; LiteRT then kills the process while allocating (QuantizeMultiplierSmallerThanOneExp)."""
    schema, flatbuffer_utils = tflite_schema()
    model = flatbuffer_utils.read_model_from_bytearray(flatbuffer)
    graph = model.subgraphs[0]

    def scale(i):
        q = graph.tensors[i].quantization
        return float(q.scale[0]) if q is not None and q.scale is not None and len(q.scale) else None

    for op in graph.operators:
        name = op_name(model, op)
        output = op.outputs[0]
        if name not in ("ADD", "SUB") or graph.tensors[output].type != schema.TensorType.INT16:
            continue
        inputs = [scale(i) for i in op.inputs]
        if None not in inputs and scale(output) * 2**15 <= 2 * max(inputs):
            raise ExportError(f"the int16x8 model cannot run: {name} {graph.tensors[output].name.decode()} has "
                              f"output scale {scale(output):.3g} against input scales "
                              f"{', '.join(f'{v:.3g}' for v in inputs)} (its output was 0 on every calibration "
                              "image); calibrate with other images or export another format")
    return flatbuffer


def activation_extremes(calibrated: bytes,
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


def raw_pixel_input(calibrated: bytes) -> bytes:
    """The model input's range set to [0, 255], not the calibration images' extremes: raw pixels then map onto
    the int8 grid with scale 1 (an ``int8_io`` model takes raw uint8 pixels as they are) and none is clipped."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(calibrated)
    for i in model.subgraphs[0].inputs:
        quantization = model.subgraphs[0].tensors[i].quantization
        quantization.min, quantization.max = np.array([0.0], np.float32), np.array([255.0], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def range_limits(extremes: tuple, percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """Each tensor's (low, high) at ``percentile`` over the images of ``extremes`` (`activation_extremes`): high
    the ``percentile`` of its positive per-image maxima, low the (100 − ``percentile``) percentile of its negative
    per-image minima; NaN where no image has such an extreme. Over the images where the extreme is non-zero: a
    tensor that is zero (after ReLU) on most images keeps the range of the images where it carries signal."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    _, lows, highs, _ = extremes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no image left
        return (np.nanpercentile(np.where(lows < 0, lows, np.nan), 100 - percentile, axis=0),
                np.nanpercentile(np.where(highs > 0, highs, np.nan), percentile, axis=0))


def set_ranges(calibrated: bytes, extremes: tuple, percentile: float) -> bytes:
    """Set each activation range of a calibrated TFLite model to a percentile over the images of ``extremes``
    (`activation_extremes`), not to their extremes.

    TFLite's calibration keeps each tensor's min/max over all images, so a few images with outlying
    activations widen the int8 steps of every other image (RGA's relation features reach 100× their typical
    peak on some images of a weakly trained model). Here each tensor's range is `range_limits` (0 kept inside;
    a tensor that is 0 on every image keeps its calibrated range); values beyond saturate. The model input (raw
    pixels) keeps its range.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    ranged = extremes[0]
    low, high = range_limits(extremes, percentile)
    model = flatbuffer_utils.read_model_from_bytearray(calibrated)
    # A tensor that is zero on every image keeps TFLite's range: a zero-width range gives a scale so tiny
    # that XNNPACK refuses the op (slow kernels).
    for j, i in enumerate(ranged):
        quantization = model.subgraphs[0].tensors[i].quantization
        if np.isnan(low[j]) and np.isnan(high[j]):
            continue
        quantization.min = np.array([0.0 if np.isnan(low[j]) else low[j]], np.float32)  # 0 exactly in range
        quantization.max = np.array([0.0 if np.isnan(high[j]) else high[j]], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


# Ops that pass their input's int8 scale and zero point on unchanged (TFLite quantises both sides alike).
_SAME_SCALE_OPS = ("RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS")


def zero_point_free_products(calibrated: bytes) -> bytes:
    """Give the right-hand operand of every BATCH_MATMUL of a calibrated TFLite model the range [-a·128/127, a],
    a = the larger magnitude of its calibrated range: int8 scale a/127 and zero point 0 (the left operand and the
    other tensors keep theirs). XNNPACK's int8 batch matmul, like its int8 weights, takes a right-hand operand
    only with zero point 0 and leaves the op to LiteRT's own kernel otherwise. The range is set along the chain
    of reshapes and transposes that carries the operand from the op that computes it, which all share its scale.
    Costs the operand at most one bit where its range was one-sided: the relation operands Φᵀ·W are centred."""
    _, flatbuffer_utils = tflite_schema()
    model = flatbuffer_utils.read_model_from_bytearray(calibrated)
    graph = model.subgraphs[0]
    producer = {tensor: op for op in graph.operators for tensor in op.outputs}
    for op in graph.operators:
        if op_name(model, op) != "BATCH_MATMUL":
            continue
        chain = [op.inputs[1]]
        while chain[-1] in producer and op_name(model, producer[chain[-1]]) in _SAME_SCALE_OPS:
            chain.append(producer[chain[-1]].inputs[0])
        ranges = [graph.tensors[i].quantization for i in chain]
        if any(q is None or q.min is None for q in ranges):
            continue  # not calibrated (a float32 op): nothing to quantise
        bound = max(max(abs(float(q.min[0])), abs(float(q.max[0]))) for q in ranges)
        if bound == 0:
            continue  # zero on every calibration image: no scale to give it (`set_ranges`)
        for quantization in ranges:
            quantization.min = np.array([-bound * 128 / 127], np.float32)
            quantization.max = np.array([bound], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def tflite_ops(model: str | os.PathLike | bytes) -> dict:
    """The ops of a TFLite model as LiteRT's builtin resolver loads it.

    Returns {"ops": {name: count}, "float_ops": {name: count} (ops computing float32, QUANTIZE/DEQUANTIZE
    excluded), "outside_xnnpack": {name: count} (ops LiteRT's default XNNPACK delegate leaves to LiteRT's own,
    slower kernels: `undelegated_nodes`), "builtin_only": bool}. Loading fails with a clear error if the model
    needs ops that plain LiteRT does not have (SELECT_TF_OPS / Flex or custom ops).
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
    outside = Counter(op["op_name"] for op in undelegated_nodes(model)[0])
    return {"ops": dict(sorted(ops.items())), "float_ops": dict(sorted(float_ops.items())),
            "outside_xnnpack": dict(sorted(outside.items())), "builtin_only": builtin}


def undelegated_nodes(model: str | os.PathLike | bytes, num_threads: int = 1) -> tuple[list[dict], int, int]:
    """The nodes LiteRT's default XNNPACK delegate leaves to LiteRT's own kernels ({"index", "op_name", "inputs",
    "outputs"}), the number of nodes and the number of XNNPACK partitions.

    The delegate replaces each partition it runs by one ``DELEGATE`` node whose inputs and outputs bound it; the
    interpreter's op list keeps the original nodes, so a node is delegated when it lies between some ``DELEGATE``
    node's inputs and outputs."""
    from ai_edge_litert.interpreter import Interpreter

    with quiet_native_stderr():  # LiteRT announces its XNNPACK delegate on stderr
        interpreter = Interpreter(num_threads=num_threads, **_interpreter_source(model))
        interpreter.allocate_tensors()
    ops = interpreter._get_ops_details()  # LiteRT's only op listing; used by TF's own tools too
    nodes = [op for op in ops if op["op_name"] != "DELEGATE"]
    producer = {tensor: op["index"] for op in nodes for tensor in op["outputs"]}
    delegated = set()
    for partition in (op for op in ops if op["op_name"] == "DELEGATE"):
        stop, todo = set(partition["inputs"]), list(partition["outputs"])
        while todo:  # walk back from the partition's outputs to its inputs
            tensor = todo.pop()
            if tensor in stop or tensor not in producer or producer[tensor] in delegated:
                continue
            delegated.add(producer[tensor])
            todo.extend(i for i in nodes[producer[tensor]]["inputs"] if i >= 0)
    return [op for op in nodes if op["index"] not in delegated], len(nodes), len(ops) - len(nodes)


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
        self.num_threads = num_threads or available_cores()
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
        with quiet_native_stderr():  # LiteRT's "Created TensorFlow Lite XNNPACK delegate for CPU."
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


def build(fmt: ExportFormat, job: BuildJob) -> tuple[Path, dict]:
    """The TFLite model of kind ``fmt.variant`` (`convert_tflite`) in the job's staging folder; the float32
    conversion is made once and reused by the float16 and dynamic-range models. Report entries: what the
    conversion chose and the model's ops."""
    kind, source, options = fmt.variant, float_saved_model(job), job.options
    float32 = (job.once("tflite_float32", lambda: convert_tflite(source, "float32"))
               if kind in ("float32", "float16", "dynamic") else None)
    chosen: dict = {}
    flatbuffer = convert_tflite(source, kind, representative_images=job.calibration,
                                int8_io=options["int8_io"] and kind == "int8", float_ops=options["int8_float_ops"],
                                float_nodes=options["int8_float_nodes"],
                                range_percentile=options["int8_range_percentile"], info=chosen, log=job.log,
                                float32=float32)
    path = job.staging / f"{kind}.tflite"
    path.write_bytes(flatbuffer)
    ops = tflite_ops(path)
    if not ops["builtin_only"]:
        raise ExportError(f"{fmt.name} needs ops beyond LiteRT's builtins: {ops['ops']}")
    return path, {**chosen, **ops}


def load(path: str | os.PathLike, num_threads: int | None = None) -> Runner:
    """A ``.tflite`` embedding model as a `Runner` (`TFLiteEmbedder`); ValueError naming the file when it is not
    one that maps images (n, H, W, 3) to embeddings."""
    try:
        embed = TFLiteEmbedder(path, num_threads)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"could not load {path} as a TFLite model: {err}") from None
    if len(embed.input_shape) != 3 or embed.input_shape[2] != 3:
        raise ValueError(f"{path} takes input (n, {', '.join(map(str, embed.input_shape))}), not images "
                         "(n, H, W, 3)")
    return Runner(embed, embed.input_shape[:2], None)
