"""Tests of the ONNX export (issue 12): rga-export --formats onnx, its parity report, the graph, the dynamic batch
axis, a conversion that fails, and rga-embed reading the .onnx file.

The tiny RGA-SC model of tests/test_export.py, untrained (a float32 export computes the same function whatever
the weights) with BatchNorm statistics estimated so that different images get clearly different embeddings.
Every number of the report is recomputed here with ONNX Runtime called directly (not the library's runner),
NumPy cosines and the brute-force Rank-1/mAP loop of tests/test_export.py.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime
import pytest

from rga_keras import export as ex
from rga_keras import retrieval
from rga_keras.export import onnx as onnx_format
from tests import test_export
from tests.checks import unit
from tests.test_export import SIZE, brute_force_retrieval, images_of, keras_embeddings, tiny_reid_model

data_root, data = test_export.data_root, test_export.data  # its fixtures: the synthetic dataset at 64×32


def run_onnx(path, images):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"images": np.asarray(images, np.float32)})[0]


@pytest.fixture(scope="module")
def model(data):
    model = tiny_reid_model(data.num_train_ids)
    ex.estimate_batchnorm_statistics(model, images_of(data.train[::4]))
    return model


@pytest.fixture(scope="module")
def exported(model, data_root, tmp_path_factory):
    """Through the program, as a user runs it: rga-export --formats onnx."""
    from rga_keras.cli.export import main

    out = tmp_path_factory.mktemp("onnx")
    model.save(out / "tiny.keras")
    assert main(["--model", str(out / "tiny.keras"), "--out", str(out), "--formats", "onnx", "--data-root",
                 str(data_root), "--latency-runs", "3", "--quiet"]) == 0
    return out, json.loads((out / "rga_v1_export_report.json").read_text())


def test_onnx_parity_and_retrieval_match_an_independent_computation(exported, model, data):
    out, report = exported
    path = out / "onnx" / "rga_v1.onnx"
    assert report["artefacts"] == {"onnx": str(path)} and report["published"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no staging folder left
    images = np.concatenate([images_of(data.query), images_of(data.gallery)])
    nq = len(data.query)
    reference = keras_embeddings(model, images)
    distinct = 1 - (reference @ reference.T)[~np.eye(len(reference), dtype=bool)]
    assert distinct.min() > 1e-3  # another image's embedding would fail the 0.9999 check below
    got = run_onnx(path, images)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)  # L2-normalised in the graph
    cos = np.sum(unit(got) * reference, axis=1)
    check = report["checks"]["onnx"]
    assert check["cosine_min"] == pytest.approx(cos.min(), abs=2e-6) and cos.min() >= 0.9999
    assert check["cosine_mean"] == pytest.approx(cos.mean(), abs=2e-6)
    rank1, mean_ap = brute_force_retrieval(got[:nq], got[nq:], data.query, data.gallery)
    assert (check["rank1"], check["mAP"]) == (pytest.approx(rank1), pytest.approx(mean_ap))
    assert check["thresholds"] == {"cosine_min": 0.9999} and check["passed"]
    assert check["size_bytes"] == path.stat().st_size
    assert check["latency_ms"]["runs"] == 3 and check["speedup_vs_keras"] > 0
    assert report["settings"]["versions"]["onnxruntime"] == onnxruntime.__version__


def test_onnx_graph_is_standard_opset_17_with_one_image_input(exported):
    out, report = exported
    proto = onnx.load(str(out / "onnx" / "rga_v1.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [("", 17)]
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    (source,), (target,) = proto.graph.input, proto.graph.output
    dims = [d.dim_param or d.dim_value for d in source.type.tensor_type.shape.dim]
    assert (source.name, dims) == ("images", ["batch", *SIZE, 3])
    assert [d.dim_param or d.dim_value for d in target.type.tensor_type.shape.dim] == ["batch", 4 * 32]
    assert {p.key: p.value for p in proto.metadata_props}["rga_feature"] == "after_bn"
    ops = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    check = report["checks"]["onnx"]
    assert (check["opset"], check["nodes"], check["ops"]) == (17, len(proto.graph.node), ops)
    # the tiny backbone's 17 convolutions; its 2 RGA-SC modules' 4 attention gates
    assert ops["Conv"] == 1 + 4 * 3 + 4 and ops["Sigmoid"] == 4


def test_dynamic_batch_gives_the_keras_rows(exported, model, data):
    path = exported[0] / "onnx" / "rga_v1.onnx"
    images = images_of(data.query[:3])
    reference = keras_embeddings(model, images)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    three = session.run(None, {"images": images})[0]
    ones = np.concatenate([session.run(None, {"images": image[None]})[0] for image in images])
    np.testing.assert_allclose(three, reference, atol=2e-5)
    np.testing.assert_allclose(ones, reference, atol=2e-5)


def test_rga_embed_reads_the_onnx_model(exported, model, data, tmp_path, capsys):
    from rga_keras.cli import embed as rga_embed

    path = exported[0] / "onnx" / "rga_v1.onnx"
    embedder = retrieval.load_embedder(path)
    assert (embedder.format, embedder.input_size, embedder.feature) == ("onnx", SIZE, "after_bn")
    with pytest.raises(ValueError, match="computes the after_bn feature, not before_bn"):
        retrieval.load_embedder(path, "before_bn")
    samples = data.query[:5]
    out = tmp_path / "q.h5"
    assert rga_embed.main([str(path), *[s[0] for s in samples], "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    features = retrieval.read_features(out)
    assert features.paths == [s[0] for s in samples] and features.source["model_format"] == "onnx"
    np.testing.assert_allclose(features.features, keras_embeddings(model, images_of(samples)), atol=2e-5)


def test_an_op_without_onnx_conversion_publishes_nothing_and_is_named(model, tmp_path, monkeypatch):
    from tf2onnx import handler

    create_mapping = handler.tf_op.create_mapping

    def without_sigmoid(*args, **kwargs):  # as if tf2onnx had no conversion for the attention gates' op
        mapping = create_mapping(*args, **kwargs)
        mapping.pop("Sigmoid")
        return mapping

    monkeypatch.setattr(handler.tf_op, "create_mapping", without_sigmoid)
    with pytest.raises(ex.ExportError, match=r"no ONNX conversion for the TensorFlow op\(s\) Sigmoid \(4 nodes, "
                                             r"e\.g\. .*rga1.*Sigmoid\)"):
        ex.export_all(model, tmp_path, formats=["saved_model", "onnx"], check=False, verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_publishes_no_onnx_file(exported, model, data, tmp_path, monkeypatch):
    converted = (exported[0] / "onnx" / "rga_v1.onnx").read_bytes()
    monkeypatch.setattr(onnx_format, "convert_onnx", lambda source, feature: converted)  # converted once above
    monkeypatch.setitem(ex.FORMATS, "onnx", dataclasses.replace(ex.FORMATS["onnx"], thresholds={"cosine_min": 1.5}))
    with pytest.raises(ex.ParityError, match=r"onnx: minimum cosine similarity .* < 1.5"):
        ex.export_all(model, tmp_path, formats=["onnx"], eval_split=(data.query, data.gallery),
                      latency_runs=1, verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rga_v1_export_report.json", "rga_v1_export_report.md"]
