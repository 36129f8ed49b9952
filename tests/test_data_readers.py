"""Dataset readers on small trees written here in each release layout, and every bad-input error."""
import dataclasses
import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from rga_keras.data import DatasetWarning, Sample, load_dataset, readers
from tests.bad_images import write_images


def touch(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")  # readers only look at names


def market_tree(root):
    """A Market-style tree; returns the expected (pid, camera) per split, junk excluded."""
    train = [(2, 1), (2, 3), (7, 2), (9, 6), (9, 6), (9, 1)]
    query = [(4, 1), (5, 2)]
    gallery = [(4, 2), (5, 5), (0, 3), (0, 1)]  # identity 0: distractors, kept
    for folder, items in (("bounding_box_train", train), ("query", query), ("bounding_box_test", gallery)):
        touch(root / folder, [f"{p:04d}_c{c}s1_{i:06d}_01.jpg" for i, (p, c) in enumerate(items)])
    touch(root / "bounding_box_test", ["-1_c1s1_000001_00.jpg", "-1_c3s2_000002_00.jpg"])  # junk
    touch(root / "bounding_box_test", ["Thumbs.db"])  # not an image: ignored silently
    return {"train": train, "query": query, "gallery": gallery}


def as_pairs(samples):
    return sorted((s.person_id, s.camera_id) for s in samples)


def test_market_counts_relabel_junk_and_warning(tmp_path):
    expected = market_tree(tmp_path)
    with pytest.warns(DatasetWarning, match="not the official release"):
        ds = load_dataset("market1501", tmp_path)
    relabel = {pid: i for i, pid in enumerate(sorted({p for p, _ in expected["train"]}))}
    assert as_pairs(ds.train) == sorted((relabel[p], c) for p, c in expected["train"])
    assert as_pairs(ds.query) == sorted(expected["query"])
    assert as_pairs(ds.gallery) == sorted(expected["gallery"])
    assert ds.num_train_ids == 3 and {s.person_id for s in ds.train} == {0, 1, 2}
    assert all(isinstance(s, Sample) and s.path.endswith(".jpg") for s in ds.train + ds.query + ds.gallery)
    assert "dropped 2 junk images" in ds.summary()
    assert ds.summary().count("\n") == 0
    assert "train 3 ids/6 images" in ds.summary() and "gallery 3 ids/4 images" in ds.summary()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"


def test_market_found_one_level_down_and_official_counts_accepted(tmp_path, monkeypatch):
    market_tree(tmp_path / "Market-1501-v15.09.15")
    monkeypatch.setitem(readers.OFFICIAL_COUNTS, "market1501",
                        {"train": (3, 6), "query": (2, 2), "gallery": (3, 4)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset("Market1501", tmp_path)
    assert "counts match the official release" in ds.summary()
    assert ds.train[0].path.startswith(str(tmp_path / "Market-1501-v15.09.15"))


def test_dukemtmc_names(tmp_path):
    touch(tmp_path / "bounding_box_train", ["0001_c2_f0046182.jpg", "0001_c5_f0000001.jpg", "0003_c8_f0000002.jpg"])
    touch(tmp_path / "query", ["0005_c1_f0000003.jpg"])
    touch(tmp_path / "bounding_box_test", ["0005_c4_f0000004.jpg", "0010_c7_f0000005.jpg"])
    with pytest.warns(DatasetWarning):
        ds = load_dataset("dukemtmc", tmp_path)
    assert as_pairs(ds.train) == [(0, 2), (0, 5), (1, 8)]
    assert as_pairs(ds.gallery) == [(5, 4), (10, 7)]


def test_unparsable_names_skipped_or_strict(tmp_path):
    market_tree(tmp_path)
    touch(tmp_path / "query", ["holiday.jpg", "x_c1.png"])
    with pytest.warns(DatasetWarning) as caught:
        ds = load_dataset("market1501", tmp_path)
    assert any("skipped 2 files or lines" in str(w.message) for w in caught)
    assert len(ds.query) == 2 and "skipped 2 unusable entries, the first: " in ds.summary()
    with pytest.raises(ValueError, match="holiday.jpg"):
        load_dataset("market1501", tmp_path, strict=True)


def test_market_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("market1501", tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="bounding_box_train/, query/ and bounding_box_test/.*found: images"):
        load_dataset("market1501", tmp_path)
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp_path / sub).mkdir()
    touch(tmp_path / "bounding_box_train", ["0001_c1s1_000001_01.jpg"])
    with pytest.raises(ValueError, match="no images in .*query"):
        load_dataset("market1501", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'market'.*market1501"):
        load_dataset("market", tmp_path)
    with pytest.raises(TypeError, match="unexpected argument.*split"):
        load_dataset("market1501", tmp_path, split="labeled")


def msmt_tree(root, train_dir, test_dir):
    def entries(pids_cams, start):
        return [(f"{p:04d}/{p:04d}_{start + i:03d}_{c:02d}_0303morning_0015_0.jpg", p)
                for i, (p, c) in enumerate(pids_cams)]

    lists = {"list_train.txt": entries([(0, 1), (0, 4), (1, 15)], 0),
             "list_val.txt": entries([(0, 2), (2, 3)], 10),
             "list_query.txt": entries([(0, 5)], 20),
             "list_gallery.txt": entries([(0, 7), (1, 9), (1, 1)], 30)}
    for name, rows in lists.items():
        folder = root / (train_dir if name in ("list_train.txt", "list_val.txt") else test_dir)
        for rel, _ in rows:
            touch((folder / rel).parent, [(folder / rel).name])
        (root / name).write_text("".join(f"{rel} {pid}\n" for rel, pid in rows))
    return lists


@pytest.mark.parametrize("version", [("train", "test"), ("mask_train_v2", "mask_test_v2")])
def test_msmt17_v1_lists_and_v2_folders(tmp_path, version):
    release = tmp_path / "MSMT17"
    msmt_tree(release, *version)
    with pytest.warns(DatasetWarning):
        ds = load_dataset("msmt17", tmp_path)
    assert as_pairs(ds.train) == [(0, 1), (0, 2), (0, 4), (1, 15), (2, 3)]
    assert as_pairs(ds.query) == [(0, 5)]
    assert as_pairs(ds.gallery) == [(0, 7), (1, 1), (1, 9)]
    assert ds.gallery[0].path == str(release / version[1] / "0000" / "0000_030_07_0303morning_0015_0.jpg")
    with pytest.warns(DatasetWarning):
        no_val = load_dataset("msmt17", release, include_val=False)
    assert as_pairs(no_val.train) == [(0, 1), (0, 4), (1, 15)]


def test_msmt17_bad_inputs(tmp_path):
    msmt_tree(tmp_path, "train", "test")
    with open(tmp_path / "list_query.txt", "a") as f:
        f.write("0000/badname.jpg 0\n")
    with pytest.warns(DatasetWarning) as caught:
        ds = load_dataset("msmt17", tmp_path)
    assert any("skipped 1 files or lines" in str(w.message) for w in caught)
    assert len(ds.query) == 1
    with pytest.raises(ValueError, match=r"list_query.txt:2"):
        load_dataset("msmt17", tmp_path, strict=True)
    (tmp_path / "list_gallery.txt").write_text("0009/0009_000_01_0303morning_0015_0.jpg 9\n")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("msmt17", tmp_path)
    (tmp_path / "list_gallery.txt").unlink()
    with pytest.raises(FileNotFoundError, match="MSMT17_V1"):
        load_dataset("msmt17", tmp_path)


def test_folder_layout(tmp_path):
    touch(tmp_path / "train", ["0011_c1_a.jpg", "0011_c2_b.png", "0003_c1_c.jpeg"])
    touch(tmp_path / "gallery", ["0020_c3_d.jpg", "-1_c3_e.jpg"])
    ds = load_dataset("folder", tmp_path)  # no official counts: no warning expected
    assert as_pairs(ds.train) == [(0, 1), (1, 1), (1, 2)]
    assert ds.query == [] and as_pairs(ds.gallery) == [(20, 3)]
    empty = tmp_path / "empty"
    (empty / "query").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        load_dataset("folder", empty)
    touch(empty / "query", ["-1_c1_x.jpg"])
    with pytest.raises(ValueError, match=r"no images found.*\(1 junk images"):
        load_dataset("folder", empty)
    with pytest.raises(FileNotFoundError, match="train/ .*query/"):
        load_dataset("folder", tmp_path / "train")


def test_csv_layout(tmp_path):
    touch(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / "train.csv").write_text("path,person_id,camera_id\nimg/a.jpg,42,1\nimg/b.jpg,17,2\n")
    (tmp_path / "query.csv").write_text(f"{tmp_path / 'img' / 'c.jpg'},5,3\n")
    ds = load_dataset("csv", tmp_path)
    assert as_pairs(ds.train) == [(0, 2), (1, 1)]
    assert ds.train[0].path == str(tmp_path / "img" / "a.jpg")
    assert as_pairs(ds.query) == [(5, 3)] and ds.gallery == []
    (tmp_path / "gallery.csv").write_text("img/missing.jpg,3,1\nimg/b.jpg,8,2\n")
    with pytest.warns(DatasetWarning, match="skipped 1 .*first: .*gallery.csv:1: image .*missing.jpg does not exist"):
        ds = load_dataset("csv", tmp_path)
    assert as_pairs(ds.gallery) == [(8, 2)] and "skipped 1 unusable entries" in ds.summary()
    with pytest.raises(ValueError, match="gallery.csv:1: image .*missing.jpg does not exist"):
        load_dataset("csv", tmp_path, strict=True)
    with pytest.raises(FileNotFoundError, match="train.csv"):
        load_dataset("csv", tmp_path / "img")


@pytest.mark.parametrize("kind", ["folder", "csv"])
def test_folder_and_csv_found_one_level_down(tmp_path, kind):
    release = tmp_path / "mine"
    touch(release / "train", ["0001_c1_x.jpg", "0001_c2_y.jpg"])
    if kind == "csv":
        (release / "train.csv").write_text("train/0001_c1_x.jpg,1,1\ntrain/0001_c2_y.jpg,1,2\n")
    ds = load_dataset(kind, tmp_path)
    assert as_pairs(ds.train) == [(0, 1), (0, 2)]
    assert ds.train[0].path == str(release / "train" / "0001_c1_x.jpg")
    touch(tmp_path / "elsewhere" / "img", ["0001_c1_x.jpg"])
    touch(tmp_path / "elsewhere", ["notes"])
    expected = "train/ .*query/" if kind == "folder" else "train.csv"
    with pytest.raises(FileNotFoundError, match=f"{kind}: expected {expected}.* one level below; found: img, notes"):
        load_dataset(kind, tmp_path / "elsewhere")


# ---------------------------------------------------------------------------------------------- CUHK03


def write_cuhk03(root, persons_per_pair=(3, 2), missing=((0, 1, 7),)):
    """cuhk-03.mat in the release's MATLAB v7.3 structure, and the new-protocol configs.

    MATLAB stores arrays column-major, so an H×W×3 image is an HDF5 dataset of shape (3, W, H), a
    persons×10 cell array is (10, persons) of object references, and the 5×1 cell of camera pairs is
    (1, 5). ``missing`` lists (pair, person, shot) cells that are empty, as some are in the release.
    Returns {file name: image} for every non-empty cell, for both image types.
    """
    release = root / "cuhk03_release"
    release.mkdir(parents=True)
    images = {}
    rng = np.random.default_rng(0)
    with h5py.File(release / "cuhk-03.mat", "w") as mat:
        refs = mat.create_group("#refs#")
        for kind in ("labeled", "detected"):
            pair_refs = []
            for pair, persons in enumerate(persons_per_pair):
                cells = np.empty((10, persons), dtype=h5py.ref_dtype)
                for person in range(persons):
                    for shot in range(10):
                        key = f"{kind}_{pair}_{person}_{shot}"
                        if (pair, person, shot) in missing:
                            refs[key] = np.zeros(2, np.uint64)  # MATLAB's empty array
                        else:
                            image = rng.integers(0, 256, (6 + shot, 4, 3), dtype=np.uint8)
                            refs[key] = image.T
                            name = f"{pair + 1}_{person + 1:03d}_{1 if shot < 5 else 2}_{shot + 1:02d}.png"
                            images[(kind, name)] = image
                        cells[shot, person] = refs[key].ref
                refs[f"{kind}_pair{pair}"] = cells
                pair_refs.append(refs[f"{kind}_pair{pair}"].ref)
            mat.create_dataset(kind, data=np.array([pair_refs], dtype=h5py.ref_dtype))
    for kind in ("labeled", "detected"):
        names = sorted(name for k, name in images if k == kind)
        # global person label: pair 1's persons are 1.., pair 2's follow
        labels = [int(n[2:5]) + sum(persons_per_pair[: int(n[0]) - 1]) for n in names]
        person = np.array(labels)
        train = [i for i, pid in enumerate(person) if pid <= 2]
        test = [i for i, pid in enumerate(person) if pid > 2]
        query = [i for i in test if names[i].endswith(("_01.png", "_06.png"))]
        gallery = [i for i in test if i not in query]
        config = {"filelist": np.array([[n] for n in names], dtype=object), "labels": person[:, None],
                  "camId": np.array([[int(n[6])] for n in names]),
                  "train_idx": np.array(train)[:, None] + 1, "query_idx": np.array(query)[:, None] + 1,
                  "gallery_idx": np.array(gallery)[:, None] + 1}
        scipy.io.savemat(root / f"cuhk03_new_protocol_config_{kind}.mat", config)
    return images


def test_cuhk03_extracts_once_and_splits(tmp_path):
    root = tmp_path / "cuhk03"
    images = write_cuhk03(root)
    cache = tmp_path / "cache"
    with pytest.warns(DatasetWarning, match="not the official release"):
        ds = load_dataset("cuhk03", root, split="labeled", cache_dir=cache)
    assert ds.name == "cuhk03-labeled"
    # persons 1, 2 (pair 1) train; 3 (pair 1) and 4, 5 (pair 2) test; one empty cell in pair 1 person 2
    assert len(ds.train) == 19 and ds.num_train_ids == 2
    assert {s.person_id for s in ds.query} == {3, 4, 5} and len(ds.query) == 6 and len(ds.gallery) == 24
    # cameras: 2 per pair, numbered 1..10
    assert {s.camera_id for s in ds.query} == {1, 2, 3, 4}
    for sample in ds.train + ds.query:
        name = sample.path.rsplit("/", 1)[1]
        assert np.array_equal(np.asarray(Image.open(sample.path)), images[("labeled", name)])
    marker = cache / "cuhk03" / "labeled" / ".complete.json"
    stamp = marker.stat().st_mtime_ns
    with pytest.warns(DatasetWarning):
        again = load_dataset("cuhk03", root, split="labeled", cache_dir=cache)
    assert again == ds and marker.stat().st_mtime_ns == stamp  # reused, not re-extracted
    with pytest.warns(DatasetWarning):
        detected = load_dataset("cuhk03", root, split="detected", cache_dir=tmp_path / "cache_det")
    name = detected.gallery[0].path.rsplit("/", 1)[1]
    assert np.array_equal(np.asarray(Image.open(detected.gallery[0].path)), images[("detected", name)])


def test_cuhk03_cache_dir_keeps_user_files_and_both_splits(tmp_path):
    root = tmp_path / "cuhk03"
    images = write_cuhk03(root)
    cache = tmp_path / "mydata"
    touch(cache, ["important.txt"])
    with pytest.warns(DatasetWarning):
        labeled = load_dataset("cuhk03", root, split="labeled", cache_dir=cache)
    with pytest.warns(DatasetWarning):
        detected = load_dataset("cuhk03", root, split="detected", cache_dir=cache)
    assert (cache / "important.txt").exists()
    for ds, kind in ((labeled, "labeled"), (detected, "detected")):  # both extractions coexist
        assert all(s.path.startswith(str(cache / "cuhk03" / kind)) for s in ds.train + ds.query + ds.gallery)
        name = ds.train[0].path.rsplit("/", 1)[1]
        assert np.array_equal(np.asarray(Image.open(ds.train[0].path)), images[(kind, name)])
    assert labeled.train[0].path != detected.train[0].path
    marker = cache / "cuhk03" / "labeled" / ".complete.json"
    stamp = marker.stat().st_mtime_ns
    os.utime(root / "cuhk03_release" / "cuhk-03.mat", ns=(1, 1))  # a changed .mat: its own extraction is redone
    with pytest.warns(DatasetWarning):
        load_dataset("cuhk03", root, split="labeled", cache_dir=cache)
    assert marker.stat().st_mtime_ns != stamp
    assert (cache / "important.txt").exists() and all(os.path.exists(s.path) for s in detected.gallery)


def test_cuhk03_reads_already_extracted_images(tmp_path):
    """The official RGA code's / torchreid's layout: images_labeled/ (same file names) beside the configs,
    no cuhk-03.mat; nothing is extracted or cached."""
    root = tmp_path / "CUHK03_New"
    images = write_cuhk03(root)
    (root / "cuhk03_release" / "cuhk-03.mat").unlink()
    folder = root / "images_labeled"
    folder.mkdir()
    for (kind, name), image in images.items():
        if kind == "labeled":
            Image.fromarray(image).save(folder / name)
    with pytest.warns(DatasetWarning):
        ds = load_dataset("cuhk03", root, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() and ds.train and ds.query and ds.gallery
    for sample in ds.train + ds.query + ds.gallery:
        assert Path(sample.path).parent == folder
        assert np.array_equal(np.asarray(Image.open(sample.path)), images[("labeled", Path(sample.path).name)])
    next(folder.iterdir()).unlink()
    with pytest.raises(FileNotFoundError, match=r"lists .*\.png, which .*images_labeled/ does not contain"):
        load_dataset("cuhk03", root, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="cuhk-03.mat not found .* or its images already extracted"):
        load_dataset("cuhk03", root, split="detected", cache_dir=tmp_path / "cache")


def test_cuhk03_never_replaces_a_folder_it_did_not_create(tmp_path):
    root = tmp_path / "cuhk03"
    write_cuhk03(root)
    touch(tmp_path / "c" / "cuhk03" / "labeled", ["mine.txt"])  # the user's folder, no marker
    with pytest.raises(FileExistsError, match="not created by rga_keras"):
        load_dataset("cuhk03", root, cache_dir=tmp_path / "c")
    assert os.listdir(tmp_path / "c" / "cuhk03" / "labeled") == ["mine.txt"]
    assert sorted(os.listdir(tmp_path / "c" / "cuhk03")) == ["labeled"]  # no temporary folder left behind


def test_cuhk03_default_cache_under_env(tmp_path, monkeypatch):
    write_cuhk03(tmp_path / "cuhk03")
    monkeypatch.setenv("RGA_KERAS_CACHE", str(tmp_path / "c"))
    with pytest.warns(DatasetWarning):
        ds = load_dataset("cuhk03", tmp_path / "cuhk03")
    assert ds.train[0].path.startswith(str(tmp_path / "c" / "cuhk03" / "labeled"))


def test_cuhk03_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"split must be one of \('labeled', 'detected'\), got 'both'"):
        load_dataset("cuhk03", tmp_path, split="both")
    with pytest.raises(FileNotFoundError, match="cuhk-03.mat not found"):
        load_dataset("cuhk03", tmp_path)
    root = tmp_path / "cuhk03"
    write_cuhk03(root)
    (root / "cuhk03_new_protocol_config_detected.mat").unlink()
    with pytest.raises(FileNotFoundError, match="cuhk03_new_protocol_config_detected.mat not found"):
        load_dataset("cuhk03", root, split="detected", cache_dir=tmp_path / "c1")
    scipy.io.savemat(root / "cuhk03_new_protocol_config_detected.mat", {"labels": np.ones((2, 1))})
    with pytest.raises(ValueError, match="lacks filelist"):
        load_dataset("cuhk03", root, split="detected", cache_dir=tmp_path / "c2")
    config = {k: v for k, v in scipy.io.loadmat(root / "cuhk03_new_protocol_config_labeled.mat").items()
              if not k.startswith("__")}
    config["filelist"][0, 0] = np.array(["5_999_1_01.png"])
    scipy.io.savemat(root / "cuhk03_new_protocol_config_labeled.mat", config)
    with pytest.raises(FileNotFoundError, match="5_999_1_01.png"):
        load_dataset("cuhk03", root, cache_dir=tmp_path / "c3")
    (root / "cuhk03_release" / "cuhk-03.mat").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="MATLAB v7.3"):
        load_dataset("cuhk03", root, cache_dir=tmp_path / "c4")
    assert not list((tmp_path / "c4").rglob("*labeled*"))  # nothing half-written


@pytest.mark.parametrize("rows,message", [
    ("img/a.jpg,1,1\nimg/b.jpg;2;1\n", r"train.csv:2: expected 3 comma-separated columns .*found 1 column\(s\) "
                                       r"\(the separator must be a comma, this row uses ';'\)"),
    ("img/a.jpg,1\n", r"train.csv:1: expected 3 comma-separated columns .*found 2 column"),
    ("path,person_id,camera_id\nimg/a.jpg,1.0,1\n", r"train.csv:2: person_id must be an integer, found '1.0'"),
    ("img/a.jpg,1,c1\n", r"train.csv:1: camera_id must be an integer, found 'c1'"),
    ("img/a.jpg,-2,1\n", r"train.csv:1: person_id -2 is below -1"),
    ("../outside.jpg,1,1\n", r"train.csv:1: relative path '../outside.jpg' leads outside the dataset folder"),
])
def test_csv_bad_rows_name_the_line_and_why(tmp_path, rows, message):
    data = tmp_path / "data"
    touch(data / "img", ["a.jpg", "b.jpg"])
    touch(tmp_path, ["outside.jpg"])
    (data / "train.csv").write_text(rows)
    with pytest.raises(ValueError, match=message):
        load_dataset("csv", data)


def test_csv_every_path_missing_names_the_first(tmp_path):
    (tmp_path / "train.csv").write_text("nope/a.jpg,1,1\nnope/b.jpg,1,2\n")
    with pytest.raises(ValueError, match=r"no images found .*all 2 entries were unusable, the first: "
                                         r".*train.csv:1: image .*a.jpg does not exist"):
        load_dataset("csv", tmp_path)


def test_csv_junk_kept_out_and_absolute_paths_outside_noted(tmp_path):
    data = tmp_path / "data"
    touch(data / "img", ["a.jpg", "b.jpg"])
    touch(tmp_path / "elsewhere", ["c.jpg"])
    (data / "train.csv").write_text(f"img/a.jpg,1,1\n./img/b.jpg,-1,1\n{tmp_path / 'elsewhere' / 'c.jpg'},2,1\n")
    ds = load_dataset("csv", data)
    assert [s.path for s in ds.train] == [str(data / "img" / "a.jpg"), str(tmp_path / "elsewhere" / "c.jpg")]
    assert "dropped 1 junk images (id -1)" in ds.summary()
    assert f"1 images outside {data} (absolute paths or links, e.g. {tmp_path / 'elsewhere' / 'c.jpg'})" in ds.summary()


def test_market_names_with_ids_below_minus_one_are_not_identities(tmp_path):
    touch(tmp_path / "train", ["0001_c1_a.jpg", "-2_c1_b.jpg", "0001_c2_c.jpg"])
    with pytest.warns(DatasetWarning, match=r"first: .*-2_c1_b.jpg: person id -2 is below -1"):
        ds = load_dataset("folder", tmp_path)
    assert as_pairs(ds.train) == [(0, 1), (0, 2)]
    with pytest.raises(ValueError, match="person id -2 is below -1"):
        load_dataset("folder", tmp_path, strict=True)


def test_corrupt_jpegs_are_skipped_counted_and_named(tmp_path):
    # A JPEG with bytes inverted mid-stream decodes (with only libjpeg's unattributed warning): it must not
    # reach training or evaluation unnoticed.
    write_images(tmp_path / "train", ["0001_c1_a.jpg", "0001_c2_b.jpg", "0002_c1_c.jpg"], corrupt=("0001_c2_b.jpg",))
    bad = str(tmp_path / "train" / "0001_c2_b.jpg")
    with pytest.warns(DatasetWarning, match=f"skipped 1 corrupt images, the first: {bad}: corrupt JPEG data "
                                            r"\(Corrupt JPEG data: \d+ extraneous bytes"):
        ds = load_dataset("folder", tmp_path)
    assert [s.path for s in ds.train] == [str(tmp_path / "train" / n) for n in ("0001_c1_a.jpg", "0002_c1_c.jpg")]
    assert f"skipped 1 corrupt images, the first: {bad}: corrupt JPEG data" in ds.summary()
    with pytest.raises(ValueError, match="0001_c2_b.jpg: corrupt JPEG data"):
        load_dataset("folder", tmp_path, strict=True)
    assert len(load_dataset("folder", tmp_path, check_images=False).train) == 3
    write_images(tmp_path / "only_bad" / "train", ["0001_c1_a.jpg"], corrupt=("0001_c1_a.jpg",))
    with pytest.raises(ValueError, match="no images found .*; skipped 1 corrupt images, the first: .*0001_c1_a.jpg"):
        load_dataset("folder", tmp_path / "only_bad")  # the error says it all: no warning before it


def test_each_image_is_read_once_across_loads(tmp_path, monkeypatch):
    """The corrupt-image verdicts are remembered by (path, size, mtime): loading the dataset again reads no image;
    a file changed since, or one that could not be read, is checked again; a damaged cache is made anew."""
    from rga_keras.data import image_check

    monkeypatch.setenv("RGA_KERAS_CACHE", str(tmp_path / "cache"))
    names = ["0001_c1_a.jpg", "0001_c2_b.jpg", "0002_c1_c.jpg", "0002_c2_d.jpg"]
    write_images(tmp_path / "data" / "train", names, corrupt=("0001_c2_b.jpg",))
    read, check = [], image_check.file_problem
    monkeypatch.setattr(image_check, "file_problem", lambda path: read.append(Path(path).name) or check(path))

    def train_names():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DatasetWarning)
            return [Path(s.path).name for s in load_dataset("folder", tmp_path / "data").train]

    assert train_names() == ["0001_c1_a.jpg", "0002_c1_c.jpg", "0002_c2_d.jpg"] and sorted(read) == names
    read.clear()
    assert train_names() == ["0001_c1_a.jpg", "0002_c1_c.jpg", "0002_c2_d.jpg"] and read == []  # remembered
    changed = tmp_path / "data" / "train" / "0002_c2_d.jpg"
    changed.write_bytes(Path(tmp_path / "data" / "train" / "0001_c2_b.jpg").read_bytes())  # now corrupt
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    assert train_names() == ["0001_c1_a.jpg", "0002_c1_c.jpg"] and read == ["0002_c2_d.jpg"]
    read.clear()
    locked = tmp_path / "data" / "train" / "0001_c1_a.jpg"
    monkeypatch.setattr(image_check, "file_problem",
                        lambda path: read.append(Path(path).name) or ("cannot be read (denied)" if Path(path) == locked
                                                                      else check(path)))
    (tmp_path / "cache" / image_check.VERDICTS_FILE).unlink()  # forgotten: all read, the unreadable one not kept
    assert train_names() == ["0002_c1_c.jpg"] and sorted(read) == sorted(names)
    read.clear()
    assert train_names() == ["0002_c1_c.jpg"] and read == ["0001_c1_a.jpg"]  # asked again, as access may change
    read.clear()
    (tmp_path / "cache" / image_check.VERDICTS_FILE).write_text("not a database")  # damaged: checked all again,
    assert train_names() == ["0002_c1_c.jpg"] and sorted(read) == sorted(names)  # and the cache made anew
    read.clear()
    assert train_names() == ["0002_c1_c.jpg"] and read == ["0001_c1_a.jpg"]
