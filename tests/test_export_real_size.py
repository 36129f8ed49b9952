"""The real-size export gate (issue 12): every format of `rga_keras.export.FORMATS` exported from the RGA-SC
ResNet-50 at 256×128, checked as rga-export checks it, and its artefact run again here through
`rga_keras.retrieval.load_embedder` against the Keras model (NumPy cosines).

Slow (minutes per format on 2 cores: docs/EXPORT.md, "The real size"), so not in the default run. Parity on a
quarter of the synthetic query/gallery split (49 / 202 images), int8 calibrated on 64 training images. The network
is untrained, with BatchNorm statistics estimated on 64 synthetic images: sizes, op sets and float parity do not
depend on training, but a random deep network is chaotic (rounding its weights to float16 or int8 moves its
embeddings far more than a trained network's), so only the float32 artefacts (a cosine_min threshold of 0.9999)
must pass their parity threshold here; the reduced-precision ones must convert, load and give finite unit
embeddings, and their numbers are printed (the trained demo model's gate them: docs/EXPORT.md).
"""
from __future__ import annotations

import json
import time

import keras
import numpy as np
import pytest

from rga_keras import build_rga_resnet50, retrieval
from rga_keras import export as ex
from rga_keras.data import load_dataset, load_images

SIZE = (256, 128)


@pytest.fixture(scope="module")
def real_size():
    keras.utils.set_random_seed(0)
    data = load_dataset("synthetic")
    model = build_rga_resnet50(data.num_train_ids, "sc", input_shape=(*SIZE, 3))
    ex.estimate_batchnorm_statistics(model, load_images(data.train, SIZE, limit=64))
    return model, data, load_images(data.query, SIZE, limit=16)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_real_size_export(real_size, fmt, tmp_path):
    model, data, images = real_size
    start = time.perf_counter()
    report = ex.export_all(model, tmp_path, formats=[fmt], calibration_samples=data.train, num_calibration=64,
                           eval_split=(data.query[::4], data.gallery[::4]), latency_runs=5, enforce=False,
                           verbose=False)
    seconds = time.perf_counter() - start
    check = report["checks"][fmt]
    print(json.dumps({"format": fmt, "seconds": round(seconds), "cosine_mean": check["cosine_mean"],
                      "cosine_min": check["cosine_min"], "size_mib": check["size_bytes"] / 2**20,
                      "latency_ms": check["latency_ms"]["median_ms"], "passed": check["passed"]}))
    assert report["model"]["input_size"] == list(SIZE) and report["published"]
    embedder = retrieval.load_embedder(report["artefacts"][fmt])
    assert embedder.input_size == SIZE
    got = embedder(images)
    reference = keras.ops.convert_to_numpy(model.embedding_model("after_bn")(images, training=False))
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert np.isfinite(got).all() and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    cos = np.einsum("ij,ij->i", got.astype(np.float64), reference)
    if ex.FORMATS[fmt].thresholds.get("cosine_min", 0) >= 0.9999:  # float32 artefacts: the same function, exactly
        assert check["passed"], check["failures"]
        assert cos.min() >= 0.9999, cos.min()
    if fmt == "tflite_int8_full":  # the 16 relation products in XNNPACK's int8 batch matmul (zero-point-0 operands)
        assert check["ops"]["BATCH_MATMUL"] == 16 and "BATCH_MATMUL" not in check["outside_xnnpack"]
