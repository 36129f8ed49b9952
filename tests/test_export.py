"""Tests of rga_keras.export and the rga-export program (issue 6).

A tiny re-id model made of the library's own layers (Normalization, RGA-SC, BNNeck, 64×32 input) keeps the
conversions to a few seconds; the real ResNet-50 network runs in the slow test. Every number of the export
report is recomputed here independently: embeddings with the Keras model, TFLite with LiteRT's interpreter
directly, cosine similarity with NumPy and Rank-1/mAP with a per-query loop.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import json
import re
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from rga_keras import RGAReID, build_rga_resnet50, load_reid_model
from rga_keras import export as ex
from rga_keras.export import hybrid, tflite
from rga_keras.export.formats import Runner
from rga_keras.data import load_dataset, load_images, make_eval_dataset, make_train_dataset
from rga_keras.data.synthetic import ensure_synthetic
from rga_keras.files import current_umask
from rga_keras.optimizers import make_optimizer
from rga_keras.training.model import compile_reid, to_reid_targets
from tests.checks import small_rga_resnet, unit

SIZE = (64, 32)
EMBEDDING_DIM = 4 * 32  # the tiny backbone's last stage: 4 × its width
# Every training image calibrates the quantised models: with 24 of them, one query image's activations left
# the calibrated ranges of the tiny model and its int16x8 embedding fell to cosine 0.95 (0.995 with all 144).
CALIBRATION = 144
# The tiny model's dynamic-range model is 117 KiB: 2.5 % of it holds no op's float32 weights, 10 % a few.
TINY_FLOAT_WEIGHT_BUDGET = 0.1


def tiny_reid_model(num_classes: int, name: str = "tiny_rga") -> RGAReID:
    """The RGA ResNet in miniature (one bottleneck of width 4–32 per stage, 64×32 input): RGA-SC after
    stages 1 and 2, as fast to convert and run as a test needs."""
    keras.utils.set_random_seed(0)
    return small_rga_resnet(num_classes, "sc", (*SIZE, 3), rga_stages=(1, 2), stage_widths=(4, 8, 16, 32), name=name)


def keras_embeddings(model, images, feature="after_bn"):
    return unit(model.embedding_model(feature).predict(images, verbose=0))


def images_of(samples):
    return np.concatenate([x.numpy() for x, _ in make_eval_dataset(samples, image_size=SIZE, batch_size=64)])


def litert_embeddings(path, images):
    """One image at a time through LiteRT's interpreter, (de)quantising with the model's parameters."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    result = []
    for image in images:
        x = image[None]
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            x = np.clip(np.round(x / scale + zero), 0, 255).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"]).astype(np.float64)
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            y = (y - zero) * scale
        result.append(y[0])
    return np.array(result)


def brute_force_retrieval(qf, gf, query, gallery):
    """Rank-1 and mAP by a plain loop over queries (same id and camera removed, ties in gallery order)."""
    qf, gf = unit(qf), unit(gf)
    hits, aps = [], []
    for i, (_, pid, cam) in enumerate(query):
        dist = 1.0 - gf @ qf[i]
        keep = [j for j, (_, gpid, gcam) in enumerate(gallery) if not (gpid == pid and gcam == cam)]
        order = sorted(keep, key=lambda j: (np.float32(dist[j]), j))
        match = [gallery[j][1] == pid for j in order]
        if not any(match):
            continue
        hits.append(match[0])
        ranks = [r + 1 for r, m in enumerate(match) if m]
        aps.append(np.mean([(k + 1) / r for k, r in enumerate(ranks)]))
    return float(np.mean(hits)), float(np.mean(aps))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic") / "market", num_ids=48, images_per_id=6,
                            num_cameras=3, image_size=SIZE)


@pytest.fixture(scope="module")
def data(data_root):
    return load_dataset("market1501", data_root)


@pytest.fixture(scope="module")
def model(data):
    """Trained for a few dozen steps: a random network's embeddings vary so little between images that
    int8 rounding dominates them, which says nothing about exporting a trained model."""
    model = tiny_reid_model(data.num_train_ids)
    compile_reid(model, optimizer=make_optimizer("adam", 1e-3))
    batches = make_train_dataset(data.train, num_ids_per_batch=6, images_per_id=4, image_size=SIZE)
    model.fit(to_reid_targets(batches), epochs=1, steps_per_epoch=40, verbose=0, shuffle=False)
    return model


@pytest.fixture(scope="module")
def exported(model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:  # room for a few float32 weights in the tiny dynamic-range model
        patch.setattr(hybrid, "FLOAT_WEIGHT_BUDGET", TINY_FLOAT_WEIGHT_BUDGET)
        report = ex.export_all(model, out, formats=ex.FORMATS, calibration_samples=data.train,
                               num_calibration=CALIBRATION, eval_split=(data.query, data.gallery), latency_runs=3,
                               enforce=False, verbose=False)
    return out, report


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(str(saved_model_dir(exported[0])))


def saved_model_dir(out):
    return out / "serving" / "rga" / "1"


# --------------------------------------------------------------------------- layout and report


def test_layout_report_and_metadata(exported):
    out, report = exported
    version = saved_model_dir(out)
    for part in ("saved_model.pb", "variables", "assets.extra/tf_serving_warmup_requests", "assets/rga_metadata.json"):
        assert (version / part).exists(), part
    for kind in ex.TFLITE_KINDS:
        assert (out / "tflite" / f"rga_v1_{kind}.tflite").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging folder left behind"
    # An ordinary folder (umask), not mkdtemp's 0700: TF Serving may run as another user.
    assert version.stat().st_mode & 0o777 == 0o777 & ~current_umask()
    assert json.loads((out / "rga_v1_export_report.json").read_text())["checks"] == json.loads(
        json.dumps(report["checks"]))
    markdown = (out / "rga_v1_export_report.md").read_text()
    assert "| tflite_int8 |" in markdown and "| keras (float32) |" in markdown
    assert set(report["artefacts"]) == set(ex.FORMATS) | {"report"} and report["published"]
    assert report["passed"] == all(check["passed"] for check in report["checks"].values())
    meta = json.loads((version / "assets" / "rga_metadata.json").read_text())
    assert meta["feature"] == "after_bn" and meta["l2_normalised"] and meta["version"] == 1
    assert (meta["input"]["height"], meta["input"]["width"], meta["input"]["dtype"]) == (*SIZE, "float32")
    assert meta["model"]["rga"] == {"rga1": "sc", "rga2": "sc"} and meta["model"]["relation"] == "fused"
    for fmt, check in report["checks"].items():
        path = out / report["artefacts"][fmt]
        size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        assert check["size_bytes"] == size
        latency = check["latency_ms"]
        assert latency["runs"] == 3 and 0 < latency["min_ms"] <= latency["median_ms"]
    sizes = {fmt: report["checks"][fmt]["size_bytes"] for fmt in report["checks"]}
    assert sizes["tflite_int8"] < sizes["tflite_float16"] < sizes["tflite_float32"]


def test_parity_and_retrieval_numbers_match_an_independent_computation(exported, loaded, model, data):
    out, report = exported
    images = np.concatenate([images_of(data.query), images_of(data.gallery)])
    nq = len(data.query)
    reference = keras_embeddings(model, images)
    rank1, mean_ap = brute_force_retrieval(reference[:nq], reference[nq:], data.query, data.gallery)
    assert report["reference"]["rank1"] == pytest.approx(rank1) and report["reference"]["mAP"] == pytest.approx(mean_ap)
    signature = loaded.signatures["serving_default"]
    embeddings = {"saved_model": signature(images=tf.constant(images))["embedding"].numpy()}
    for kind in ex.TFLITE_KINDS:
        embeddings[f"tflite_{kind}"] = litert_embeddings(out / "tflite" / f"rga_v1_{kind}.tflite", images)
    for fmt, emb in embeddings.items():
        check = report["checks"][fmt]
        cos = np.sum(unit(emb) * reference, axis=1)
        assert check["cosine_mean"] == pytest.approx(cos.mean(), abs=2e-6), fmt
        assert check["cosine_min"] == pytest.approx(cos.min(), abs=2e-6), fmt
        rank1, mean_ap = brute_force_retrieval(emb[:nq], emb[nq:], data.query, data.gallery)
        assert (check["rank1"], check["mAP"]) == (pytest.approx(rank1), pytest.approx(mean_ap)), fmt
        # the issues' thresholds, restated here: every artefact on its worst image, quantised ones on the mean
        # and mAP too. The float formats must pass; whether an 8-bit model of this tiny network clears 0.95 on
        # its worst image is a matter of chance (0.947-0.953 seen), so for those the verdict must be the rule's.
        floor = {"saved_model": 0.9999, "tflite_float32": 0.9999, "tflite_float16": 0.999}.get(fmt, 0.95)
        quantised = fmt not in ("saved_model", "tflite_float32", "tflite_float16")
        meets = cos.min() >= floor and (not quantised or (
            cos.mean() >= 0.98 and abs(100 * (mean_ap - report["reference"]["mAP"])) <= 1.0))
        assert meets or quantised, (fmt, cos.min())
        assert check["thresholds"]["cosine_min"] == floor and ("max_map_diff" in check["thresholds"]) == quantised
        assert check["passed"] == meets and (not check["failures"]) == meets, (fmt, check["failures"])


def test_tflite_models_use_builtin_ops_only_and_int8_is_integer(exported):
    out, report = exported
    from ai_edge_litert.interpreter import Interpreter

    for kind in ex.TFLITE_KINDS:
        path = out / "tflite" / f"rga_v1_{kind}.tflite"
        Interpreter(model_path=str(path)).allocate_tensors()  # plain LiteRT: no Flex delegate, no custom ops
        ops = report["checks"][f"tflite_{kind}"]
        assert ops["builtin_only"] and not any(op.startswith("Flex") for op in ops["ops"])
    int8 = report["checks"]["tflite_int8"]
    # the relation products (the default op list) and the nodes the debugger measured as too noisy
    float_nodes = collections.Counter(node["op"] for node in int8["float_nodes"])
    assert int8["float_ops"] == dict(collections.Counter({"BATCH_MATMUL": 8}) + float_nodes)
    assert report["settings"]["int8_range_percentile"] == "auto"  # the default: best of INT8_RANGE_PERCENTILES
    assert set(int8["calibration_cosine"]) == set(ex.INT8_RANGE_PERCENTILES)
    assert int8["calibration_cosine"][int8["range_percentile"]] == max(int8["calibration_cosine"].values())
    assert int8["ops"]["BATCH_MATMUL"] == int8["float_ops"]["BATCH_MATMUL"] == 8  # 2 modules × 2 branches × 2
    # the stem, three per bottleneck and the four shortcut projections of the tiny backbone
    assert int8["ops"]["CONV_2D"] == 1 + 4 * 3 + 4
    assert "QUANTIZE" not in report["checks"]["tflite_float32"]["ops"]


# --------------------------------------------------------------------------- the SavedModel


def test_saved_model_signatures_have_named_inputs_and_outputs(exported):
    from tensorflow.python.tools import saved_model_utils  # what saved_model_cli show --all reads

    out, _ = exported
    signatures = saved_model_utils.get_meta_graph_def(str(saved_model_dir(out)), "serve").signature_def
    assert {"serving_default", "serve_image_bytes"} <= set(signatures)
    default, image_bytes = signatures["serving_default"], signatures["serve_image_bytes"]
    assert list(default.inputs) == ["images"] and default.inputs["images"].dtype == tf.float32.as_datatype_enum
    assert len(default.inputs["images"].tensor_shape.dim) == 4
    assert list(image_bytes.inputs) == ["image_bytes"]
    assert image_bytes.inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    for signature in (default, image_bytes):
        assert list(signature.outputs) == ["embedding"]
        assert [d.size for d in signature.outputs["embedding"].tensor_shape.dim] == [-1, EMBEDDING_DIM]


def test_both_signatures_match_the_keras_model(loaded, model, data):
    images = images_of(data.query)
    reference = keras_embeddings(model, images)
    got = loaded.signatures["serving_default"](images=tf.constant(images))["embedding"].numpy()
    np.testing.assert_allclose(got, reference, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # encoded files as a client sends them: decoded and resized in the graph like the evaluation pipeline
    raw = [open(s.path, "rb").read() for s in data.query]
    raw[1] += bytes(100)  # data after the end marker (a padded camera JPEG): decoded like the file without it
    got = loaded.signatures["serve_image_bytes"](image_bytes=tf.constant(raw))["embedding"].numpy()
    np.testing.assert_allclose(got, reference, atol=2e-5)
    # PNGs of other sizes, colour and greyscale: resized in the graph (bilinear, antialiased)
    colour = np.asarray(Image.open(data.query[0].path).convert("RGB").resize((50, 100)))
    grey = np.asarray(Image.open(data.query[1].path).convert("L").resize((20, 40)))
    pngs, arrays = [], [colour, np.repeat(grey[..., None], 3, axis=2)]
    for array in (colour, grey):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    expected = keras_embeddings(model, np.stack([tf.image.resize(a, SIZE, antialias=True).numpy() for a in arrays]))
    got = loaded.signatures["serve_image_bytes"](image_bytes=tf.constant(pngs))["embedding"].numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_warmup_file_parses_back_and_runs(exported, loaded):
    from tensorflow_serving.apis import prediction_log_pb2

    path = saved_model_dir(exported[0]) / "assets.extra" / "tf_serving_warmup_requests"
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    signatures = [log.predict_log.request.model_spec.signature_name for log in logs]
    assert signatures == ["serving_default", "serve_image_bytes"]
    for log in logs:
        request = log.predict_log.request
        assert request.model_spec.name == "rga"
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        embedding = loaded.signatures[request.model_spec.signature_name](**inputs)["embedding"].numpy()
        assert embedding.shape == (1, EMBEDDING_DIM) and np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 32, 32, 3), np.float32), r"expected images of shape \(batch, 64, 32, 3\).*\[2 32 32 3\]"),
    (np.zeros((1, 64, 32, 1), np.float32), r"expected images of shape.*\[1 64 32 1\]"),
    (np.zeros((64, 32, 3), np.float32), r"expected images of shape.*\[64 32 3\]"),
    (np.full((1, 64, 32, 3), -1.0, np.float32), r"raw RGB pixel values in \[0, 255\]"),
    (np.full((1, 64, 32, 3), 300.0, np.float32), r"raw RGB pixel values in \[0, 255\]"),
    (np.full((1, 64, 32, 3), 256.0, np.float32), r"raw RGB pixel values in \[0, 255\]"),
    (np.full((1, 64, 32, 3), np.nan, np.float32), r"raw RGB pixel values in \[0, 255\]"),
    (np.zeros((0, 64, 32, 3), np.float32), r"at least one image"),
    (np.zeros((1, 64, 32, 3), np.uint8), r"expected to be a float tensor but is a uint8"),
    (np.linspace(0, 1, 2 * 64 * 32 * 3, dtype=np.float32).reshape(2, 64, 32, 3),
     r"every pixel of the batch is <= 1: the images look scaled to \[0, 1\]. Send raw RGB pixel values 0-255"),
])
def test_serving_default_rejects_bad_input_clearly(loaded, images, message):
    signature = loaded.signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        signature(images=tf.constant(images))
    assert signature(images=tf.fill((1, *SIZE, 3), 128.0))["embedding"].shape == (1, EMBEDDING_DIM)  # still serving


def test_unit_range_batches_accepted_only_when_exported_so(model, data):
    # Images scaled to [0, 1] embed as near-black ones, far from the right embedding: refused by default
    # (above); the export option lets them through. The signature function itself, without writing a SavedModel.
    from rga_keras.export.saved_model import _serving_functions
    from rga_keras.models import embedding_model

    images = images_of(data.query[:2]) / 255.0
    serve = _serving_functions(embedding_model(model, "after_bn"), *SIZE, "float32", allow_unit_range=True)
    got = serve["serving_default"][0](tf.constant(images))["embedding"].numpy()  # eager: no tracing
    np.testing.assert_allclose(got, keras_embeddings(model, images), atol=2e-5)


def test_serve_image_bytes_names_the_bad_item(loaded, data):
    signature = loaded.signatures["serve_image_bytes"]
    good = [open(s.path, "rb").read() for s in data.query[:3]]
    cases = {1: [good[0], b"not an image", good[1]], 2: [good[0], good[1], good[2][: len(good[2]) // 2]],
             0: [b""]}
    for index, batch in cases.items():
        message = rf"serve_image_bytes: item\] \[{index}\] \[of the batch is not a complete JPEG or PNG"
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            signature(image_bytes=tf.constant(batch))
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected at least one image"):
        signature(image_bytes=tf.constant([], tf.string))


def test_uint8_serving_signature(model, data, tmp_path):
    path = ex.write_saved_model(model, tmp_path / "7", serving_dtype="uint8", model_name="u8")
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    images = np.round(images_of(data.query[:4])).astype(np.uint8)
    got = signature(images=tf.constant(images))["embedding"].numpy()
    np.testing.assert_allclose(got, keras_embeddings(model, images.astype(np.float32)), atol=2e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a uint8 tensor"):
        signature(images=tf.constant(images.astype(np.float32)))
    meta = json.loads((path / "assets" / "rga_metadata.json").read_text())["input"]
    assert meta["dtype"] == "uint8" and meta["allow_unit_range"] is False
    with pytest.raises(tf.errors.InvalidArgumentError, match="look scaled to"):  # uint8 0/1 values: the same mistake
        signature(images=tf.constant((images > 127).astype(np.uint8)))
    with pytest.raises(FileExistsError):
        ex.write_saved_model(model, path)
    # its parity check feeds rounded pixels and compares with Keras on the same pixels (uint8 clients send those)
    larger = load_dataset("market1501", ensure_synthetic(tmp_path / "larger", num_ids=8, images_per_id=4,
                                                         num_cameras=2, image_size=(2 * SIZE[0], 2 * SIZE[1])))
    report = ex.export_all(model, tmp_path / "out", formats=["saved_model"], serving_dtype="uint8",
                           eval_split=(larger.query, larger.gallery), latency_runs=1, verbose=False)
    check = report["checks"]["saved_model"]
    assert check["passed"] and check["cosine_min"] > 1 - 1e-6, check


# --------------------------------------------------------------------------- TFLite options


def test_percentile_ranges_match_numpy_percentiles_of_per_image_extremes():
    """Calibrated activation ranges are replaced by percentiles of each image's own min/max, over the images
    where that extreme is non-zero (a brute-force NumPy reference)."""
    from tensorflow.lite.tools import flatbuffer_utils

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 5)).astype(np.float32)
    images = rng.uniform(0, 255, (40, 4, 2, 3)).astype(np.float32)
    images[:20] = 0  # black images: every tensor is 0 on them, so they must not shrink the ranges
    images[25] *= 20  # one outlying image, as a weakly trained network's activations have

    class Tiny(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4, 2, 3], tf.float32)])
        def __call__(self, x):
            return tf.nn.relu(tf.reshape(x, (-1, 3)) @ kernel)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([Tiny().__call__.get_concrete_function()])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in images)
    calibrated = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=converter.representative_dataset).calibrated_model
    clipped = flatbuffer_utils.read_model_from_bytearray(tflite.set_ranges(calibrated, tflite.activation_extremes(calibrated, images), 90))
    graph = clipped.subgraphs[0]
    ranges = {name: (graph.tensors[i].quantization.min[0], graph.tensors[i].quantization.max[0])
              for name, i in (("input", graph.inputs[0]), ("output", graph.outputs[0]))}
    outputs = np.maximum(images.reshape(40, -1, 3) @ kernel, 0)
    highs = [image.max() for image in outputs if image.max() > 0]
    expected = (0.0, np.percentile(highs, 90))
    np.testing.assert_allclose(ranges["output"], expected, rtol=1e-4, atol=1e-3)
    assert 0 < expected[1] < outputs.max() / 2  # neither the black images nor the outlier set the range
    # the input (raw pixels) keeps its calibrated range: clipping pixels would only lose information
    np.testing.assert_allclose(ranges["input"], (images.min(), images.max()), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="percentile must be in"):
        tflite.set_ranges(calibrated, tflite.activation_extremes(calibrated, images), 0)


def test_tflite_embedder_is_independent_of_the_batch_size(exported, data):
    """Growing, shrinking and growing the batch again gives each image the embedding it gets alone (one
    LiteRT interpreter resized to a larger batch gave wrong int8 embeddings; the embedder avoids that)."""
    images = images_of(data.query)[:9]
    for kind in ("int8", "float32"):
        path = exported[0] / "tflite" / f"rga_v1_{kind}.tflite"
        alone = litert_embeddings(path, images)
        embed = ex.TFLiteEmbedder(path)
        for n in (1, 4, 9, 2, 9):
            np.testing.assert_allclose(embed(images[:n]), alone[:n], atol=1e-5, err_msg=f"{kind}, batch {n}")
        for bad in (images[:0], images[:2, :, :16]):  # an empty batch, a wrong size: a clear error, still usable
            with pytest.raises(ValueError, match=r"expected images of shape \(n, 64, 32, 3\) with n >= 1"):
                embed(bad)
        np.testing.assert_allclose(embed(images[:2]), alone[:2], atol=1e-5)


def test_int8_io_and_full_integer_option(model, data, tmp_path):
    source = ex.write_float_saved_model(model, tmp_path / "source")
    calibration = images_of(data.train)[::2]
    images = images_of(data.query)
    reference = keras_embeddings(model, images)
    selective = tmp_path / "io.tflite"
    selective.write_bytes(ex.convert_tflite(source, "int8", representative_images=calibration, int8_io=True))
    embedder = ex.TFLiteEmbedder(selective)
    details = embedder.interpreter
    assert details.get_input_details()[0]["dtype"] == np.uint8 and details.get_output_details()[0]["dtype"] == np.int8
    assert details.get_input_details()[0]["quantization"] == (1.0, 0)  # raw uint8 pixels, as they are
    for got in (embedder(images), litert_embeddings(selective, images)):
        assert np.mean(np.sum(unit(got) * reference, axis=1)) >= 0.98
    with pytest.raises(ValueError, match="representative_images"):
        ex.convert_tflite(source, "int8")
    for kind in ("float16", "int8_full"):
        with pytest.raises(ValueError, match="int8_io applies to the int8 model only"):
            ex.convert_tflite(source, kind, int8_io=True)
    with pytest.raises(ValueError, match=r"range_percentile must be 'auto' or a percentile in \(0, 100\], got 150"):
        ex.convert_tflite(source, "int8", representative_images=calibration, range_percentile=150)


def test_full_integer_int8_has_no_float_op(exported, model, data):
    out, report = exported
    from ai_edge_litert.interpreter import Interpreter

    path = out / "tflite" / "rga_v1_int8_full.tflite"
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    dtypes = {np.dtype(t["dtype"]) for t in interpreter.get_tensor_details()}
    assert dtypes <= {np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int32), np.dtype(np.int64)}, dtypes
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8  # raw pixels, scale 1, zero point 0
    assert interpreter.get_input_details()[0]["quantization"] == (1.0, 0)
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    check = report["checks"]["tflite_int8_full"]
    assert check["float_ops"] == {} and check["ops"]["BATCH_MATMUL"] == 8 and "float_nodes" not in check
    assert set(check["calibration_cosine"]) == set(ex.INT8_RANGE_PERCENTILES)
    # The relation products run in XNNPACK (their right-hand operands at zero point 0), the convolutions too.
    assert "BATCH_MATMUL" not in check["outside_xnnpack"] and "CONV_2D" not in check["outside_xnnpack"]
    assert report["checks"]["tflite_int8"]["outside_xnnpack"].get("BATCH_MATMUL") is None  # float32 ones


@pytest.mark.filterwarnings("ignore:.*experimental_preserve_all_tensors")  # every tensor is the point
def test_full_integer_relation_products_match_numpy(exported, data):
    """Each int8 BATCH_MATMUL of the full-integer model (a relation product θ·(Φᵀ W)) has a right-hand operand
    with zero point 0 (`zero_point_free_products`) and computes NumPy's product of its dequantised inputs
    to within one output step (saturating at the output's range)."""
    from ai_edge_litert.interpreter import Interpreter

    out, _ = exported
    interpreter = Interpreter(model_path=str(out / "tflite" / "rga_v1_int8_full.tflite"),
                              experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images_of(data.query[:1]).astype(np.uint8))
    interpreter.invoke()
    tensors = interpreter.get_tensor_details()

    def real(i):
        scale, zero = tensors[i]["quantization"]
        return scale * (interpreter.get_tensor(i).astype(np.float64) - zero)

    products = [op for op in interpreter._get_ops_details() if op["op_name"] == "BATCH_MATMUL"]
    assert len(products) == 8
    for op in products:
        left, right = op["inputs"][:2]
        assert tensors[right]["quantization"][1] == 0 and tensors[left]["dtype"] == np.int8
        step, zero = tensors[op["outputs"][0]]["quantization"]
        expected = np.clip(real(left) @ real(right), step * (-128 - zero), step * (127 - zero))
        assert np.max(np.abs(real(op["outputs"][0]) - expected)) <= step  # rounding: half a step


@pytest.mark.slow  # 15-45 s: two conversions of a second model, the int8 one calibrated
@pytest.mark.filterwarnings("ignore:.*experimental_preserve_all_tensors")  # every tensor is the point
def test_outer_product_relations_run_as_int8_multiplies(tmp_path):
    """RGA-C at stages 3-4 of a 64×32 input embeds each channel in one dimension (e = 8 positions / s1 = 1), so
    its relation products are outer products, written as broadcast multiplies (`rga_keras.layers._product`):
    the full-integer model runs them in XNNPACK's int8 MUL instead of LiteRT's int8 BATCH_MATMUL (docs/
    BENCHMARKS.md). The float32 model matches Keras; each int8 MUL matches NumPy's outer product of its inputs."""
    from ai_edge_litert.interpreter import Interpreter

    keras.utils.set_random_seed(0)
    model = small_rga_resnet(8, "sc", (*SIZE, 3), rga_stages=(3, 4), stage_widths=(4, 8, 16, 32))
    images = np.random.default_rng(0).uniform(0, 255, (16, *SIZE, 3)).astype(np.float32)
    ex.estimate_batchnorm_statistics(model, images)
    source = ex.write_float_saved_model(model, tmp_path / "source")
    float32 = ex.TFLiteEmbedder(ex.convert_tflite(source, "float32"))
    assert np.min(np.sum(unit(float32(images)) * keras_embeddings(model, images), axis=1)) >= 0.9999
    full = ex.convert_tflite(source, "int8_full", representative_images=images, range_percentile=100)
    assert ex.tflite_ops(full)["ops"]["BATCH_MATMUL"] == 4  # the spatial branches' (e = C / s1 > 1) only

    interpreter = Interpreter(model_content=full, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images[:1].astype(np.uint8))
    interpreter.invoke()
    tensors = interpreter.get_tensor_details()

    def real(i):
        scale, zero = tensors[i]["quantization"]
        return scale * (interpreter.get_tensor(i).astype(np.float64) - zero)

    outer = [op for op in interpreter._get_ops_details() if op["op_name"] == "MUL"
             and [tuple(tensors[i]["shape"][1:]) for i in op["inputs"]] in ([(128, 1), (1, 16)], [(64, 1), (1, 8)])]
    assert len(outer) == 4  # 2 modules × 2 relation products (channels × 1)(1 × channels / s1)
    for op in outer:
        got, step = real(op["outputs"][0]), tensors[op["outputs"][0]]["quantization"][0]
        expected = np.clip(real(op["inputs"][0]) * real(op["inputs"][1]), got.min(), got.max())  # saturation
        assert np.max(np.abs(got - expected)) <= step


def test_int16x8_has_int16_activations_and_int8_weights(exported):
    out, report = exported
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(out / "tflite" / "rga_v1_int16x8.tflite"))
    tensors = interpreter.get_tensor_details()
    convolutions = [op for op in interpreter._get_ops_details() if op["op_name"] == "CONV_2D"]
    assert len(convolutions) == 1 + 4 * 3 + 4
    for op in convolutions:
        activation, weights = (tensors[i]["dtype"] for i in op["inputs"][:2])
        assert (activation, weights, tensors[op["outputs"][0]]["dtype"]) == (np.int16, np.int8, np.int16)
    # L2_NORMALIZATION has no int16 kernel: the one op left in float32 (the converter's float fallback)
    assert report["checks"]["tflite_int16x8"]["float_ops"] == {"L2_NORMALIZATION": 1}
    assert report["checks"]["tflite_int16x8"]["size_bytes"] < report["checks"]["tflite_float16"]["size_bytes"]


def test_int16x8_refuses_an_addition_that_was_zero_on_every_calibration_image(tmp_path):
    """Two convolutions with opposite kernels: their sum is exactly 0 on every image, so its int16 ADD gets a
    zero-width range that LiteRT would abort on; the export names the op instead."""
    kernel = tf.constant(np.random.default_rng(0).normal(size=(1, 1, 3, 4)), tf.float32)

    class Cancelling(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2, 2, 3], tf.float32, name="images")])
        def serve(self, images):
            total = tf.nn.conv2d(images, kernel, 1, "VALID") + tf.nn.conv2d(images, -kernel, 1, "VALID")
            return {"embedding": tf.reduce_mean(total, axis=(1, 2))}

    module = Cancelling()
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.serve})
    images = np.random.default_rng(1).uniform(0, 255, (4, 2, 2, 3)).astype(np.float32)
    with pytest.raises(ex.ExportError, match=r"int16x8 model cannot run: ADD \S+ has output scale .* 0 on every"):
        ex.convert_tflite(tmp_path, "int16x8", representative_images=images)


def test_selective_int8_keeps_the_measured_nodes_in_float(exported):
    out, report = exported
    from ai_edge_litert.interpreter import Interpreter

    nodes = report["checks"]["tflite_int8"]["float_nodes"]
    errors = [node["step_error"] for node in nodes]
    assert all(e > ex.INT8_MAX_STEP_ERROR for e in errors) and errors == sorted(errors, reverse=True)
    tensors = {t["name"]: t for t in Interpreter(model_path=str(out / "tflite" / "rga_v1_int8.tflite"))
               .get_tensor_details()}
    for node in nodes:
        assert tensors[node["tensor"]]["dtype"] == np.float32, node
    markdown = (out / "rga_v1_export_report.md").read_text()
    assert f"RMSE above {ex.INT8_MAX_STEP_ERROR} int8 steps): {len(nodes) or 'none'}" in markdown
    assert all(f"- `{node['tensor']}` ({node['op']}, {node['step_error']:.2f} steps)" in markdown for node in nodes)


def test_float16_keeps_vectors_in_float32(exported):
    """keep_vectors_float32: the vector-shaped constants (input normalisation, biases, folded BatchNorm) hold
    float32 values that float16 cannot represent, every other weight is float16."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    out, report = exported
    model = flatbuffer_utils.read_model_from_bytearray((out / "tflite" / "rga_v1_float16.tflite").read_bytes())
    vectors, matrices = [], []
    for tensor in model.subgraphs[0].tensors:
        data = model.buffers[tensor.buffer].data
        if data is not None and tensor.type in (schema.TensorType.FLOAT32, schema.TensorType.FLOAT16):
            vector = sum(int(n) > 1 for n in tensor.shape) <= 1  # e.g. (2048,), (1, 1, 1, 3)
            (vectors if vector else matrices).append((tensor.type, bytes(bytearray(data))))
    assert {t for t, _ in vectors} == {schema.TensorType.FLOAT32} and {t for t, _ in matrices} == {
        schema.TensorType.FLOAT16}
    values = np.concatenate([np.frombuffer(data, np.float32) for _, data in vectors])
    assert np.mean(values.astype(np.float16).astype(np.float32) != values) > 0.5  # not float16-rounded
    # one DEQUANTIZE per float16 weight, none for the vectors
    assert report["checks"]["tflite_float16"]["ops"]["DEQUANTIZE"] == len(matrices)


def run_litert(flatbuffer, images, keep=False):
    """Embeddings of a float-input TFLite model in memory (one image at a time); with ``keep``, also the
    interpreter of the last image, every tensor kept."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=bytes(flatbuffer), experimental_preserve_all_tensors=keep)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    result = []
    for image in images:
        interpreter.set_tensor(inp, image[None].astype(np.float32))
        interpreter.invoke()
        result.append(interpreter.get_tensor(out)[0].astype(np.float64))
    return (np.array(result), interpreter) if keep else np.array(result)


def dynamic_and_float32(exported):
    """The exported dynamic-range model (some ops with float32 weights already) and the float32 model."""
    return tuple((exported[0] / "tflite" / f"rga_v1_{kind}.tflite").read_bytes() for kind in ("dynamic", "float32"))


def test_best_subset_is_the_exhaustive_optimum():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 9))
        gains, costs = rng.normal(0.3, 1.0, n), rng.integers(1, 40, n)
        budget = int(rng.integers(0, 120))
        if trial % 2:  # a budget above _KNAPSACK_UNITS counts costs in units (exact for multiples of the unit)
            budget = hybrid._KNAPSACK_UNITS * 7 + budget
            costs = costs * 7 * 5
        best = max(sum(gains[list(s)]) for r in range(n + 1) for s in itertools.combinations(range(n), r)
                   if sum(costs[list(s)]) <= budget)
        chosen = hybrid.best_subset(gains, costs, budget)
        assert sum(costs[chosen]) <= budget and all(gains[chosen] > 0)
        assert sum(gains[chosen]) == pytest.approx(best, abs=1e-9)


def test_restored_ops_compute_what_the_float32_ops_do(exported, data):
    from tensorflow.lite.tools import flatbuffer_utils

    dynamic, float32 = dynamic_and_float32(exported)
    ops = hybrid.int8_weight_ops(dynamic)
    assert {o["op"] for o in ops} == {"CONV_2D", "FULLY_CONNECTED"} and all(o["weights"] >= 1024 for o in ops)
    images = images_of(data.query[:4])
    everything = hybrid.WeightRestorer(dynamic, float32)([o["index"] for o in ops])
    assert hybrid.int8_weight_ops(everything) == []
    np.testing.assert_allclose(run_litert(everything, images), run_litert(float32, images), atol=1e-5)

    # One fully-connected op back in float32: on its own input in the edited model it gives x Wᵀ + b with the
    # float32 model's weights (NumPy), where the int8 op did not; every other op keeps its int8 weights.
    fc = next(o for o in ops if o["op"] == "FULLY_CONNECTED")
    edited = hybrid.WeightRestorer(dynamic, float32)([fc["index"]])
    assert [o["index"] for o in hybrid.int8_weight_ops(edited)] == [o["index"] for o in ops if o is not fc]
    reference = flatbuffer_utils.read_model_from_bytearray(float32)
    graph = reference.subgraphs[0]
    op = graph.operators[fc["index"]]
    weights, bias = (np.frombuffer(bytes(bytearray(reference.buffers[graph.tensors[i].buffer].data)), np.float32)
                     if i >= 0 else None for i in op.inputs[1:3])
    weights = weights.reshape(graph.tensors[op.inputs[1]].shape)
    activation = op.builtinOptions.fusedActivationFunction
    assert activation in (0, 1)  # none or RELU
    errors = []
    for flatbuffer in (edited, dynamic):
        _, interpreter = run_litert(flatbuffer, images[-1:], keep=True)
        x, y = (interpreter.get_tensor(i) for i in (op.inputs[0], op.outputs[0]))
        expected = x.reshape(-1, weights.shape[1]).astype(np.float64) @ weights.T + (0 if bias is None else bias)
        expected = np.maximum(expected, 0) if activation == 1 else expected
        errors.append(np.abs(y.reshape(expected.shape) - expected).max() / np.abs(expected).max())
    assert errors[0] < 1e-5 < errors[1]


def test_dynamic_choice_is_the_exhaustive_optimum_within_the_budget(exported, data):
    dynamic, float32 = dynamic_and_float32(exported)
    images = images_of(data.train[::3])
    ops = hybrid.int8_weight_ops(dynamic)
    budget = 0.4 * 3 * sum(o["weights"] for o in ops) / len(dynamic)  # room for part of them only
    edited, info = hybrid.choose_float_weights(dynamic, float32, images, run_litert, budget=budget, worst=8)

    # The same rule, recomputed: the 8 images furthest from the float32 model, each op alone restored, its
    # gain in mean 1 - cosine there, the best sum of gains over every subset that fits.
    reference = unit(run_litert(float32, images))
    error = 1 - np.sum(unit(run_litert(dynamic, images)) * reference, axis=1)
    hardest = np.argsort(-error)[:8]
    extra = int(len(dynamic) * budget)
    candidates = [o for o in ops if 3 * o["weights"] <= extra]
    gains = {}
    for o in candidates:
        alone = unit(run_litert(hybrid.WeightRestorer(dynamic, float32)([o["index"]]), images[hardest]))
        gains[o["index"]] = error[hardest].mean() - (1 - np.sum(alone * reference[hardest], axis=1)).mean()
    assert 3 <= len(candidates) <= 16 and sum(3 * o["weights"] for o in candidates) > extra
    best = max(sum(gains[o["index"]] for o in s) for r in range(len(candidates) + 1)
               for s in itertools.combinations(candidates, r) if sum(3 * o["weights"] for o in s) <= extra)
    chosen = info["float_weight_ops"]
    assert chosen and sum(gains[o["index"]] for o in chosen) == pytest.approx(best, abs=1e-7)
    for o in chosen:
        assert o["gain"] == pytest.approx(gains[o["index"]], abs=1e-7)
    assert len(edited) <= info["size_budget_bytes"] == len(dynamic) + extra
    assert edited == hybrid.WeightRestorer(dynamic, float32)([o["index"] for o in chosen])
    assert info["calibration_error"]["before"] == pytest.approx(error[hardest].mean(), abs=1e-7)
    assert info["calibration_error"]["after"] < info["calibration_error"]["before"]


def test_dynamic_model_lists_its_float32_ops_within_its_budget(exported):
    out, report = exported
    check = report["checks"]["tflite_dynamic"]
    listed = check["float_weight_ops"]
    assert listed and {"index", "op", "tensor", "weights", "gain"} <= set(listed[0])
    written = json.loads((out / "rga_v1_export_report.json").read_text())["checks"]["tflite_dynamic"]
    assert written["float_weight_ops"] == listed and written["calibration_worst_images"] == hybrid.WORST_IMAGES
    dynamic, _ = dynamic_and_float32(exported)
    left = {o["tensor"] for o in hybrid.int8_weight_ops(dynamic)}
    assert left and not left & {o["tensor"] for o in listed}  # the listed ops hold float32 weights, no other
    assert len(dynamic) == check["size_bytes"] <= check["size_budget_bytes"]
    assert sum(3 * o["weights"] for o in listed) <= check["size_budget_bytes"] * TINY_FLOAT_WEIGHT_BUDGET
    markdown = (out / "rga_v1_export_report.md").read_text()
    assert all(f"`{o['tensor']}`" in markdown for o in listed)


def test_dynamic_model_is_calibrated_on_training_images(model, data, tmp_path, monkeypatch):
    class Seen(Exception):
        pass

    def spy(source, kind, **kwargs):
        if kind == "float32":  # the float32 model the dynamic-range one takes its float weights from
            return b""
        raise Seen(kind, kwargs["representative_images"])

    monkeypatch.setattr(tflite, "convert_tflite", spy)
    with pytest.raises(Seen) as seen:
        ex.export_all(model, tmp_path, formats=["tflite_dynamic"], calibration_samples=data.train,
                      num_calibration=30, check=False, verbose=False)
    kind, images = seen.value.args
    assert kind == "dynamic"
    np.testing.assert_array_equal(images, load_images(data.train, SIZE, 30))
    assert not list(tmp_path.glob("*/*.tflite"))  # nothing published


def test_worst_image_mean_and_map_gates_fail_a_broken_artefact(exported, model, data, monkeypatch):
    """Quantised artefacts whose embeddings are broken on purpose fail exactly the gates they should; the
    numbers are recomputed here with NumPy. Three names of quantised formats, one broken artefact each (the
    exported dynamic-range model, its embeddings changed after it runs). Each breakage fails its gates by
    construction, on any CPU: none rests on how well the model trained in this test retrieves."""
    from rga_keras.export import parity

    out, _ = exported
    all_images = np.concatenate([images_of(data.query), images_of(data.gallery)])
    nq = len(data.query)
    reference = keras_embeddings(model, all_images)
    reference_map = brute_force_retrieval(reference[:nq], reference[nq:], data.query, data.gallery)[1]
    target = all_images[nq + 3]
    identity = {image.tobytes(): (s.person_id, i >= nq) for i, (image, s) in
                enumerate(zip(all_images, [*data.query, *data.gallery]))}
    make_runner = parity._runner

    def break_(fmt, batch, good):
        """tflite_dynamic: one gallery image's embedding reversed; tflite_int8: every embedding turned by
        arccos 0.97; tflite_int16x8: each image's embedding replaced by a one-hot code of its identity, so
        retrieval is perfect where the Keras model's mAP is below 0.5, and ranks every true match last (gallery
        codes negated) where it is above: mAP moves by far more than a point whatever the model learned."""
        if fmt == "tflite_dynamic":
            return np.where(np.all(batch == target, axis=(1, 2, 3))[:, None], -good, good)
        if fmt == "tflite_int8":  # a direction orthogonal to each embedding, fixed by the embedding itself
            other = np.roll(good, 1, axis=1)
            other = unit(other - np.sum(other * good, axis=1, keepdims=True) * good)
            return 0.97 * good + np.sqrt(1 - 0.97**2) * other
        pid, in_gallery = (np.array(v) for v in zip(*(identity[image.tobytes()] for image in batch)))
        assert max(p for p, _ in identity.values()) < good.shape[1]  # a one-hot code per identity fits
        codes = np.eye(good.shape[1])[pid]
        return np.where((in_gallery & (reference_map >= 0.5))[:, None], -codes, codes)

    def runner(fmt, path, threads):
        run = make_runner(fmt, path, threads).run
        return Runner(lambda batch: break_(fmt, batch, unit(run(batch))), None, None)

    monkeypatch.setattr(parity, "_runner", runner)
    dynamic = out / "tflite" / "rga_v1_dynamic.tflite"
    formats = ("tflite_dynamic", "tflite_int8", "tflite_int16x8")
    report = {"model": ex.reid_model_info(model), "settings": {}, "checks": {fmt: {} for fmt in formats}}
    parity.check_artefacts(model, "after_bn", {fmt: (dynamic, {}) for fmt in formats}, report, data.query,
                           data.gallery, 64, 1, None, lambda line: None)
    designed = {"tflite_dynamic": {"minimum"}, "tflite_int8": {"mean"}, "tflite_int16x8": {"minimum", "mean", "mAP"}}
    for fmt in formats:
        check = report["checks"][fmt]
        assert check["thresholds"] == {"cosine_mean": 0.98, "cosine_min": 0.95, "max_map_diff": 1.0}
        # the rule, recomputed from the artefact, the breakage and the Keras model
        broken = break_(fmt, all_images, unit(litert_embeddings(dynamic, all_images)))
        cos = np.sum(broken * reference, axis=1)
        mean_ap = brute_force_retrieval(broken[:nq], broken[nq:], data.query, data.gallery)[1]
        expected = ({"minimum"} if cos.min() < 0.95 else set()) | ({"mean"} if cos.mean() < 0.98 else set()) | (
            {"mAP"} if abs(100 * (mean_ap - reference_map)) > 1.0 else set())
        assert designed[fmt] <= expected, (fmt, expected)  # each breakage does what it was made to do
        failed = {f.split()[0] if not f.startswith("mAP") else "mAP" for f in check["failures"]}
        assert failed == expected and not check["passed"], (fmt, check["failures"])
        assert check["cosine_min"] == pytest.approx(cos.min(), abs=1e-4), fmt
        assert check["cosine_mean"] == pytest.approx(cos.mean(), abs=1e-3), fmt


def test_relation_paths_give_the_same_embeddings(model, data):
    explicit = ex.with_relation(model, "explicit")
    assert {layer.options.relation for layer in explicit.rga_layers} == {"explicit"}
    assert ex.reid_model_info(explicit)["relation"] == "explicit"
    images = images_of(data.query)
    np.testing.assert_allclose(keras_embeddings(explicit, images), keras_embeddings(model, images), atol=1e-5)


# --------------------------------------------------------------------------- errors and atomicity


def test_not_a_reid_model_is_refused(tmp_path):
    plain = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    with pytest.raises(ex.ExportError, match="not an RGA re-id model"):
        ex.export_all(plain, tmp_path / "out")
    plain.save(tmp_path / "plain.keras")
    with pytest.raises(ValueError, match="not an RGA re-id model"):
        load_reid_model(tmp_path / "plain.keras")
    (tmp_path / "junk.keras").write_text("not a model")
    with pytest.raises(ValueError, match="could not load .*junk.keras.* is a zip archive, this one is not"):
        load_reid_model(tmp_path / "junk.keras")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reid_model(tmp_path / "missing.keras")
    (tmp_path / "folder.keras").mkdir()
    with pytest.raises(ValueError, match="expected a Keras model file ending in .keras.*folder.keras"):
        load_reid_model(tmp_path / "folder.keras")
    assert not (tmp_path / "out").exists()


def test_wrong_suffix_and_bad_options(model, tmp_path):
    (tmp_path / "model.h5").write_text("x")
    with pytest.raises(ValueError, match="ending in .keras"):
        load_reid_model(tmp_path / "model.h5")
    for kwargs, message in [({"formats": ["coreml"]}, "format must be one of"), ({"feature": "logits"}, "feature"),
                            ({"version": 0}, "positive integer"), ({"model_name": "a/b"}, "model_name"),
                            ({"serving_dtype": "float16"}, "serving_dtype")]:
        with pytest.raises(ValueError, match=message):
            ex.export_all(model, tmp_path / "out", **kwargs)


def test_existing_version_is_left_alone(exported, model):
    out, _ = exported
    before = (saved_model_dir(out) / "saved_model.pb").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="already exported"):
        ex.export_all(model, out, formats=["saved_model"], check=False, verbose=False)
    assert (saved_model_dir(out) / "saved_model.pb").stat().st_mtime_ns == before


def test_failed_check_publishes_nothing_unless_allowed(model, data, tmp_path, monkeypatch):
    monkeypatch.setitem(ex.FORMATS, "tflite_float32", dataclasses.replace(ex.FORMATS["tflite_float32"],
                                                                         thresholds={"cosine_min": 1.5, "max_map_diff": -1.0}))
    kwargs = dict(formats=["saved_model", "tflite_float32"], eval_split=(data.query, data.gallery),
                  latency_runs=1, verbose=False)
    with pytest.raises(ex.ParityError, match=r"tflite_float32: minimum cosine similarity .* < 1.5") as failure:
        ex.export_all(model, tmp_path, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rga_v1_export_report.json", "rga_v1_export_report.md"]
    saved = json.loads((tmp_path / "rga_v1_export_report.json").read_text())
    assert not saved["passed"] and not saved["published"] and saved["checks"]["saved_model"]["passed"]
    failures = failure.value.report["checks"]["tflite_float32"]["failures"]
    assert len(failures) == 2 and re.fullmatch(r"mAP differs from the Keras model's by [+-]\d+\.\d\d points "
                                               r"\(allowed ±-1\.0\)", failures[1]), failures
    report = ex.export_all(model, tmp_path, enforce=False, **{**kwargs, "formats": ["tflite_float32"]})
    assert not report["passed"] and report["published"] and (tmp_path / "tflite/rga_v1_float32.tflite").is_file()
    # version 1 now exists, whatever the formats: exporting it again needs overwrite
    with pytest.raises(FileExistsError, match="already exported: .*rga_v1_export_report.json"):
        ex.export_all(model, tmp_path, check=False, **{**kwargs, "formats": ["saved_model"]})
    # a rejected re-export leaves the published version's report alone and writes its own beside it (the failing
    # format alone: a SavedModel more would only cost time)
    tflite_only = {**kwargs, "formats": ["tflite_float32"]}
    with pytest.raises(ex.ParityError, match=r"full report: .*rga_v1_export_report\.failed\.md"):
        ex.export_all(model, tmp_path, overwrite=True, **tflite_only)
    kept = json.loads((tmp_path / "rga_v1_export_report.json").read_text())
    assert kept["published"] and kept["checks"] == json.loads(json.dumps(report["checks"]))
    assert not json.loads((tmp_path / "rga_v1_export_report.failed.json").read_text())["published"]
    ex.export_all(model, tmp_path, overwrite=True, enforce=False, **tflite_only)  # publishing removes the stale one
    assert not list(tmp_path.glob("*.failed.*"))


def test_an_error_midway_leaves_nothing_behind(model, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(tflite, "convert_tflite", broken)  # where the TFLite format module looks it up
    with pytest.raises(RuntimeError, match="converter crashed"):
        ex.export_all(model, tmp_path, formats=["saved_model", "tflite_float32"], check=False, verbose=False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- helpers


def test_estimate_batchnorm_statistics_sets_batch_statistics(data):
    model = tiny_reid_model(3, name="bn_check")
    images = images_of(data.train[:16])
    bn = next(layer for layer in model.backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    conv_out = keras.Model(model.inputs, bn.input).predict(images, verbose=0).astype(np.float64)
    ex.estimate_batchnorm_statistics(model, images)
    np.testing.assert_allclose(bn.moving_mean.numpy(), conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), conv_out.var(axis=(0, 1, 2)), rtol=1e-3)
    assert bn.momentum == 0.9 and model.bnneck.momentum == 0.9


def test_cosine_rows_and_latency_helpers():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    expected = [float(a[i] @ b[i] / np.linalg.norm(a[i]) / np.linalg.norm(b[i])) for i in range(5)]
    np.testing.assert_allclose(ex.cosine_rows(a, b), expected, rtol=1e-12)
    calls = []
    stats = ex.measure_latencies({"a": lambda x: calls.append("a"), "b": lambda x: calls.append("b")},
                                 np.zeros(1), runs=4, rounds=2, warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2  # warm-up, then interleaved rounds
    assert stats["a"]["runs"] == 4 and stats["a"]["min_ms"] <= stats["a"]["median_ms"] <= stats["a"]["p90_ms"]


def test_latency_helper_tells_cpu_time_from_waiting():
    """A call that computes for 3 ms of CPU time and one that sleeps 3 ms: same wall clock, not the same cost."""
    def compute(_):
        start = time.process_time()
        while time.process_time() - start < 3e-3:
            pass

    stats = ex.measure_latencies({"compute": compute, "sleep": lambda _: time.sleep(3e-3)}, np.zeros(1), runs=4)
    assert stats["compute"]["cpu_median_ms"] >= 3.0
    assert stats["sleep"]["median_ms"] >= 3.0 and stats["sleep"]["cpu_median_ms"] < stats["sleep"]["median_ms"] - 2.0


# --------------------------------------------------------------------------- the program


def test_cli_help(capsys):
    from rga_keras.cli.export import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--formats", "tflite_int8", "--allow-failures", "--skip-parity-check", "--calibration-dir",
                 "--untrained", "--version", "--model-name", "--feature"):
        assert flag in text


def test_cli_exports_and_reports_errors(model, data_root, tmp_path, capsys):
    from rga_keras.cli.export import main

    model.save(tmp_path / "tiny.keras")
    out = tmp_path / "out"
    args = ["--model", str(tmp_path / "tiny.keras"), "--out", str(out), "--formats", "tflite_float32",
            "--data-root", str(data_root), "--latency-runs", "2", "--quiet", "--version", "3"]
    assert main(args) == 0
    assert (out / "tflite" / "rga_v3_float32.tflite").is_file()
    assert "tflite_float32" in capsys.readouterr().out
    assert main(args) == 2 and "already exported" in capsys.readouterr().err
    (tmp_path / "junk.keras").write_text("x")
    assert main(["--model", str(tmp_path / "junk.keras"), "--out", str(out)]) == 2
    assert "could not load" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["--model", "m.keras", "--out", str(out), "--formats", "coreml"])
    assert done.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:  # would be silently ignored: the model file fixes them
        main(["--model", "m.keras", "--out", str(out), "--input-size", "256", "128", "--num-classes", "3"])
    assert done.value.code == 2 and "--num-classes, --input-size describe the --untrained model" in (
        capsys.readouterr().err)


@pytest.mark.slow
def test_real_network_all_formats(data, tmp_path):
    """The full RGA-SC ResNet-50 (64×32 input). Random weights make a chaotic network whose reduced-precision
    parity means nothing (docs/EXPORT.md), so only the float artefacts' thresholds are asserted here."""
    model = build_rga_resnet50(data.num_train_ids, "sc", input_shape=(*SIZE, 3))
    ex.estimate_batchnorm_statistics(model, images_of(data.train))
    report = ex.export_all(model, tmp_path, formats=ex.FORMATS, calibration_samples=data.train, num_calibration=24,
                           eval_split=(data.query, data.gallery), latency_runs=3, enforce=False, verbose=False)
    assert report["checks"]["saved_model"]["passed"] and report["checks"]["tflite_float32"]["passed"]
    assert all(report["checks"][f"tflite_{k}"]["builtin_only"] for k in ex.TFLITE_KINDS)
    # Two relation products per branch: 4 modules × 2 branches; at 64×32 the channel branches of stages 3 and 4
    # have one-dimensional embeddings (N' = 8 // 8 = 1), whose products are multiplies, not BATCH_MATMUL.
    products = sum(2 for layer in model.rga_layers for branch in layer.branches
                   if not (branch.axis == "channel" and layer.input.shape[1] * layer.input.shape[2] // 8 == 1))
    assert products == 12 and report["checks"]["tflite_int8"]["float_ops"]["BATCH_MATMUL"] == products
    images = images_of(data.query)
    reference = keras_embeddings(model, images)
    got = tf.saved_model.load(str(saved_model_dir(tmp_path))).signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(got["embedding"].numpy(), reference, atol=1e-4)
    float32 = litert_embeddings(tmp_path / "tflite" / "rga_v1_float32.tflite", images)
    assert np.sum(unit(float32) * reference, axis=1).min() >= 0.9999
