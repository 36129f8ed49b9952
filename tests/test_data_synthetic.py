"""Synthetic re-id dataset: Market-1501 layout read unchanged, splits, determinism, reuse, atomicity, CLI."""
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from rga_keras.cli import synth
from rga_keras.data import load_dataset, synthetic
from rga_keras.files import current_umask

SMALL = {"num_ids": 6, "images_per_id": 6, "num_cameras": 3, "image_size": (64, 32)}
NAME = re.compile(r"^(\d{4})_c(\d)s(\d)_(\d{6})_01\.jpg$")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth") / "market", **SMALL)


def files(root, folder):
    return sorted(p.name for p in (root / folder).iterdir())


def test_market_layout_read_unchanged_without_warning(small):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the official-count check must not warn for synthetic data
        ds = load_dataset("market1501", small)
    assert "synthetic" in ds.summary()
    names = {folder: files(small, folder) for folder in ("bounding_box_train", "bounding_box_test", "query")}
    assert all(NAME.match(n) for names_ in names.values() for n in names_)
    parsed = {f: [tuple(int(g) for g in NAME.match(n).groups()[:2]) for n in ns] for f, ns in names.items()}
    train_ids = {p for p, _ in parsed["bounding_box_train"]}
    test_ids = {p for p, _ in parsed["bounding_box_test"]}
    assert len(train_ids) == len(test_ids) == 3 and not train_ids & test_ids  # half train, half test
    assert train_ids | test_ids == set(range(1, 7))
    assert len(names["bounding_box_train"]) == 3 * 6
    assert len(names["query"]) + len(names["bounding_box_test"]) == 3 * 6
    # one query per identity per camera it appears in, and each query has a gallery match in another camera
    assert len(parsed["query"]) == len(set(parsed["query"]))
    assert set(parsed["query"]) == set(parsed["bounding_box_test"])
    for pid, cam in parsed["query"]:
        assert any(p == pid and c != cam for p, c in parsed["bounding_box_test"])
    assert ds.num_train_ids == 3 and len(ds.query) == len(parsed["query"])
    image = Image.open(small / "query" / names["query"][0])
    assert image.size == (32, 64) and image.mode == "RGB"


def test_deterministic_per_seed(small, tmp_path):
    again = synthetic.generate(tmp_path / "again", **SMALL)
    other = synthetic.generate(tmp_path / "other", **SMALL, seed=1)
    for folder in ("bounding_box_train", "query"):
        assert files(again, folder) == files(small, folder)
        name = files(small, folder)[0]
        assert (again / folder / name).read_bytes() == (small / folder / name).read_bytes()
    assert files(other, "query") != files(small, "query")


def rank1(query, gallery, qids, qcams, gids, gcams):
    """Rank-1 accuracy, cosine similarity, same identity in the same camera excluded (Market rule)."""
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    hits = []
    for feature, pid, cam in zip(query, qids, qcams):
        keep = ~((gids == pid) & (gcams == cam))
        hits.append(gids[keep][np.argmax(gallery[keep] @ feature)] == pid)
    return np.mean(hits)


def test_retrieval_is_learnable_but_not_trivial(tmp_path):
    """Identity shows in clothing colours (a colour histogram of the image centre retrieves far above
    chance, 1 in 10), while whole-image pixels match scenes, not people (near or below chance)."""
    root = synthetic.generate(tmp_path / "m", num_ids=20, images_per_id=8, num_cameras=4, image_size=(64, 32))
    ds = load_dataset("market1501", root)

    def histogram(path):
        pixels = np.asarray(Image.open(path), np.int64)[16:56, 8:24] // 64
        return np.bincount((pixels[..., 0] * 16 + pixels[..., 1] * 4 + pixels[..., 2]).ravel(), minlength=64)

    def raw(path):
        return np.asarray(Image.open(path), np.float32).ravel() - 128

    def meta(samples):
        return np.array([s.person_id for s in samples]), np.array([s.camera_id for s in samples])

    (qids, qcams), (gids, gcams) = meta(ds.query), meta(ds.gallery)
    scores = {}
    for name, feature in (("histogram", histogram), ("raw", raw)):
        query = np.stack([feature(s.path) for s in ds.query]).astype(np.float64)
        gallery = np.stack([feature(s.path) for s in ds.gallery]).astype(np.float64)
        scores[name] = rank1(query, gallery, qids, qcams, gids, gcams)
    assert scores["histogram"] >= 0.25 and scores["raw"] <= 0.15, scores


def test_ensure_synthetic_generates_once_under_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RGA_KERAS_CACHE", str(tmp_path / "cache"))
    assert synthetic.default_synthetic_root() == tmp_path / "cache" / "synthetic"
    root = synthetic.ensure_synthetic(**SMALL)
    assert root.parent == tmp_path / "cache" / "synthetic"
    monkeypatch.setattr(synthetic, "_render_dataset", lambda *a, **k: pytest.fail("regenerated"))
    assert synthetic.ensure_synthetic(**SMALL) == root
    explicit = tmp_path / "mine"
    monkeypatch.undo()
    assert synthetic.ensure_synthetic(explicit, **SMALL) == explicit
    assert explicit.stat().st_mode & 0o777 == 0o777 & ~current_umask()  # readable by others, as any new folder
    first = files(explicit, "query")
    synthetic.ensure_synthetic(explicit, **{**SMALL, "seed": 3})  # other arguments: regenerated in place
    assert files(explicit, "query") != first
    with pytest.raises(TypeError, match="unexpected argument"):
        synthetic.ensure_synthetic(explicit, ids=3)
    users = tmp_path / "users_data"  # e.g. --dataset synthetic --data-root pointing at real data by mistake
    (users / "bounding_box_train").mkdir(parents=True)
    (users / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="was not created by rga_keras"):
        synthetic.ensure_synthetic(users, **SMALL)
    assert (users / "notes.txt").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == [
        "cache", "mine", "users_data"]  # nothing replaced, no temporary folder left


def test_generation_is_atomic(tmp_path, monkeypatch):
    def broken(out, **kwargs):
        (out / "query").mkdir()
        (out / "query" / "0001_c1s1_000001_01.jpg").write_bytes(b"")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(synthetic, "_render_dataset", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        synthetic.generate(tmp_path / "out", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one is left


def test_bad_arguments(tmp_path, small):
    for bad, message in (({"num_ids": 1}, "num_ids"), ({"images_per_id": 3}, "images_per_id"),
                         ({"num_cameras": 1}, "num_cameras"), ({"image_size": (16, 8)}, "image_size")):
        with pytest.raises(ValueError, match=message):
            synthetic.generate(tmp_path / "x", **{**SMALL, **bad})
    with pytest.raises(FileExistsError, match="not empty"):
        synthetic.generate(small, **SMALL)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert synth.main([str(out), "--ids", "4", "--images-per-id", "4", "--cameras", "2",
                           "--size", "64", "32", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "train 2 ids/8 images" in printed
    assert synth.main([str(out), "--ids", "4"]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert synth.main([str(out), "--ids", "4", "--images-per-id", "4", "--size", "64", "32", "--force"]) == 0
    with pytest.raises(SystemExit) as exit_:
        synth.main(["--help"])
    assert exit_.value.code == 0 and "Market-1501" in capsys.readouterr().out
