"""rga_keras.retrieval without a model: exact chunked search against brute-force NumPy rankings, its memory
bound, the image lists, the features file and the search picture."""
from __future__ import annotations

import tracemalloc

import h5py
import numpy as np
import pytest
from PIL import Image

from rga_keras import retrieval
from rga_keras.evaluation.reranking import k_reciprocal_rerank
from rga_keras.retrieval import topk as search_module
from rga_keras.visualize.plots import BLUE, GREY, plot_search_results, ranked_list_layout


def brute_force(query, gallery, k):
    """Cosine similarities in float64 and a stable sort: ties keep gallery order."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ g.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1), sims


def grid_vectors(rng, n, d=32):
    """Unit vectors with 16 entries ±0.25: every dot product is a multiple of 1/16, exact in float32 in any
    summation order, so the search must reproduce the reference exactly, ties included."""
    x = np.zeros((n, d), np.float32)
    for row in x:
        row[rng.choice(d, 16, replace=False)] = rng.choice([-0.25, 0.25], 16)
    return x


@pytest.mark.parametrize("max_block_bytes", [search_module.MAX_BLOCK_BYTES, 24 * 64 * 7])  # one chunk / 7 rows
def test_search_equals_brute_force_ranking_with_ties(max_block_bytes):
    rng = np.random.default_rng(0)
    query, gallery = grid_vectors(rng, 50), grid_vectors(rng, 64)
    gallery[10] = gallery[40] = gallery[3]  # exact ties: gallery order decides
    query[0] = gallery[3]
    order, sims, all_sims = brute_force(query, gallery, 12)
    assert (np.diff(np.sort(all_sims, axis=1), axis=1) == 0).any(axis=1).all()  # every row has ties
    indices, similarities = retrieval.search(query, gallery, 12, max_block_bytes=max_block_bytes)
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_array_equal(similarities, sims.astype(np.float32))
    assert list(indices[0, :3]) == [3, 10, 40] and similarities.dtype == np.float32


def test_search_of_random_features_matches_float64_reference():
    rng = np.random.default_rng(1)
    query = rng.standard_normal((37, 48)).astype(np.float32) * 3  # not normalised: search normalises
    gallery = rng.standard_normal((500, 48)).astype(np.float32) * rng.uniform(0.5, 2, (500, 1)).astype(np.float32)
    order, sims, all_sims = brute_force(query, gallery, 25)
    indices, similarities = retrieval.search(query, gallery, 25, max_block_bytes=24 * 500 * 5)
    np.testing.assert_allclose(similarities, sims, atol=1e-5)
    # the same ranking up to float32 rounding: each returned item is as similar as the reference's at that rank
    np.testing.assert_allclose(np.take_along_axis(all_sims, indices, axis=1), sims, atol=1e-5)
    assert (indices == order).mean() > 0.99


def test_top_k_larger_than_gallery_and_bad_inputs():
    rng = np.random.default_rng(2)
    query, gallery = rng.standard_normal((3, 8)), rng.standard_normal((5, 8))
    indices, similarities = retrieval.search(query, gallery, 100)
    assert indices.shape == similarities.shape == (3, 5)
    np.testing.assert_array_equal(indices, brute_force(query, gallery, 5)[0])
    with pytest.raises(ValueError, match="dimensions differ: 8 vs 9"):
        retrieval.search(query, rng.standard_normal((5, 9)))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        retrieval.search(query, gallery, 0)
    with pytest.raises(ValueError, match="non-empty"):
        retrieval.search(np.zeros((0, 8)), gallery)


def test_chunks_keep_the_similarity_block_within_the_budget():
    """tracemalloc sees every NumPy allocation: the whole call stays within the budget (plus its small
    inputs' copies and outputs), where the full 400 x 8,000 matrix alone would be 3.3 times the budget."""
    rng = np.random.default_rng(3)
    query = retrieval.unit_rows(rng.standard_normal((400, 16)))
    gallery = retrieval.unit_rows(rng.standard_normal((8000, 16)))
    budget = 2**20
    tracemalloc.start()
    indices, _ = retrieval.search(query, gallery, 10, max_block_bytes=budget)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert query.shape[0] * gallery.shape[0] * 4 > 3 * budget
    assert peak < budget + 200_000, peak
    np.testing.assert_array_equal(indices, brute_force(query, gallery, 10)[0])


def test_rerank_orders_by_the_reranked_distance_and_reports_cosine(monkeypatch):
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((6, 16))
    query = retrieval.unit_rows(centres[rng.integers(0, 6, 8)] + 0.5 * rng.standard_normal((8, 16)))
    gallery = retrieval.unit_rows(centres[rng.integers(0, 6, 40)] + 0.5 * rng.standard_normal((40, 16)))
    order = np.argsort(k_reciprocal_rerank(query, gallery, metric="cosine"), axis=1, kind="stable")[:, :7]
    indices, similarities = retrieval.search(query, gallery, 7, rerank=True)
    np.testing.assert_array_equal(indices, order)
    all_sims = brute_force(query, gallery, 40)[2]
    np.testing.assert_allclose(similarities, np.take_along_axis(all_sims, order, axis=1), atol=1e-6)
    assert (indices != brute_force(query, gallery, 7)[0]).any()  # re-ranking changed something
    monkeypatch.setattr(search_module, "RERANK_MAX_ENTRIES", 8 * 40 - 1)
    with pytest.raises(ValueError, match="re-ranking holds the dense 8 x 40 distance matrix"):
        retrieval.search(query, gallery, 7, rerank=True)


# --------------------------------------------------------------------------- image lists


def test_list_images_from_folders_lists_and_files(tmp_path):
    for name in ("b/2.png", "b/sub/1.JPG", "a.jpeg", "notes.md", "b/sub/x.bmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# queries\na.jpeg\n\nb/2.png\n")
    (tmp_path / "list.csv").write_text("path,person_id\nb/sub/x.bmp,3\nelsewhere/y.png,4\n")
    found = retrieval.list_images([tmp_path / "b", tmp_path / "list.txt", tmp_path / "list.csv",
                                   tmp_path / "notes.md"])
    names = [str(p)[len(str(tmp_path)) + 1:] for p in found]
    assert names == ["b/2.png", "b/sub/1.JPG", "b/sub/x.bmp", "a.jpeg", "elsewhere/y.png", "notes.md"]
    assert all(p.startswith("/") for p in found)
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        retrieval.list_images([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        retrieval.list_images([tmp_path / "empty"])


# --------------------------------------------------------------------------- features file


def feature_set(rng, n=5, d=8, **source):
    source = {"model": "/m/model.keras", "model_sha256": "ab" * 32, "model_format": "keras",
              "feature": "after_bn", "input_size": [64, 32], "flip": False, **source}
    return retrieval.FeatureSet(retrieval.unit_rows(rng.standard_normal((n, d))), [f"/img/{i}.png" for i in range(n)],
                                source)


def test_features_file_round_trip_and_append(tmp_path):
    rng = np.random.default_rng(5)
    data = feature_set(rng, feature=None, flip=True)
    path = retrieval.write_features(tmp_path / "g.h5", data)
    back = retrieval.read_features(path)
    np.testing.assert_array_equal(back.features, data.features)
    assert back.paths == data.paths and back.source == data.source
    with h5py.File(path, "r") as file:  # the documented layout
        assert file.attrs["format"] == "rga-keras features" and file["features"].shape == (5, 8)
        assert file.attrs["feature"] == "" and list(file.attrs["input_size"]) == [64, 32]
    more = feature_set(rng, n=2)
    grown = retrieval.append_features(back, more.features, ["/img/new0.png", "/img/new1.png"])
    np.testing.assert_array_equal(grown.features, np.concatenate([data.features, more.features]))
    assert grown.paths[-2:] == ["/img/new0.png", "/img/new1.png"] and grown.source == data.source
    with pytest.raises(ValueError, match="new features are \\(4,\\)-d, the file's are 8-d"):
        retrieval.append_features(back, np.zeros((2, 4)), ["a", "b"])


def test_sources_that_cannot_be_compared_are_refused():
    rng = np.random.default_rng(6)
    reference = feature_set(rng).source
    retrieval.check_same_source(reference, {**reference, "model": "/moved/model.keras"}, "x")  # same file, moved
    for change, message in [({"model_sha256": "cd" * 32}, "comes from model /m/model.keras \\(sha256 cdcdcdcdcdcd\\)"),
                            ({"feature": "before_bn"}, "feature before_bn, but the gallery from feature after_bn"),
                            ({"flip": True}, "flip True"), ({"input_size": [256, 128]}, "input_size")]:
        with pytest.raises(ValueError, match=message):
            retrieval.check_same_source(reference, {**reference, **change}, "query file q.h5")


def test_files_that_are_not_features_files(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not a features file .*not HDF5"):
        retrieval.read_features(tmp_path / "x.png")
    with h5py.File(tmp_path / "other.h5", "w") as file:
        file["features"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match="HDF5 file but not an rga-embed features file"):
        retrieval.read_features(tmp_path / "other.h5")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        retrieval.read_features(tmp_path / "missing.h5")
    assert retrieval.is_features_candidate(tmp_path / "other.h5") and not retrieval.is_features_candidate(
        tmp_path / "x.png")


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    old = feature_set(rng)
    path = retrieval.write_features(tmp_path / "g.h5", old)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(h5py.File, "create_dataset", fail)
    with pytest.raises(KeyboardInterrupt):
        retrieval.write_features(path, feature_set(rng, n=9))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["g.h5"]  # no temporary left
    np.testing.assert_array_equal(retrieval.read_features(path).features, old.features)


# --------------------------------------------------------------------------- picture


def test_search_picture_frames_and_size(tmp_path):
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (10 + i, 20), (i * 40, 0, 0)).save(paths[-1])
    indices = np.array([[5, 4, 3], [0, 1, 2]])
    out = plot_search_results(paths[:2], paths, indices, np.full((2, 3), 0.5), tmp_path / "p.png",
                              cell_size=(16, 24))
    corner, size = ranked_list_layout(2, 3, (16, 24))
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (size[1], size[0], 3)
    for row in range(2):
        for column in range(4):
            x, y = corner(row, column)
            assert tuple(image[y + 1, x + 1]) == (BLUE if column == 0 else GREY)
    x, y = corner(0, 1)  # rank 1 of query 0 is gallery image 5, drawn inside the frame
    assert tuple(image[y + 12, x + 10]) == (200, 0, 0)
    with pytest.raises(ValueError, match="must both be \\(num_query, k\\)"):
        plot_search_results(paths[:2], paths, indices, np.zeros((2, 2)), tmp_path / "q.png")


# --------------------------------------------------------------------------- the programs' arguments


def test_program_help_and_argument_errors(capsys):
    from rga_keras.cli import embed as rga_embed
    from rga_keras.cli import search as rga_search

    for program in (rga_embed, rga_search):
        with pytest.raises(SystemExit) as exit_:
            program.main(["--help"])
        assert exit_.value.code == 0 and "examples:" in capsys.readouterr().out
    for program, argv, message in [
        (rga_embed, ["m.keras", "x", "--out", "o.h5", "--append", "--overwrite"], "--append and --overwrite exclude"),
        (rga_embed, ["m.keras", "x", "--out", "o.h5", "--batch-size", "0"], "--batch-size must be positive"),
        (rga_search, ["q.png", "--gallery", "g.h5", "--top-k", "0"], "--top-k must be positive"),
        (rga_search, ["q.png"], "one of the arguments --gallery --milvus is required"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            program.main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
