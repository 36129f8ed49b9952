"""rga-embed / rga-search and the model formats: embeddings of every format against the Keras model computed
here, features files, appending, the search results against a brute-force NumPy ranking, and bad input.

One small untrained network (the baseline ResNet with one bottleneck per stage at 64x32: these tests are about
the formats and the programs, not the network's size; BatchNorm statistics estimated on the test images so that
different images get clearly different embeddings) is saved once per module as .keras, SavedModel and float32
TFLite.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys

import keras
import numpy as np
import pymilvus  # noqa: F401 (imported while collecting: its log handler keeps pytest's stderr, not a test's capsys)
import pytest
from PIL import Image

import rga_keras
from rga_keras import export, retrieval
from rga_keras.cli import embed as rga_embed
from rga_keras.cli import search as rga_search
from tests.checks import small_rga_resnet, unit

SIZE = (64, 32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrieval")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (14, *SIZE, 3), dtype=np.uint8)
    paths = []
    for i, image in enumerate(pixels):  # already at the model's size: no resizing, so PIL's pixels are exact
        folder = tmp / ("gallery" if i < 10 else "more")
        folder.mkdir(exist_ok=True)
        paths.append(str(folder / f"{i:02d}.png"))
        Image.fromarray(image).save(paths[-1])
    (tmp / "gallery" / "broken.jpg").write_bytes(b"not an image")
    keras.utils.set_random_seed(0)
    model = small_rga_resnet(4, None, (*SIZE, 3))
    export.estimate_batchnorm_statistics(model, pixels.astype(np.float32))
    reference = unit(rga_keras.embedding_model(model, "after_bn")(pixels.astype(np.float32), training=False))
    mirrored = unit(rga_keras.embedding_model(model, "after_bn")(pixels[:, :, ::-1].astype(np.float32),
                                                                 training=False))
    models = {"keras": tmp / "model.keras", "saved_model": tmp / "serving" / "rga" / "1",
              "tflite": tmp / "model_float32.tflite"}
    model.save(models["keras"])
    export.write_saved_model(model, models["saved_model"])
    source = export.write_float_saved_model(model, tmp / "tflite_source")
    models["tflite"].write_bytes(export.convert_tflite(source, "float32"))
    return {"tmp": tmp, "paths": paths, "pixels": pixels.astype(np.float32), "reference": reference,
            "mirrored": mirrored, "models": models}


@pytest.fixture(scope="module")
def embedders(setup):
    return {fmt: retrieval.load_embedder(path) for fmt, path in setup["models"].items()}


def run(program, argv, capsys):
    status = program.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_every_format_embeds_to_the_same_vectors(setup, embedders):
    reference = setup["reference"]
    distinct = 1 - (reference @ reference.T)[~np.eye(len(reference), dtype=bool)]
    assert distinct.min() > 1e-3  # another image's vector would fail the 0.9999 check below
    for fmt, embedder in embedders.items():
        assert (embedder.format, embedder.input_size) == (fmt, SIZE)
        assert embedder.feature == (None if fmt == "tflite" else "after_bn")
        got = embedder(setup["pixels"])
        assert got.dtype == np.float32 and got.shape == reference.shape
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
        assert np.einsum("ij,ij->i", unit(got), reference).min() >= 0.9999, fmt


def test_embed_images_skips_unreadable_files_and_averages_flips(setup, embedders):
    embedder = embedders["keras"]
    broken, missing = str(setup["tmp"] / "gallery" / "broken.jpg"), str(setup["tmp"] / "missing.png")
    paths = [setup["paths"][0], broken, *setup["paths"][1:4], missing]
    features, embedded, skipped = retrieval.embed_images(embedder, paths, batch_size=3, verbose=0)
    assert embedded == setup["paths"][:4] and skipped == [broken, missing]
    np.testing.assert_allclose(features, setup["reference"][:4], atol=1e-5)
    flipped, _, _ = retrieval.embed_images(embedder, setup["paths"][:4], flip=True, verbose=0)
    np.testing.assert_allclose(flipped, unit(setup["reference"][:4] + setup["mirrored"][:4]), atol=1e-5)
    assert np.einsum("ij,ij->i", flipped, setup["reference"][:4]).max() < 0.9999  # the flip changed them


def test_rga_embed_writes_the_features_file_and_appends_only_new_images(setup, capsys, monkeypatch, tmp_path):
    keras_model, out = setup["models"]["keras"], tmp_path / "gallery.h5"
    status, printed, err = run(rga_embed, [keras_model, setup["tmp"] / "gallery", "--out", out, "--quiet"], capsys)
    assert status == 0 and "embedded 10 images (1 skipped)" in printed
    assert f"skipped unreadable image: {setup['tmp'] / 'gallery' / 'broken.jpg'}" in err
    data = retrieval.read_features(out)
    assert data.paths == setup["paths"][:10]
    np.testing.assert_allclose(data.features, setup["reference"][:10], atol=1e-5)
    assert data.source == {"model": str(keras_model), "feature": "after_bn", "input_size": list(SIZE), "flip": False,
                           "model_format": "keras",
                           "model_sha256": hashlib.sha256(keras_model.read_bytes()).hexdigest()}

    calls = []
    embed = retrieval.embed_images
    monkeypatch.setattr(retrieval, "embed_images", lambda e, paths, **kw: calls.append(paths) or embed(e, paths, **kw))
    status, printed, _ = run(rga_embed, [keras_model, setup["tmp"] / "gallery", setup["tmp"] / "more", "--out", out,
                                         "--append", "--quiet"], capsys)
    grown = retrieval.read_features(out)
    # embedded now: only the images not in the file (the broken one is tried again, and skipped again)
    assert status == 0 and calls == [[str(setup["tmp"] / "gallery" / "broken.jpg"), *setup["paths"][10:]]]
    assert grown.paths == setup["paths"]
    np.testing.assert_array_equal(grown.features[:10], data.features)  # the old rows untouched
    np.testing.assert_allclose(grown.features[10:], setup["reference"][10:], atol=1e-5)

    for argv, message in [
        ([setup["models"]["tflite"], setup["tmp"] / "more", "--out", out, "--append"],
         "comes from model .*model_float32.tflite .* but .*gallery.h5 from model .*model.keras"),
        ([keras_model, setup["tmp"] / "more", "--out", out, "--append", "--flip"], "flip True"),
        ([keras_model, setup["tmp"] / "more", "--out", out], "gallery.h5 exists; --append adds"),
    ]:
        status, _, err = run(rga_embed, argv, capsys)
        assert status == 2 and err.count("\n") == 1 and err.startswith("rga-embed: error: "), err
        assert re.search(message, err), err
    assert retrieval.read_features(out).paths == setup["paths"]  # refused runs left the file alone


def test_rga_embed_keeps_the_index_and_fills_milvus(setup, capsys, tmp_path):
    """--index builds the faiss index, --append adds to it (no rebuild), an --overwrite that would orphan it is
    refused before any work; --milvus fills a Milvus Lite gallery with only the images not in it yet. The
    TFLite model, as it loads fastest; its vectors are the reference's (tested above)."""
    model, out, milvus = setup["models"]["tflite"], tmp_path / "gallery.h5", tmp_path / "milvus.db"
    status, printed, _ = run(rga_embed, [model, setup["tmp"] / "gallery", "--out", out, "--index", "--quiet"], capsys)
    assert status == 0 and f"index    wrote {out}.faiss: faiss Flat, top 200 re-ranked exactly" in printed
    status, printed, _ = run(rga_embed, [model, setup["tmp"] / "more", "--out", out, "--append", "--quiet"], capsys)
    assert status == 0 and f"and to its index {out}.faiss (no rebuild)" in printed
    assert retrieval.index_status(out) == "current"
    with retrieval.IndexedGallery(out) as gallery:
        hits = gallery.search(setup["reference"][[2, 12]], 5)
    sims = setup["reference"][[2, 12]] @ setup["reference"].T
    np.testing.assert_array_equal(hits.ids, np.argsort(-sims, axis=1, kind="stable")[:, :5])
    status, _, err = run(rga_embed, [model, setup["tmp"] / "more", "--out", out, "--overwrite"], capsys)
    assert status == 2 and "has an index" in err and "add --index to build it again" in err

    status, printed, _ = run(rga_embed, [model, setup["tmp"] / "gallery", "--milvus", milvus, "--quiet"], capsys)
    assert status == 0 and "embedded 10 images (1 skipped); added them to Milvus collection rga_gallery" in printed
    status, printed, _ = run(rga_embed, [model, setup["tmp"] / "gallery", setup["tmp"] / "more", "--milvus", milvus,
                                         "--quiet"], capsys)
    assert status == 0 and "images   5 new (not in Milvus collection rga_gallery" in printed  # 4, and broken.jpg
    with retrieval.MilvusGallery(milvus) as gallery:
        assert len(gallery) == 14 and gallery.source == retrieval.read_features(out).source
        crops = gallery.crops(gallery.ids(0, 14))
        assert sorted(c.path for c in crops) == sorted(setup["paths"])
        assert {c.time for c in crops} != {-1}  # the files' times


@pytest.fixture(scope="module")
def gallery_file(setup, embedders, tmp_path_factory):
    """The gallery as rga-embed writes it (tested above), from the reference vectors: no model run needed."""
    data = retrieval.FeatureSet(setup["reference"][:10].astype(np.float32), setup["paths"][:10],
                                retrieval.feature_source(embedders["keras"], flip=False))
    return retrieval.write_features(tmp_path_factory.mktemp("gallery") / "gallery.h5", data)


def test_rga_search_results_equal_a_brute_force_ranking(setup, gallery_file, capsys, tmp_path):
    queries = [setup["paths"][3], setup["paths"][12]]
    status, printed, _ = run(rga_search, [*queries, "--gallery", gallery_file, "--top-k", 4, "--json",
                                          tmp_path / "r.json", "--csv", tmp_path / "r.csv", "--picture",
                                          tmp_path / "r.png"], capsys)
    assert status == 0
    reference = setup["reference"]
    sims = reference[[3, 12]] @ reference[:10].T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :4]
    found = json.loads((tmp_path / "r.json").read_text())["queries"]
    assert [q["query"] for q in found] == queries
    for row, query in enumerate(found):
        assert [r["path"] for r in query["results"]] == [setup["paths"][j] for j in order[row]]
        np.testing.assert_allclose([r["similarity"] for r in query["results"]], sims[row, order[row]], atol=1e-5)
    assert found[0]["results"][0]["path"] == setup["paths"][3]  # an image finds itself first
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0] == "query,rank,path,similarity" and len(lines) == 9
    assert lines[1].split(",")[:3] == [queries[0], "1", setup["paths"][3]]
    assert f"query {queries[1]}" in printed and f"    1  {sims[1, order[1, 0]]:.4f}  " in printed
    assert Image.open(tmp_path / "r.png").size == rga_keras.visualize.plots.ranked_list_layout(2, 4, (64, 128))[1]

    # the same queries as a features file, embedded by the moved model file given with --model
    moved = tmp_path / "elsewhere.keras"
    shutil.copy(setup["models"]["keras"], moved)
    assert rga_embed.main([str(moved), *queries, "--out", str(tmp_path / "q.h5"), "--quiet"]) == 0
    status, _, _ = run(rga_search, [tmp_path / "q.h5", "--gallery", gallery_file, "--top-k", 4, "--json",
                                    tmp_path / "r2.json"], capsys)
    assert status == 0
    assert json.loads((tmp_path / "r2.json").read_text())["queries"] == found


def test_bad_input_is_one_line_and_status_2(setup, gallery_file, capsys, tmp_path, monkeypatch):
    query = setup["paths"][0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.pt").write_bytes(b"x")
    (tmp_path / "broken.tflite").write_bytes(b"not a flatbuffer")
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"no")
    other = retrieval.read_features(gallery_file)
    retrieval.write_features(tmp_path / "narrow.h5", retrieval.FeatureSet(other.features[:, :16], other.paths,
                                                                          other.source))
    retrieval.write_features(tmp_path / "sm.h5", retrieval.FeatureSet(
        other.features, other.paths, {**other.source, "model_sha256": "0" * 64}))
    retrieval.write_features(tmp_path / "moved.h5", retrieval.FeatureSet(
        other.features, other.paths, {**other.source, "model": str(tmp_path / "gone" / "model.keras")}))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    keras_model, out = setup["models"]["keras"], tmp_path / "out.h5"
    cases = [
        (rga_embed, [tmp_path / "nope.keras", query, "--out", out], "model .*nope.keras does not exist"),
        (rga_embed, [tmp_path / "model.pt", query, "--out", out], "unsupported model .*model.pt: expected a .keras"),
        (rga_embed, [setup["models"]["saved_model"].parent, query, "--out", out],
         "is not a SavedModel .* pass one of them, e.g. .*rga/1"),
        (rga_embed, [tmp_path / "broken.tflite", query, "--out", out], "could not load .*broken.tflite as a TFLite"),
        (rga_embed, [tmp_path / "model.onnx", query, "--out", out], "needs onnxruntime, which is not installed"),
        (rga_embed, [keras_model, tmp_path / "empty", "--out", out], "no images found in"),
        (rga_embed, [keras_model, tmp_path / "bad", "--out", out], "could be read"),
        (rga_search, [query, "--gallery", query], "is not a features file"),
        (rga_search, [query, "--gallery", tmp_path / "nope.h5"], "nope.h5 does not exist"),
        (rga_search, [tmp_path / "sm.h5", "--gallery", gallery_file], "query file .*sm.h5 comes from model"),
        (rga_search, [tmp_path / "narrow.h5", "--gallery", gallery_file], "dimensions differ: 16 vs 256"),
        (rga_search, [query, "--gallery", gallery_file, "--model", setup["models"]["tflite"]],
         "--model comes from model .*model_float32.tflite"),
        (rga_search, [tmp_path / "empty", "--gallery", gallery_file], "no images found"),
        (rga_search, [query, "--gallery", tmp_path / "moved.h5"],
         "the gallery's model .*gone/model.keras does not exist \\(moved\\?\\); pass its location with --model"),
    ]
    for program, argv, message in cases:
        status, _, err = run(program, argv, capsys)
        assert status == 2 and err.startswith(f"{program.build_parser().prog}: error: "), (argv, err)
        assert err.strip().count("\n") == 0 or "skipping unreadable" in err, err
        assert re.search(message, err.strip().splitlines()[-1]), (message, err)
    assert not out.exists()
