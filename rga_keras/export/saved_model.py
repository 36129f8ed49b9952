"""The TF Serving SavedModel: signatures ``serving_default`` (pixels) and ``serve_image_bytes`` (encoded
JPEG/PNG) with input checks, a warm-up file and ``assets/rga_metadata.json`` (docs/EXPORT.md)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from rga_keras.checks import check_choice
from rga_keras.export.formats import BuildJob, ExportFormat, Runner
from rga_keras.export.model import embed_function, reid_model_info
from rga_keras.files import staging_dir
from rga_keras.models import FEATURES, embedding_model
from rga_keras.reading import naming, read_json

SERVING_DTYPES = ("float32", "uint8")
METADATA_FILE = "rga_metadata.json"
WARMUP_FILE = "tf_serving_warmup_requests"


def _contains(data: tf.Tensor, pattern: bytes) -> tf.Tensor:
    """Whether the bytes of the scalar string ``data`` contain ``pattern`` as a contiguous run."""
    chars = tf.io.decode_raw(data, tf.uint8)
    stop = tf.maximum(tf.size(chars) - len(pattern) + 1, 0)
    hits = [tf.equal(chars[j : stop + j], pattern[j]) for j in range(len(pattern))]
    return tf.reduce_any(tf.reduce_all(tf.stack(hits), axis=0))


def _complete_jpeg_or_png(data: tf.Tensor) -> tf.Tensor:
    """Cheap structural check of one encoded image: a JPEG or PNG signature at the start and the format's
    end marker (JPEG EOI ``FFD9``, PNG ``IEND`` chunk) somewhere after it, which catches non-images and
    truncated files before the decoder (whose own errors cannot name the batch item). Data after the end
    marker (padded camera JPEGs, motion photos) is allowed: the decoder ignores it, as the pipeline does."""
    jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff") & _contains(data, b"\xff\xd9")
    png = tf.equal(tf.strings.substr(data, 0, 8), b"\x89PNG\r\n\x1a\n") & _contains(data, b"IEND")
    return jpeg | png


# Bytes that may follow 0xFF in a JPEG's entropy-coded data: a stuffed 0x00, fill 0xFF, restart markers RST0-7,
# and, between the scans of a multi-scan (progressive) file, the markers that may sit there (DHT, DAC, SOS, DQT,
# DRI, APPn, COM). Anything else there is not a JPEG's: bytes overwritten by corruption (an 0xFF they create, or
# one they destroy the stuffing of), which libjpeg would stop at.
_SCAN_BYTES_AFTER_FF = [0x00, 0xFF, *range(0xD0, 0xD8)]
_BETWEEN_SCANS = [0xC4, 0xCC, 0xDA, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)]
# Bytes cut before EOI by `_jpeg_intact`: enough that a clean file's last block always loses data (1-2 bytes
# can hold nothing but its end-of-block code), measured: 0 of 400 clean files flagged at 4 (docs/RELIABILITY.md).
_CUT_BYTES = 4


def _jpeg_scan(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Where the first scan's entropy-coded data of the JPEG ``data`` starts and where its EOI is, found by walking
    the marker segments (so that an EXIF thumbnail's own markers are skipped), and whether that data is
    well-formed: every 0xFF followed by a byte allowed there, an EOI present. Returns (start, eoi, well_formed,
    single_scan), the last saying no marker other than RSTn lies between start and EOI (a baseline file's
    one interleaved scan)."""
    chars = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32)
    size = tf.size(chars)
    padded = tf.pad(chars, [[0, 4]])
    at = lambda i: tf.gather(padded, tf.clip_by_value(i, 0, size + 3))  # noqa: E731  (past the end: zeros)

    def in_headers(i):
        return (i + 3 < size) & tf.equal(at(i), 0xFF) & tf.not_equal(at(i + 1), 0xDA)

    def next_segment(i):  # fill bytes (0xFF 0xFF) advance by one, a segment by 2 + its length field
        return tf.where(tf.equal(at(i + 1), 0xFF), i + 1, i + 2 + at(i + 2) * 256 + at(i + 3))

    sos = tf.while_loop(in_headers, next_segment, [tf.constant(2)], maximum_iterations=10000)[0]
    found_sos = (sos + 3 < size) & tf.equal(at(sos), 0xFF) & tf.equal(at(sos + 1), 0xDA)
    start = tf.minimum(sos + 2 + at(sos + 2) * 256 + at(sos + 3), size)
    scan = chars[start:]
    ff_at = tf.boolean_mask(tf.range(tf.maximum(tf.size(scan) - 1, 0)), tf.equal(scan[:-1], 0xFF))
    after_ff = tf.gather(scan, ff_at + 1)
    eoi_at = tf.boolean_mask(ff_at, tf.equal(after_ff, 0xD9))
    eoi = start + tf.reduce_min(tf.concat([eoi_at, [tf.size(scan)]], 0))
    before_eoi = tf.boolean_mask(after_ff, start + ff_at < eoi)
    in_scan = tf.reduce_any(tf.equal(before_eoi[:, None], _SCAN_BYTES_AFTER_FF), axis=1)
    between = tf.reduce_any(tf.equal(before_eoi[:, None], _BETWEEN_SCANS), axis=1)
    well_formed = found_sos & (tf.size(eoi_at) > 0) & tf.reduce_all(in_scan | between)
    return start, eoi, well_formed, tf.reduce_all(in_scan)


def _jpeg_intact(data: tf.Tensor, decoded: tf.Tensor, start: tf.Tensor, eoi: tf.Tensor) -> tf.Tensor:
    """Whether the single-scan JPEG ``data`` (decoded: ``decoded``) used its entropy-coded data to the end.

    Bytes overwritten mid-stream make the Huffman decoder lose step; mostly (measured: about 9 in 10 of the files
    libjpeg reports as corrupt but decodes) it then completes the image before the data ends and skips the rest,
    with only its unattributed "N extraneous bytes before marker" warning. A clean file needs its last bytes, so
    decoding it with `_CUT_BYTES` cut before EOI changes the image; a corrupt one decodes the same without them."""
    cut = tf.strings.join([tf.strings.substr(data, 0, eoi - _CUT_BYTES), b"\xff\xd9"])
    from rga_keras.data.pipeline import decode_image

    return tf.cond(eoi - start > 2 * _CUT_BYTES,
                   lambda: tf.reduce_any(tf.not_equal(decode_image(cut), decoded)), lambda: tf.constant(True))


UNIT_RANGE_MESSAGE = (
    "serving_default: every pixel of the batch is <= 1: the images look scaled to [0, 1]. Send raw RGB pixel "
    "values 0-255, as decoding the image file gives them (e.g. np.asarray(PIL.Image.open(f).convert('RGB'), "
    "np.float32)), without scaling or normalising; the model normalises them itself. (A model exported with "
    "--serving-allow-unit-range takes such batches as they are, for all-black inputs.)")


def _serving_functions(embedder: keras.Model, height: int, width: int, dtype: str,
                       allow_unit_range: bool = False) -> dict:
    """The two signature functions, with input checks that fail with a message instead of deep in the graph.

    ``serving_default`` refuses a batch whose pixels are all <= 1 (the commonest client mistake: images
    scaled to [0, 1], which the model would embed as near-black images) unless ``allow_unit_range``."""
    from rga_keras.data.pipeline import decode_image, resize_image  # the evaluation pipeline's preprocessing

    embed = embed_function(embedder)

    def serving_default(images):
        got = tf.shape(images)  # the signature does not enforce the rank, so check it here too
        padded = tf.pad(got, [[0, 4]])
        shape_ok = tf.equal(tf.size(got), 4) & tf.reduce_all(tf.equal(padded[1:4], [height, width, 3]))
        checks = [
            tf.debugging.Assert(shape_ok, [
                f"serving_default: expected images of shape (batch, {height}, {width}, 3) (raw RGB pixels, resized "
                f"to the model's {height}x{width}; serve_image_bytes takes encoded images of any size), got shape",
                got], summarize=8),
            tf.debugging.Assert(padded[0] > 0, ["serving_default: expected at least one image, got an empty batch"]),
        ]
        # After the shape check: the reductions assume rank 4 and would fail first, without the message.
        with tf.control_dependencies(checks):
            top = tf.reduce_max(images)
        if dtype == "float32":
            message = ("serving_default: expected raw RGB pixel values in [0, 255] (the model normalises "
                       "them itself; do not scale or normalise the images), found a value outside")
            # 0.5 of slack: resizing (antialiased bilinear) can overshoot 255 by float rounding
            with tf.control_dependencies(checks):
                checks += [tf.debugging.assert_greater_equal(tf.reduce_min(images), -0.5, message=message),
                           tf.debugging.assert_less_equal(top, 255.5, message=message)]
        if not allow_unit_range:
            with tf.control_dependencies(checks):
                checks.append(tf.debugging.Assert(tf.cast(top, tf.float32) > 1.0, [UNIT_RANGE_MESSAGE]))
        with tf.control_dependencies(checks):
            images = tf.ensure_shape(tf.cast(images, tf.float32), [None, height, width, 3])
        return embed(images)

    def serve_image_bytes(image_bytes):
        def load(item):
            index, data = item
            check = tf.debugging.Assert(_complete_jpeg_or_png(data), [
                "serve_image_bytes: item", index, "of the batch is not a complete JPEG or PNG image "
                "(wrong format, or truncated)"])
            with tf.control_dependencies([check]):  # before scanning and decoding: their errors name no item
                is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
                start, eoi, well_formed, single_scan = _jpeg_scan(data)
                check = tf.debugging.Assert(~is_jpeg | well_formed, [
                    "serve_image_bytes: item", index, "of the batch is a corrupt JPEG (its entropy-coded data is "
                    "malformed: bytes overwritten or lost)"])
            with tf.control_dependencies([check]):
                image = decode_image(data)
            intact = tf.cond(is_jpeg & single_scan, lambda: _jpeg_intact(data, image, start, eoi),
                             lambda: tf.constant(True))
            check = tf.debugging.Assert(intact, [
                "serve_image_bytes: item", index, "of the batch is a corrupt JPEG (its decoder completed the "
                "image before the end of the data: bytes overwritten in the middle)"])
            with tf.control_dependencies([check]):
                return resize_image(image, height, width)

        # The signature does not enforce the rank, and its declared shape makes a check of tf.rank constant: the
        # shape padded with -1s gives -1 first for a single string and a size second for a 2-D input.
        got = tf.shape(image_bytes)
        dims = tf.concat([got, [-1, -1]], 0)
        one_d = tf.debugging.Assert((dims[0] >= 0) & (dims[1] < 0), [
            "serve_image_bytes: expected a 1-D batch of encoded images (a list of JPEG/PNG byte strings, also for "
            "one image), got shape", got], summarize=8)
        with tf.control_dependencies([one_d]):
            count = tf.maximum(dims[0], 0)
        nonempty = tf.debugging.Assert(count > 0, ["serve_image_bytes: expected at least one image, got none"])
        with tf.control_dependencies([nonempty]):  # the identity too: map_fn's unstack of the input raced the checks
            items = (tf.range(count), tf.identity(image_bytes))
        images = tf.map_fn(load, items, fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32))
        return embed(images)

    return {
        "serving_default": (serving_default, tf.TensorSpec([None, None, None, None], dtype, name="images")),
        "serve_image_bytes": (serve_image_bytes, tf.TensorSpec([None], tf.string, name="image_bytes")),
    }


def _write_warmup(path: Path, model_name: str, height: int, width: int, dtype: str) -> None:
    """TF Serving warm-up records: one grey-image request per signature (PredictionLog TFRecords)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    grey = np.full((1, height, width, 3), 128, dtype=dtype)
    jpeg = tf.io.encode_jpeg(grey[0].astype(np.uint8)).numpy()
    requests = [("serving_default", "images", tf.make_tensor_proto(grey)),
                ("serve_image_bytes", "image_bytes", tf.make_tensor_proto([jpeg]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, key, tensor in requests:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
            request.inputs[key].CopyFrom(tensor)
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def write_saved_model(
    model: keras.Model,
    export_dir: str | os.PathLike,
    *,
    feature: str = "after_bn",
    model_name: str = "rga",
    serving_dtype: str = "float32",
    allow_unit_range: bool = False,
    metadata: dict | None = None,
) -> Path:
    """Write the TF Serving SavedModel of ``model`` into ``export_dir`` (a version folder, which must not exist).

    Built in a temporary sibling folder and renamed into place when complete. Signatures:
    ``serving_default``: images (batch, H, W, 3) of ``serving_dtype`` → {"embedding"}; ``serve_image_bytes``:
    (batch,) encoded JPEG/PNG strings → {"embedding"}. Adds the warm-up file and ``assets/rga_metadata.json``
    (``metadata`` entries are added to it). ``serving_default`` refuses batches whose pixels are all <= 1
    (images scaled to [0, 1]) unless ``allow_unit_range`` (recorded in the metadata as ``input.allow_unit_range``).
    """
    info = reid_model_info(model)
    check_choice("feature", feature, FEATURES)
    check_choice("serving_dtype", serving_dtype, SERVING_DTYPES)
    export_dir = Path(export_dir)
    if export_dir.exists():
        raise FileExistsError(f"{export_dir} already exists; choose another version or remove it")
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    height, width = info["input_size"]
    embedder = embedding_model(model, feature)
    tmp = staging_dir(export_dir.parent, prefix=f".{export_dir.name}.tmp-")
    try:
        # add_endpoint tracks the variables the endpoints use; track(embedder) would store each twice.
        archive = keras.export.ExportArchive()
        for name, (fn, spec) in _serving_functions(embedder, height, width, serving_dtype, allow_unit_range).items():
            archive.add_endpoint(name, fn, input_signature=[spec])
        archive.write_out(str(tmp), verbose=False)
        _write_warmup(tmp / "assets.extra" / WARMUP_FILE, model_name, height, width, serving_dtype)
        meta = {
            "model_name": model_name, "feature": feature, "l2_normalised": True,
            "embedding_dim": info["embedding_dim"],
            "input": {"height": height, "width": width, "channels": 3, "dtype": serving_dtype,
                      "pixels": "raw RGB 0-255, not normalised", "allow_unit_range": allow_unit_range},
            "signatures": {
                "serving_default": {"inputs": {"images": f"{serving_dtype} (batch, {height}, {width}, 3)"},
                                    "outputs": {"embedding": f"float32 (batch, {info['embedding_dim']})"}},
                "serve_image_bytes": {"inputs": {"image_bytes": "string (batch,) encoded JPEG or PNG"},
                                      "outputs": {"embedding": f"float32 (batch, {info['embedding_dim']})"}},
            },
            "model": info, **(metadata or {}),
        }
        (tmp / "assets").mkdir(exist_ok=True)
        (tmp / "assets" / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        os.replace(tmp, export_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return export_dir


def build(fmt: ExportFormat, job: BuildJob) -> tuple[Path, dict]:
    """The SavedModel of ``job`` in its staging folder (`rga_keras.export.formats`)."""
    path = write_saved_model(job.model, job.staging / "saved_model", feature=job.feature, model_name=job.model_name,
                             serving_dtype=job.options["serving_dtype"],
                             allow_unit_range=job.options["serving_allow_unit_range"],
                             metadata={"version": job.version})
    return path, {}


def load(path: str | os.PathLike, num_threads: int | None = None) -> Runner:
    """A SavedModel version folder's ``serving_default`` signature as a `Runner`; the feature and image size from
    rga-export's metadata, or, for a SavedModel made elsewhere, the input's fixed size. ``num_threads`` is
    TensorFlow's business here (unused). ValueError naming the folder when it cannot serve embeddings."""
    path = Path(path)
    try:
        signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    except KeyError:
        raise ValueError(f"SavedModel {path} has no serving_default signature") from None
    except Exception as err:  # a damaged SavedModel: TF's own error, with the folder named
        raise ValueError(f"could not load SavedModel {path}: {type(err).__name__}: {err}") from None
    (name, spec), = signature.structured_input_signature[1].items()
    metadata = path / "assets" / METADATA_FILE
    if metadata.is_file():  # rga-export's: the input is declared (None, None, None, None) on purpose
        with naming(metadata, "rga-export's metadata of the SavedModel (JSON with input.height, input.width)"):
            meta = read_json(metadata)
            size, feature = (meta["input"]["height"], meta["input"]["width"]), meta.get("feature")
    else:
        size, feature = tuple(spec.shape[1:3]), None
        if len(spec.shape) != 4 or None in size:
            raise ValueError(f"SavedModel {path} has no {METADATA_FILE} and its serving_default input {name} "
                             f"{spec.shape} does not fix the image size")
    uint8 = spec.dtype == tf.uint8

    def run(images: np.ndarray) -> np.ndarray:
        if uint8:
            images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        outputs = signature(**{name: tf.constant(images)})
        return (outputs["embedding"] if "embedding" in outputs else next(iter(outputs.values()))).numpy()

    return Runner(run, (int(size[0]), int(size[1])), feature, uint8_input=uint8)
