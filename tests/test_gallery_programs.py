"""rga-search, rga-gallery and rga-serve over a features file, its faiss index and a Milvus gallery (issue 23),
with queries given as a features file, so no model runs: the programs' results against a brute-force NumPy
ranking, what they print, and bad input as one line and status 2."""
from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pymilvus  # noqa: F401 (imported while collecting: its log handler keeps pytest's stderr, not a test's capsys)
import pytest
from PIL import Image

from rga_keras import retrieval
from rga_keras.cli import gallery as rga_gallery
from rga_keras.cli import search as rga_search
from rga_keras.cli import serve as rga_serve
from rga_keras.visualize.plots import ranked_list_layout
from tests.test_retrieval_gallery import grid_set, one_faiss_thread  # noqa: F401 (autouse)
from tests.test_retrieval_search import brute_force, grid_vectors

EXACT_INDEX = ["--factory", "IVF4,PQ8x4fs", "--nprobe", "4", "--train-rows", "700", "--quiet"]


def run(program, argv, capsys):
    """(exit status, stdout, stderr) of a program; argparse's errors exit through SystemExit."""
    try:
        status = program.main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture()
def files(tmp_path):
    """A 1,000-row gallery of grid vectors whose images live under tmp_path/crops, and 6 queries."""
    rng = np.random.default_rng(0)
    data = grid_set(rng, 1000)
    root = tmp_path / "crops"
    root.mkdir()
    data = retrieval.FeatureSet(data.features, [str(root / p.split("/")[-1]) for p in data.paths], data.source)
    query = retrieval.FeatureSet(grid_vectors(rng, 6), [str(tmp_path / "queries" / f"{i}.jpg") for i in range(6)],
                                 data.source)
    query.features[0] = data.features[3]  # ties: rows 3, 10 and 40 are equal
    return {"gallery": retrieval.write_features(tmp_path / "gallery.h5", data), "data": data,
            "query": retrieval.write_features(tmp_path / "query.h5", query), "queries": query, "root": root}


def expected_paths(files, k, rows=None):
    """Each query's top-k gallery paths by brute force (over ``rows`` of the gallery, default all)."""
    rows = np.arange(1000) if rows is None else np.asarray(rows)
    order, _, _ = brute_force(files["queries"].features, files["data"].features[rows], k)
    return [[files["data"].paths[rows[j]] for j in row] for row in order]


def found_paths(json_file):
    return [[r["path"] for r in q["results"]] for q in json.loads(json_file.read_text())["queries"]]


def test_rga_gallery_index_builds_updates_and_refuses_a_stale_index(files, capsys):
    gallery, data = files["gallery"], files["data"]
    status, out, _ = run(rga_gallery, ["index", gallery, *EXACT_INDEX], capsys)
    assert status == 0 and f"index    wrote {gallery}.faiss" in out
    assert "1000 vectors, faiss IVF4,PQ8x4fs, nprobe 4, top 200 re-ranked exactly" in out
    status, out, _ = run(rga_gallery, ["index", gallery], capsys)
    assert status == 0 and "is current; nothing to do" in out
    grown = retrieval.append_features(retrieval.read_features(gallery), data.features[:5], [f"/late/{i}" for i in range(5)])
    retrieval.write_features(gallery, grown)
    status, out, _ = run(rga_gallery, ["info", "--gallery", gallery], capsys)
    assert status == 0 and "1005 images x 32-d" in out and out.rstrip().endswith(": behind")
    status, out, _ = run(rga_gallery, ["index", gallery, "--quiet"], capsys)
    assert status == 0 and "added the 5 rows appended to" in out and "1005 vectors" in out

    retrieval.write_features(gallery, data)  # another version of the file
    status, _, err = run(rga_gallery, ["index", gallery], capsys)
    assert status == 2 and err == f"rga-gallery: error: index {gallery}.faiss was built for another version of " \
                                  f"{gallery}; --rebuild builds it again\n"
    status, _, err = run(rga_search, [files["query"], "--gallery", gallery, "--search", "index"], capsys)
    assert status == 2 and re.fullmatch(r"rga-search: error: index .* is stale: .*--search exact\)\n", err), err
    status, out, _ = run(rga_gallery, ["index", gallery, "--rebuild", *EXACT_INDEX], capsys)
    assert status == 0 and "wrote" in out


def test_rga_search_through_the_index_and_milvus_equals_brute_force(files, capsys, tmp_path):
    gallery, query = files["gallery"], files["query"]
    assert run(rga_gallery, ["index", gallery, *EXACT_INDEX], capsys)[0] == 0
    status, out, _ = run(rga_search, [query, "--gallery", gallery, "--search", "index", "--shortlist", 1000,
                                      "--top-k", 5, "--json", tmp_path / "index.json"], capsys)
    assert status == 0 and "search   faiss IVF4,PQ8x4fs, nprobe 4, top 1000 re-ranked exactly\n" in out
    assert found_paths(tmp_path / "index.json") == expected_paths(files, 5)
    assert json.loads((tmp_path / "index.json").read_text())["search"].startswith("faiss IVF4,PQ8x4fs")
    status, out, _ = run(rga_search, [query, "--gallery", gallery, "--top-k", 5, "--json", tmp_path / "exact.json"],
                         capsys)
    assert status == 0 and "search   exact\n" in out  # auto: a small gallery is searched exactly
    assert found_paths(tmp_path / "exact.json") == expected_paths(files, 5)

    milvus = tmp_path / "milvus.db"
    status, out, _ = run(rga_gallery, ["copy", gallery, "--milvus", milvus], capsys)
    assert status == 0 and "copied   1000 of 1000 images; " in out
    status, out, _ = run(rga_gallery, ["copy", gallery, "--milvus", milvus], capsys)
    assert status == 0 and "copied   0 of 1000 images (1000 were there); " in out
    for path in {*files["queries"].paths, *sum(expected_paths(files, 5), [])}:  # the images the picture shows
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 16), (200, 0, 0)).save(path, format="PNG")
    status, out, err = run(rga_search, [query, "--milvus", milvus, "--shortlist", 1000, "--top-k", 5, "--json",
                                        tmp_path / "milvus.json", "--picture", tmp_path / "milvus.png"], capsys)
    assert status == 0 and re.search(r"search   milvus \w+, top 1000 re-ranked exactly\n", out), err
    assert found_paths(tmp_path / "milvus.json") == expected_paths(files, 5)
    assert Image.open(tmp_path / "milvus.png").size == ranked_list_layout(6, 5, (64, 128))[1]

    # camera 1 is every third image (grid_set names them ..._c1s1_... for i % 3 == 0)
    status, out, _ = run(rga_gallery, ["delete", "--milvus", milvus, "--camera", "1"], capsys)
    assert status == 0 and out.startswith("deleted  334 crops; ")
    assert run(rga_search, [query, "--milvus", milvus, "--shortlist", 1000, "--top-k", 5, "--json",
                            tmp_path / "kept.json", "--quiet"], capsys)[0] == 0
    assert found_paths(tmp_path / "kept.json") == expected_paths(files, 5, [i for i in range(1000) if i % 3])

    for argv, message in [
        ([query, "--gallery", gallery, "--rerank", "--search", "index"],
         "--rerank needs exact search of a features file, not faiss .* search"),
        ([query, "--milvus", milvus, "--search", "index"], "a Milvus gallery is searched through Milvus' own index"),
        ([query, "--milvus", tmp_path / "none.db"], "has no gallery 'rga_gallery'"),
        ([query, "--gallery", gallery, "--milvus", milvus], "not allowed with argument"),
        ([query, "--gallery", gallery, "--nprobe", 0], "--nprobe must be positive"),
    ]:
        status, _, err = run(rga_search, argv, capsys)
        assert status == 2 and err.count("\n") == 1 and re.search(message, err), err
    status, _, err = run(rga_gallery, ["delete", "--milvus", milvus], capsys)
    assert status == 2 and "say what to delete: --camera, --day or both" in err
    status, _, err = run(rga_gallery, ["delete", "--milvus", milvus, "--day", "4.12.2026"], capsys)
    assert status == 2 and "--day" in err and "YYYY-MM-DD" in err


def test_rga_serve_serves_the_gallery_on_localhost(files, capsys, monkeypatch):
    """The program's wiring (the server's run replaced by a search through the app it would serve): the
    gallery, its root, no uploads without the model, 127.0.0.1 by default."""
    import uvicorn
    from fastapi.testclient import TestClient

    served = {}

    def record(server, sockets):
        served["address"] = sockets[0].getsockname()
        served["search"] = TestClient(server.config.app).get("/api/search?id=3").json()

    monkeypatch.setattr(uvicorn.Server, "run", record)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    status, out, _ = run(rga_serve, ["--gallery", files["gallery"], "--port", port], capsys)
    assert status == 0 and served["address"] == ("127.0.0.1", port)
    assert f"images   shown from {files['root']}" in out and f"serving  http://127.0.0.1:{port}/" in out
    assert "uploads  off: the gallery's model /m/model.keras does not exist (moved?); pass its location with --model" in out
    assert [r["path"] for r in served["search"]["results"][:3]] == [f"{p.split('/')[-1]}" for p in
                                                        np.asarray(files["data"].paths)[[3, 10, 40]]]

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        for argv, message in [
            (["--gallery", files["gallery"], "--port", busy.getsockname()[1]], "Address already in use"),
            (["--milvus", files["root"] / "m.db", "--port", port], "--root is needed with --milvus"),
            (["--gallery", files["gallery"], "--model", files["root"] / "nope.keras", "--port", port],
             "model .*nope.keras does not exist"),
            (["--gallery", files["gallery"], "--port", 0], "--port must be 1 to 65535"),
        ]:
            status, _, err = run(rga_serve, argv, capsys)
            assert status == 2 and err.count("\n") == 1 and re.search(message, err), err
