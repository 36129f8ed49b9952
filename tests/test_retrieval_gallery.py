"""The three galleries behind one interface (issue 23): a features file searched exactly, through its faiss
index, and a Milvus collection (milvus-lite in the test's folder) — each against a brute-force NumPy ranking,
ties included; the index tied to its features file (stale refused, appends added without a rebuild); Milvus'
model check and deletes by camera and day."""
from __future__ import annotations

import datetime
import os

import numpy as np
import pymilvus  # noqa: F401 (imported while collecting: its log handler keeps pytest's stderr, not a test's capsys)
import pytest

from rga_keras import retrieval
from rga_keras.retrieval import index as index_module
from rga_keras.retrieval.crops import UNKNOWN_TIME, name_labels
from rga_keras.retrieval.gallery import rerank_shortlist
from tests.test_retrieval_search import brute_force, feature_set, grid_vectors

@pytest.fixture(autouse=True)
def one_faiss_thread():
    """Tiny indexes gain nothing from threads, and OpenMP's spin against pytest-xdist's other worker on two cores
    (this file: 5 s on one thread, 11-28 s on two, on the loaded development machine)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


SMALL = dict(factory="IVF4,PQ8x4fs", nprobe=4, shortlist=2000, train_rows=700, verbose=0)  # visits every list


def grid_set(rng, n, **source):
    """A FeatureSet of grid vectors (exact dot products: rankings are exact in any summation order) with
    deliberate ties: rows 10 and 40 equal row 3."""
    data = feature_set(rng, n=n, d=32, **source)
    vectors = grid_vectors(rng, n)
    vectors[10] = vectors[40] = vectors[3]
    return retrieval.FeatureSet(vectors, [f"/crops/{i:04d}_c{i % 3 + 1}s1_{i:06d}_01.jpg" for i in range(n)],
                                data.source)


def assert_exact(hits, query, gallery_vectors, k, ids=None):
    """``hits`` equal the brute-force ranking (ids and similarities, ties in id order); ``ids`` maps gallery
    rows to the gallery's ids where they are not the row numbers."""
    order, sims, _ = brute_force(query, gallery_vectors, k)
    expected = order if ids is None else np.asarray(ids)[order]
    np.testing.assert_array_equal(hits.ids, expected)
    np.testing.assert_array_equal(hits.similarities, sims.astype(np.float32))


@pytest.fixture()
def gallery_file(tmp_path):
    rng = np.random.default_rng(0)
    data = grid_set(rng, 1000)
    query = grid_vectors(rng, 40)
    query[0] = data.features[3]  # ties at the top: rows 3, 10, 40
    return retrieval.write_features(tmp_path / "gallery.h5", data), data, query


def test_features_files_read_in_parts(gallery_file, tmp_path):
    """A features file's rows by id (pread), by range and in chunks; a compressed one (not memory-mappable)
    is read into memory and gives the same."""
    import h5py

    path, data, _ = gallery_file
    compressed = tmp_path / "compressed.h5"
    with h5py.File(path, "r") as source, h5py.File(compressed, "w") as out:
        out.create_dataset("features", data=source["features"][()], compression="gzip")
        out.create_dataset("paths", data=source["paths"][()])
        out.attrs.update(source.attrs)
    for name in (path, compressed):
        with retrieval.open_features(name) as file:
            assert isinstance(file.features, np.memmap) == (name == path)
            np.testing.assert_array_equal(file.take([7, 2, 7, 999]), data.features[[7, 2, 7, 999]])
            np.testing.assert_array_equal(file.rows(990, 1000), data.features[990:])
            assert file.paths_at([3, 1, 3]) == [data.paths[3], data.paths[1], data.paths[3]]
            chunks = list(file.chunks(400))
            assert [len(c[0]) for c in chunks] == [400, 400, 200] and sum((c[1] for c in chunks), []) == data.paths


def test_features_file_gallery_is_exact_and_memory_mapped(gallery_file):
    path, data, query = gallery_file
    with retrieval.FileGallery(path) as gallery:
        assert isinstance(gallery.features, np.memmap) and gallery.method == "exact"
        assert (len(gallery), gallery.dim) == (1000, 32) and gallery.source == data.source
        hits = gallery.search(query, 12)
        assert_exact(hits, query, data.features, 12)
        assert list(hits.ids[0, :3]) == [3, 10, 40]
        np.testing.assert_array_equal(gallery.vectors([7, 2, 7]), data.features[[7, 2, 7]])
        assert gallery.known_paths([data.paths[7], "/new/x.jpg"]) == {data.paths[7]}
        crops = gallery.crops([5, 1])
        assert [c.path for c in crops] == [data.paths[5], data.paths[1]]
        assert (crops[0].identity, crops[0].camera, crops[0].time) == ("0005", "3", UNKNOWN_TIME)
        assert gallery.ids(998, 5) == [998, 999]
        with pytest.raises(KeyError, match="no gallery image 1000 \\(ids are 0 to 999\\)"):
            gallery.vectors([1000])
        with pytest.raises(ValueError, match="dimensions differ: 8 vs 32"):
            gallery.search(np.ones((1, 8)))


@pytest.mark.parametrize("factory", ["IVF4,PQ8x4fs", "PCA16,IVF4,SQ8"])
def test_index_search_equals_exact_search_with_ties(gallery_file, factory, monkeypatch):
    path, data, query = gallery_file
    monkeypatch.setattr(index_module, "ADD_ROWS", 300)  # filled in four chunks
    written = retrieval.build_index(path, **{**SMALL, "factory": factory})
    assert written == retrieval.index_path(path) == path.with_name("gallery.h5.faiss")
    with retrieval.IndexedGallery(path) as gallery:
        assert gallery.method == f"faiss {factory}, nprobe 4, top 2000 re-ranked exactly"
        assert gallery.index.ntotal == 1000
        assert_exact(gallery.search(query, 12), query, data.features, 12)
        assert_exact(gallery.search(query, 2000), query, data.features, 1000)  # top_k past the gallery


def test_a_short_shortlist_still_returns_exact_similarities(gallery_file):
    """With 4 of 16 lists visited the shortlist misses some neighbours, but what is returned is ranked by the
    exact similarities of the stored vectors."""
    path, data, query = gallery_file
    retrieval.build_index(path, **{**SMALL, "factory": "IVF16,PQ8x4fs", "nprobe": None, "shortlist": 30})
    with retrieval.IndexedGallery(path) as gallery:
        assert gallery.nprobe == 4  # by default a quarter of the lists
        hits = gallery.search(query, 10)
    _, _, all_sims = brute_force(query, data.features, 10)
    found = hits.ids >= 0
    np.testing.assert_array_equal(hits.similarities[found],
                                  np.take_along_axis(all_sims, np.maximum(hits.ids, 0), 1)[found].astype(np.float32))
    assert (np.diff(hits.similarities, axis=1) <= 0).all()


def test_rerank_shortlist_pads_and_breaks_ties_by_id():
    query = np.array([[1.0, 0.0]], np.float32)
    vectors = {5: [1.0, 0.0], 2: [1.0, 0.0], 9: [0.0, 1.0]}
    hits = rerank_shortlist(query, np.array([[9, 5, -1, 2]]), lambda ids: np.array([vectors[i] for i in ids]), 5)
    np.testing.assert_array_equal(hits.ids, [[2, 5, 9, -1, -1]])
    np.testing.assert_array_equal(hits.similarities, np.array([[1, 1, 0, -np.inf, -np.inf]], np.float32))


def test_a_stale_index_is_refused(gallery_file, tmp_path):
    path, data, query = gallery_file
    retrieval.build_index(path, **SMALL)
    changed = data.features.copy()
    changed[[0, -1]] = changed[[-1, 0]]  # same rows, count and paths; two vectors swapped
    retrieval.write_features(path, retrieval.FeatureSet(changed, data.paths, data.source))
    assert retrieval.index_status(path) == "stale"
    with pytest.raises(ValueError, match="index .*gallery.h5.faiss is stale: it was built for another version of "
                                         "gallery.h5 \\(1000 rows then, 1000 now\\); rebuild it"):
        retrieval.IndexedGallery(path)
    retrieval.write_features(path, retrieval.FeatureSet(data.features[:999], data.paths[:999], data.source))
    with pytest.raises(ValueError, match="stale: .*\\(1000 rows then, 999 now\\)"):
        retrieval.IndexedGallery(path)
    with pytest.raises(ValueError, match="stale"):
        retrieval.update_index(path)
    (tmp_path / "gallery.h5.faiss").write_bytes(b"not an index\n")
    with pytest.raises(ValueError, match="is not an rga-keras faiss index"):
        retrieval.IndexedGallery(path)
    os.remove(tmp_path / "gallery.h5.faiss")
    assert retrieval.index_status(path) == "none"
    with pytest.raises(FileNotFoundError, match="has no index \\(gallery.h5.faiss beside it\\)"):
        retrieval.IndexedGallery(path)


def test_appending_adds_to_the_index_without_rebuilding(gallery_file):
    path, data, query = gallery_file
    retrieval.build_index(path, **SMALL)
    trained = _quantisers(path)
    more = grid_set(np.random.default_rng(1), 300)
    more = retrieval.FeatureSet(more.features, [p.replace("/crops/", "/more/") for p in more.paths], data.source)
    with retrieval.IndexedGallery(path) as gallery:
        gallery.append(more)
        assert len(gallery) == gallery.index.ntotal == 1300 and gallery.header["rows"] == 1300
        everything = np.concatenate([data.features, more.features])
        assert_exact(gallery.search(query, 12), query, everything, 12)
        with pytest.raises(ValueError, match="data to append comes from model .* \\(sha256 cdcdcdcdcdcd\\), but .*gallery.h5 from"):
            gallery.append(retrieval.FeatureSet(more.features, more.paths, {**data.source, "model_sha256": "cd" * 32}))
    for before, after in zip(trained, _quantisers(path)):  # added to, not retrained
        np.testing.assert_array_equal(before, after)

    # rows appended by a writer that did not update the index: refused until update_index adds them
    retrieval.write_features(path, retrieval.append_features(retrieval.read_features(path), data.features[:5],
                                                             [f"/late/{i}.jpg" for i in range(5)]))
    assert retrieval.index_status(path) == "behind"
    with pytest.raises(ValueError, match="covers 1300 of the 1305 rows of gallery.h5 .*rga-gallery index"):
        retrieval.IndexedGallery(path)
    assert retrieval.update_index(path, verbose=0) == 5 and retrieval.update_index(path, verbose=0) == 0
    with retrieval.IndexedGallery(path) as gallery:
        assert_exact(gallery.search(query, 12), query, np.concatenate([everything, data.features[:5]]), 12)


def test_an_interrupted_index_write_keeps_the_old_index(gallery_file, monkeypatch):
    import faiss

    path, _, _ = gallery_file
    retrieval.build_index(path, **SMALL)
    before = retrieval.index_path(path).read_bytes()

    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(faiss, "write_index", fail)
    with pytest.raises(KeyboardInterrupt):
        retrieval.build_index(path, **{**SMALL, "factory": "IVF8,PQ8x4fs"})
    assert retrieval.index_path(path).read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["gallery.h5", "gallery.h5.faiss"]


def test_bad_index_settings(gallery_file):
    path, _, _ = gallery_file
    with pytest.raises(ValueError, match="faiss cannot make index 'IVF4,Nonsense' for 32-d vectors"):
        retrieval.build_index(path, **{**SMALL, "factory": "IVF4,Nonsense"})
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        retrieval.build_index(path, **{**SMALL, "nprobe": 0})
    assert retrieval.index_status(path) == "none"
    assert index_module.default_factory(100_000, 2048) == "PCA256,IVF256,PQ128x4fs"
    assert index_module.default_factory(10**6, 128) == "IVF1024,PQ64x4fs"
    assert index_module.default_factory(999, 2048) == "Flat"
    assert index_module.default_factory(1000, 32) == "IVF16,PQ16x4fs"  # 39 training rows per list at least
    assert index_module.default_factory(10**8, 2048) == "PCA256,IVF1024,PQ128x4fs"  # as many as 40,000 rows train


def test_open_gallery_picks_the_search(gallery_file, monkeypatch):
    path, _, _ = gallery_file
    with retrieval.open_gallery(path) as gallery:
        assert type(gallery) is retrieval.FileGallery
    retrieval.build_index(path, verbose=0)  # the defaults for 1,000 rows
    with retrieval.open_gallery(path) as gallery:  # an index, but a small gallery: exact
        assert type(gallery) is retrieval.FileGallery
    with retrieval.open_gallery(path, search="index") as gallery:
        assert gallery.method == "faiss IVF16,PQ16x4fs, nprobe 4, top 200 re-ranked exactly"
    with retrieval.open_gallery(path, search="index", nprobe=2) as gallery:
        assert type(gallery) is retrieval.IndexedGallery and gallery.nprobe == 2
    monkeypatch.setattr("rga_keras.retrieval.galleries.INDEX_MIN_ROWS", 1000)
    with retrieval.open_gallery(path) as gallery:
        assert type(gallery) is retrieval.IndexedGallery
    with pytest.raises(ValueError, match="name one gallery"):
        retrieval.open_gallery()
    with pytest.raises(ValueError, match="search must be one of"):
        retrieval.open_gallery(path, search="fast")


# --------------------------------------------------------------------------- Milvus (milvus-lite)


def test_milvus_gallery_equals_exact_search_and_keeps_the_metadata(tmp_path):
    rng = np.random.default_rng(2)
    data = grid_set(rng, 300)
    data.paths[1] = '/crops/caf\u00e9 "1" \\ x.jpg'  # quotes, a backslash and UTF-8 in filter expressions
    query = grid_vectors(rng, 20)
    query[0] = data.features[3]
    uri = str(tmp_path / "milvus.db")
    with pytest.raises(FileNotFoundError, match="has no gallery 'people' \\(rga-embed --milvus makes one\\)"):
        retrieval.MilvusGallery(uri, "people")
    crops = [retrieval.Crop(p, camera=str(i % 3), identity=str(i // 4), time=1_764_806_400 + 3600 * i)
             for i, p in enumerate(data.paths)]
    with retrieval.MilvusGallery(uri, "people", create_for=(data.source, 32), shortlist=300) as gallery:
        ids = gallery.append(retrieval.FeatureSet(data.features[:200], data.paths[:200], data.source), crops[:200])
        ids += gallery.append(retrieval.FeatureSet(data.features[200:], data.paths[200:], data.source), crops[200:])
        assert ids == sorted(ids) and len(set(ids)) == 300  # ids grow with insertion: ties in insertion order
        assert gallery.method.startswith("milvus ") and gallery.method.endswith("top 300 re-ranked exactly")
    with retrieval.open_gallery(milvus=uri, collection="people", nprobe=8) as gallery:
        assert gallery.method.endswith(", nprobe 8, top 50 re-ranked exactly")
    with retrieval.open_gallery(milvus=uri, collection="people", shortlist=300) as gallery:  # reopened
        assert (len(gallery), gallery.dim, gallery.source) == (300, 32, data.source)
        hits = gallery.search(query, 12)
        assert_exact(hits, query, data.features, 12, ids=ids)
        assert list(hits.ids[0, :3]) == [ids[3], ids[10], ids[40]]
        np.testing.assert_array_equal(gallery.vectors([ids[7], ids[2]]), data.features[[7, 2]])
        assert gallery.crops([ids[5]]) == [crops[5]] and gallery.ids(0, 3) == ids[:3]
        assert gallery.known_paths([data.paths[1], "/new/x.jpg", data.paths[299]]) == {data.paths[1], data.paths[299]}
        with pytest.raises(KeyError, match="no gallery image -5"):
            gallery.crops([-5])

        with pytest.raises(ValueError, match="data to append comes from flip True, but Milvus collection people at .* from flip False"):
            gallery.append(retrieval.FeatureSet(data.features[:2], data.paths[:2], {**data.source, "flip": True}))
        with pytest.raises(ValueError, match="data to append is 16-d, Milvus collection people at .* is 32-d"):
            gallery.append(retrieval.FeatureSet(data.features[:2, :16], data.paths[:2], data.source))

        # camera "1" is every third crop; 2025-12-04 (UTC) holds crops 0-23 (one an hour from midnight)
        assert gallery.delete(camera="1") == 100
        assert gallery.delete(day=datetime.date(2025, 12, 4)) == 16
        assert gallery.delete(camera="2", day=datetime.date(2025, 12, 5)) == 8
        kept = [i for i, c in enumerate(crops) if c.camera != "1" and c.time >= 1_764_892_800
                and not (c.camera == "2" and c.time < 1_764_979_200)]
        assert len(gallery) == len(kept) == 176
        assert_exact(gallery.search(query, 12), query, data.features[kept], 12, ids=np.asarray(ids)[kept])
        with pytest.raises(ValueError, match="say what to delete"):
            gallery.delete()


def test_crop_names_and_times(tmp_path):
    assert name_labels("/x/0002_c1s1_000451_03.jpg") == ("0002", "1")
    assert name_labels("-1_c3_f0001.jpg") == ("-1", "3")
    assert name_labels("0000_000_01_0303morning_0015_0.jpg") == ("0000", "01")
    assert name_labels("/cam7/person.jpg") == ("", "")
    (tmp_path / "a.jpg").write_bytes(b"x")
    os.utime(tmp_path / "a.jpg", (1_700_000_000, 1_700_000_000))
    found = retrieval.crops_of([str(tmp_path / "a.jpg"), str(tmp_path / "gone.jpg")], stat=True)
    assert [c.time for c in found] == [1_700_000_000, UNKNOWN_TIME]


def _quantisers(path):
    """The trained parts of a saved index: coarse centroids and PQ codebooks."""
    import faiss

    with open(retrieval.index_path(path), "rb") as handle:
        handle.readline(), handle.readline()
        index = faiss.read_index(faiss.PyCallbackIOReader(handle.read))
    inverted = faiss.downcast_index(faiss.extract_index_ivf(index))
    return inverted.quantizer.reconstruct_n(0, inverted.nlist), faiss.vector_to_array(inverted.pq.centroids)
