"""Export a trained RGA re-id model for serving, and check every artefact against the Keras model (issue 6).

Every artefact computes the same function: raw RGB images (0–255, the model normalises them itself)
→ the L2-normalised retrieval embedding (the BNNeck output "after_bn", or "before_bn").

* ``saved_model``: TF Serving layout ``<out>/serving/<name>/<version>/`` with two signatures,
  ``serving_default`` (images (batch, H, W, 3) → {"embedding"}) and ``serve_image_bytes`` (encoded
  JPEG/PNG strings → {"embedding"}, decoded and resized in the graph exactly as the evaluation pipeline
  does), a warm-up file ``assets.extra/tf_serving_warmup_requests`` and ``assets/rga_metadata.json``
  (which feature, input size and dtype).
* ``onnx``: ``<out>/onnx/<name>_v<version>.onnx``, opset 17, dynamic batch axis, converted with tf2onnx from
  the same float32 SavedModel as the TFLite models; runs in ONNX Runtime and TensorRT.
* ``tflite_float32`` / ``tflite_float16`` (float16 weights) / ``tflite_dynamic`` (int8 weights,
  activations quantised on the fly; the ops that help most on the calibration images keep float32 weights,
  `rga_keras.export.hybrid`) / ``tflite_int8`` (int8 weights and activations, calibrated on
  representative person images; selective) / ``tflite_int8_full`` (no float op) / ``tflite_int16x8``
  (int16 activations, int8 weights): ``<out>/tflite/<name>_v<version>_<kind>.tflite``, builtin ops only.
  The selective int8 model keeps the relation products and the nodes with large measured error in float32
  and sets its activation ranges from percentiles (`rga_keras.export.tflite`).

Each artefact is run on query/gallery person images next to the Keras model: per-image cosine similarity
of the embeddings, Rank-1/mAP of the retrieval, size on disk and CPU latency at batch 1. Thresholds
(`THRESHOLDS`) decide pass/fail; a failing export publishes nothing (`ParityError`) unless told otherwise.
Artefacts are built in a staging folder inside ``<out>`` and moved into place only once complete and
checked, so TF Serving never sees a half-written version.

Modules: `model` (what can be exported), `serving` (SavedModel), `tflite` (conversion, LiteRT runner),
`hybrid` (the dynamic-range model's float32 ops), `onnx` (conversion, ONNX Runtime runner),
`parity` (checks and thresholds), `report` (table, JSON, Markdown), `exporter` (`export_all`).
"""
from rga_keras.export.exporter import DEFAULT_FORMATS, FORMATS, default_synthetic_dataset, export_all, load_images
from rga_keras.export.model import (ExportError, ParityError, cosine_rows, estimate_batchnorm_statistics,
                                    load_reid_model, reid_model_info, with_relation)
from rga_keras.export.onnx import ONNX_OPSET, ONNXEmbedder, convert_onnx, onnx_ops
from rga_keras.export.parity import THRESHOLDS, measure_latencies
from rga_keras.export.report import failed_checks, format_table, report_markdown
from rga_keras.export.serving import METADATA_FILE, SERVING_DTYPES, WARMUP_FILE, write_saved_model
from rga_keras.export.tflite import (INT8_FLOAT_OPS, INT8_MAX_STEP_ERROR, INT8_RANGE_PERCENTILES, TFLITE_KINDS,
                                     TFLiteEmbedder, convert_tflite, keep_vectors_float32, percentile_ranges,
                                     tflite_ops, write_tflite_source)

__all__ = [
    "FORMATS", "DEFAULT_FORMATS", "THRESHOLDS", "TFLITE_KINDS", "INT8_FLOAT_OPS", "INT8_MAX_STEP_ERROR",
    "INT8_RANGE_PERCENTILES", "SERVING_DTYPES",
    "METADATA_FILE", "WARMUP_FILE", "ExportError", "ParityError",
    "export_all", "load_reid_model", "reid_model_info", "with_relation", "estimate_batchnorm_statistics",
    "write_saved_model", "write_tflite_source", "convert_tflite", "keep_vectors_float32", "percentile_ranges",
    "tflite_ops",
    "TFLiteEmbedder", "measure_latencies", "cosine_rows", "load_images", "default_synthetic_dataset",
    "format_table", "report_markdown", "failed_checks",
    "ONNX_OPSET", "ONNXEmbedder", "convert_onnx", "onnx_ops",
]
