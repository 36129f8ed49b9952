"""Export a trained RGA re-id model for serving, and check every artefact against the Keras model.

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
(each format's, `FORMATS`) decide pass/fail; a failing export publishes nothing (`ParityError`) unless told otherwise.
Artefacts are built in a staging folder inside ``<out>`` and moved into place only once complete and
checked, so TF Serving never sees a half-written version.

Modules: `formats` (the table of formats: file names, thresholds, which module builds and loads each), one
module per file format with its ``build`` and ``load`` — `saved_model`, `tflite` (with `hybrid`, the
dynamic-range model's float32 ops, and `flatbuffer`), `onnx` —, `model` (what can be exported), `parity`
(the checks), `report` (table, JSON, Markdown), `exporter` (`export_all`). Importing the package is cheap: each
name loads its module (TensorFlow, LiteRT, tf2onnx) on first use.
"""
from rga_keras._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("FORMATS", "DEFAULT_FORMATS", "ExportFormat", "Runner"), "rga_keras.export.formats"),
    "export_all": "rga_keras.export.exporter",
    **dict.fromkeys(("ExportError", "ParityError", "cosine_rows", "estimate_batchnorm_statistics", "reid_model_info",
                     "with_relation", "write_float_saved_model"), "rga_keras.export.model"),
    **dict.fromkeys(("ONNX_OPSET", "ONNXEmbedder", "convert_onnx", "onnx_ops"), "rga_keras.export.onnx"),
    "measure_latencies": "rga_keras.export.parity",
    **dict.fromkeys(("failed_checks", "format_table", "report_markdown"), "rga_keras.export.report"),
    **dict.fromkeys(("METADATA_FILE", "SERVING_DTYPES", "WARMUP_FILE", "write_saved_model"),
                    "rga_keras.export.saved_model"),
    **dict.fromkeys(("INT8_FLOAT_OPS", "INT8_MAX_STEP_ERROR", "INT8_RANGE_PERCENTILES", "TFLITE_KINDS",
                     "TFLiteEmbedder", "convert_tflite", "keep_vectors_float32", "tflite_ops"),
                    "rga_keras.export.tflite"),
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
