"""ONNX (for ONNX Runtime, TensorRT, OpenVINO): conversion with tf2onnx from the float32 SavedModel that the
TFLite models are converted from, and running it with ONNX Runtime.

tf2onnx, not Keras' own ``model.export(format="onnx")``: on the TensorFlow backend Keras calls tf2onnx too
(``tf2onnx.convert.from_function`` on the model's call), but left the input ``Normalization`` layer's mean and
variance as extra graph inputs (Keras 3.15, tf2onnx 1.17), so ONNX Runtime refused to run the model without
them; from the SavedModel the same 431 nodes (RGA-SC ResNet-50) come out with the image as the only input
(docs/EXPORT.md, "ONNX").
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from rga_keras.cores import available_cores
from rga_keras.export.formats import BuildJob, ExportFormat, Runner
from rga_keras.export.model import ExportError, float_saved_model

# Opset 17 (ONNX 1.12, 2022): parsed by TensorRT 8.6 and 10.x and run by every ONNX Runtime since 1.13, and
# within the opsets tf2onnx 1.17 maps to (≤ 18). Nothing in the RGA graph needs a later one.
ONNX_OPSET = 17
ONNX_DOMAINS = ("", "ai.onnx")  # standard ops only: no TF or contrib ops a runtime may lack
BATCH_AXIS = "batch"  # name of the dynamic batch dimension of the input and output


def convert_onnx(source_dir: str | os.PathLike, feature: str | None = None, opset: int = ONNX_OPSET) -> bytes:
    """Convert the SavedModel of `rga_keras.export.model.write_float_saved_model` (images → {"embedding"}) to a serialised ONNX model.

    Input ``images`` (batch, H, W, 3) float32 raw pixels, output ``embedding`` (batch, d) L2-normalised; the
    batch axis is dynamic (named "batch"). ``feature`` is written into the model's metadata ("rga_feature").
    An op tf2onnx cannot convert raises `ExportError` naming it (tf2onnx itself only logs it and leaves a
    TensorFlow op in the graph, which no ONNX runtime runs).
    """
    import onnx
    import tensorflow as tf
    from tf2onnx import convert, tf_loader

    errors = _ErrorLines()
    logger = logging.getLogger("tf2onnx")
    logger.addHandler(errors)
    propagate, logger.propagate = logger.propagate, False  # its errors come back in ours, once
    try:
        with _tf_quiet():
            graph, inputs, outputs, renames = tf_loader.from_saved_model(
                str(source_dir), None, None, tag=tf.saved_model.SERVING, signatures=["serving_default"],
                return_tensors_to_rename=True)
            proto, _ = convert.from_graph_def(graph, input_names=inputs, output_names=outputs, opset=opset,
                                              tensors_to_rename=renames)
    except Exception as err:  # a handler that failed on a node: tf2onnx logged which one
        raise ExportError(f"onnx: tf2onnx could not convert the model: {errors.summary() or err}") from None
    finally:
        logger.removeHandler(errors)
        logger.propagate = propagate
    foreign = sorted({f"{node.op_type} (domain {node.domain})" for node in proto.graph.node
                      if node.domain not in ONNX_DOMAINS})
    if errors.lines or foreign:  # an unsupported op stays in the graph as the TensorFlow op
        raise ExportError(f"onnx: tf2onnx could not convert the model to ONNX opset {opset}: "
                          f"{errors.summary() or 'non-standard ops ' + ', '.join(foreign)}")
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_AXIS
    if feature is not None:
        onnx.helper.set_model_props(proto, {"rga_feature": feature})
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def onnx_ops(model: str | os.PathLike | bytes) -> dict:
    """The graph of an ONNX model: {"opset", "nodes" (count), "ops": {op type: count}}."""
    import onnx

    proto = onnx.load_from_string(bytes(model)) if isinstance(model, (bytes, bytearray)) else onnx.load(str(model))
    ops = Counter(node.op_type for node in proto.graph.node)
    opset = next(o.version for o in proto.opset_import if o.domain in ONNX_DOMAINS)
    return {"opset": opset, "nodes": len(proto.graph.node), "ops": dict(sorted(ops.items()))}


class ONNXEmbedder:
    """Runs an ONNX embedding model with ONNX Runtime (CPU): float32 raw pixels (n, H, W, 3) → embeddings (n, d)."""

    def __init__(self, model: str | os.PathLike | bytes, num_threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads or available_cores()
        source = bytes(model) if isinstance(model, (bytes, bytearray)) else str(Path(model))
        self.session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0]
        self.input_shape = tuple(self._input.shape[1:])
        self.feature = self.session.get_modelmeta().custom_metadata_map.get("rga_feature")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != self.input_shape or not len(images):
            raise ValueError(f"expected images of shape (n, {', '.join(map(str, self.input_shape))}) with n >= 1, "
                             f"got {images.shape}")
        return self.session.run(None, {self._input.name: images})[0]


class _ErrorLines(logging.Handler):
    """Keeps tf2onnx's error log lines ("Tensorflow op [name: Op] is not supported", "Failed to convert node")."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().splitlines()[0])

    def summary(self) -> str:
        """One line: the TensorFlow ops without an ONNX conversion (type, count, a node), else the first error."""
        unsupported = [m.groups() for m in map(_UNSUPPORTED.search, self.lines) if m]
        if not unsupported:
            return self.lines[0] if self.lines else ""
        counts = Counter(op for _, op in unsupported)
        nodes = dict((op, node) for node, op in reversed(unsupported))
        return "no ONNX conversion for the TensorFlow op(s) " + ", ".join(
            f"{op} ({n} node{'s' * (n > 1)}, e.g. {nodes[op]})" for op, n in counts.items())


_UNSUPPORTED = re.compile(r"Tensorflow op \[(.+): (\w+)\] is not supported")


class _tf_quiet:
    """TensorFlow's deprecation warnings about the TF1 freezing functions tf2onnx calls are not the user's to fix."""

    def __enter__(self) -> None:
        import tensorflow as tf

        self._logger = tf.get_logger()
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc) -> None:
        self._logger.setLevel(self._level)


def build(fmt: ExportFormat, job: BuildJob) -> tuple[Path, dict]:
    """The ONNX model (`convert_onnx`) of the float32 SavedModel the TFLite models come from, in the job's staging
    folder; report entries: its opset and ops."""
    path = job.staging / "model.onnx"
    path.write_bytes(convert_onnx(float_saved_model(job), job.feature))
    return path, onnx_ops(path)


def load(path: str | os.PathLike, num_threads: int | None = None) -> Runner:
    """An ``.onnx`` embedding model as a `Runner` (`ONNXEmbedder`, ONNX Runtime); its feature from the metadata
    rga-export writes. ImportError without onnxruntime; ValueError naming the file when it is not a model of
    images (n, H, W, 3) of a fixed size."""
    try:
        embed = ONNXEmbedder(path, num_threads)
    except ImportError:
        raise ImportError(f"reading {path} needs onnxruntime, which is not installed (pip install onnxruntime)") \
            from None
    except Exception as err:  # onnxruntime's own error types (InvalidProtobuf, ...)
        raise ValueError(f"could not load {path} as an ONNX model: {err}") from None
    shape = embed.input_shape
    if len(shape) != 3 or shape[2] != 3 or not all(isinstance(d, int) for d in shape[:2]):
        raise ValueError(f"{path} takes input of shape (n, {', '.join(map(str, shape))}), not images (n, H, W, 3) "
                         "of a fixed size")
    return Runner(embed, (shape[0], shape[1]), embed.feature)
