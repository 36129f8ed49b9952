"""Bad data given to the programs: broken CSV lists, corrupt JPEGs, images scaled to [0, 1]. Each must end in
one line on stderr (``prog: error: …`` naming the file, line or item and what is wrong) and exit status 2,
never a traceback or a silent wrong result. In-process ``main(argv)`` calls: no model is built for these."""
import json
import re
import warnings

import numpy as np
import pytest

from tests.bad_images import write_images
from rga_keras.cli import train as rga_train
from rga_keras.cli import embed as rga_embed
from rga_keras.cli import evaluate as rga_eval

# file contents of train.csv → what the one-line error must say
BROKEN_CSVS = {
    "semicolons": ("img/a.jpg;1;1\n", r"train.csv:1: expected 3 comma-separated columns path,person_id,camera_id, "
                                      r"found 1 column\(s\) \(the separator must be a comma, this row uses ';'\)"),
    "missing column": ("path,person_id,camera_id\nimg/a.jpg,1\n", r"train.csv:2: expected 3 comma-separated .*found 2"),
    "float id": ("img/a.jpg,1.0,1\n", r"train.csv:1: person_id must be an integer, found '1.0'"),
    "id below -1": ("img/a.jpg,1,1\nimg/b.jpg,-3,1\n", r"train.csv:2: person_id -3 is below -1"),
    "outside the root": ("../elsewhere.jpg,1,1\n", r"train.csv:1: relative path '../elsewhere.jpg' leads outside"),
    "every path missing": ("gone/a.jpg,1,1\ngone/b.jpg,2,1\n",
                           r"no images found under .*all 2 entries were unusable, the first: .*train.csv:1: "
                           r"image .*gone/a.jpg does not exist"),
    "not UTF-8": ("img/a.jpg,1,1\nimg/caf\xe9.jpg,2,1\n".encode("latin-1"),
                  r"train.csv: not UTF-8 text \(byte 0xe9 on line 2\); save it as UTF-8 \(in Excel: \"CSV UTF-8\"\)"),
    "id of 23 digits": ("img/a.jpg,12345678901234567890123,1\n",
                        r"train.csv:1: person_id 12345678901234567890123 is out of range \(at most 2147483647\)"),
    "same image, other ids": ("img/a.jpg,1,1\nimg/b.jpg,2,1\n./img/a.jpg,3,1\n",
                              r"train.csv:3: .*img/a.jpg is listed on line 1 already, with other ids \(1,1 there, 3,1 "
                              r"here\)"),
}
PROGRAMS = {
    "rga-train": lambda tmp, data: (rga_train, ["--data-root", data, "-o", "dataset.name=csv",
                                                "--run-dir", tmp / "run"]),
    "rga-eval": lambda tmp, data: (rga_eval, [tmp / "model.keras", "--dataset", "csv", "--data-root", data]),
}


def run(program, argv, capsys):
    status = program.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, prog, pattern):
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert re.match(rf"{prog}: error: .*{pattern}", lines[0]), lines[0]


@pytest.mark.parametrize("case", BROKEN_CSVS)
@pytest.mark.parametrize("prog", PROGRAMS)
def test_broken_csv_lists(tmp_path, capsys, prog, case):
    data = tmp_path / "data"
    write_images(data / "img", ["a.jpg", "b.jpg"])
    write_images(tmp_path, ["elsewhere.jpg"])
    rows, pattern = BROKEN_CSVS[case]
    (data / "train.csv").write_bytes(rows if isinstance(rows, bytes) else rows.encode())
    if case != "every path missing":  # a good query list: the bad row alone must stop the program
        (data / "query.csv").write_text("img/a.jpg,1,1\n")
    program, argv = PROGRAMS[prog](tmp_path, data)
    status, _, err = run(program, argv, capsys)
    assert_one_line_error(status, err, prog, pattern)
    assert not (tmp_path / "run").exists()  # nothing written for a dataset that cannot be read


@pytest.mark.parametrize("prog", PROGRAMS)
def test_a_dataset_of_corrupt_jpegs(tmp_path, capsys, prog):
    # Every image decodes with libjpeg's "Corrupt JPEG data" warning only: no dataset, one line (no warning
    # before it), and nothing written.
    data = tmp_path / "data"
    write_images(data / "train", ["0001_c1_a.jpg", "0002_c1_b.jpg"], corrupt=("0001_c1_a.jpg", "0002_c1_b.jpg"))
    program, argv = PROGRAMS[prog](tmp_path, data)
    argv = [a if a != "dataset.name=csv" else "dataset.name=folder" for a in argv]
    argv = [a if a != "csv" else "folder" for a in argv]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        status, _, err = run(program, argv, capsys)
    assert_one_line_error(status, err, prog, r"folder: no images found under .*; skipped 2 corrupt images, the "
                                             r"first: .*0001_c1_a.jpg: corrupt JPEG data \(Corrupt JPEG data: ")
    assert not (tmp_path / "run").exists()


def test_rga_embed_refuses_images_that_are_all_corrupt(tmp_path, capsys, monkeypatch):
    # Corrupt JPEGs decode (with only libjpeg's unattributed warning): rga-embed must not embed them. The check
    # runs before any model is used, so a stand-in embedder is enough here.
    from rga_keras import retrieval

    write_images(tmp_path / "crops", ["a.jpg", "b.jpg"], corrupt=("a.jpg", "b.jpg"))
    monkeypatch.setattr(retrieval, "load_embedder", lambda path, feature: stand_in_embedder())
    status, _, err = run(rga_embed, [tmp_path / "model.keras", tmp_path / "crops", "--out", tmp_path / "f.h5"], capsys)
    assert_one_line_error(status, err, "rga-embed", r"none of the 2 images could be read \(the first, .*a.jpg: "
                                                    r"corrupt JPEG data \(Corrupt JPEG data: .*extraneous bytes")
    assert not (tmp_path / "f.h5").exists()


def stand_in_embedder(path="stand-in"):
    """An `Embedder` whose "model" takes the first 8 pixel values: no network is built for these tests."""
    from pathlib import Path

    from rga_keras.retrieval.models import Embedder

    return Embedder(Path(path), "keras", (64, 32), "after_bn", lambda x: x.reshape(len(x), -1)[:, :8])


def test_rga_embed_skips_a_corrupt_jpeg_and_names_it(tmp_path, capsys, monkeypatch):
    from rga_keras import retrieval

    write_images(tmp_path / "crops", ["a.jpg", "b.jpg", "c.jpg"], corrupt=("b.jpg",))
    (tmp_path / "model.keras").write_bytes(b"stand-in")  # hashed into the features file's source
    monkeypatch.setattr(retrieval, "load_embedder", lambda path, feature: stand_in_embedder(path))
    status, out, err = run(rga_embed, [tmp_path / "model.keras", tmp_path / "crops", "--out", tmp_path / "f.h5",
                                       "--quiet"], capsys)
    assert status == 0, err
    assert "embedded 2 images (1 skipped)" in out
    assert f"skipped unreadable image: {tmp_path / 'crops' / 'b.jpg'}" in err


def test_embedder_refuses_images_scaled_to_unit_range():
    embedder = stand_in_embedder()
    pixels = np.random.default_rng(0).random((2, 64, 32, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"every pixel of the batch is <= 1: the images look scaled to \[0, 1\]; "
                                         r"pass raw RGB pixel values 0-255"):
        embedder(pixels)
    assert embedder(pixels * 255).shape == (2, 8)


def _jpeg(image, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def test_serve_image_bytes_rejects_corrupt_jpegs_naming_the_item(tmp_path):
    """A JPEG with bytes overwritten mid-stream decodes with only libjpeg's unattributed warning: the signature
    must refuse it, naming the item, and accept clean files of every kind (reference: libjpeg-turbo in strict
    mode, simplejpeg); a single string or a 2-D batch, which a loaded signature lets through, is refused too."""
    import io

    import keras
    import simplejpeg
    import tensorflow as tf
    from PIL import Image

    from rga_keras.export.saved_model import _serving_functions
    from tests.bad_images import corrupt_jpeg_bytes, jpeg_bytes

    embedder = keras.Sequential([keras.Input((64, 32, 3)), keras.layers.GlobalAveragePooling2D()])
    serve = tf.function(_serving_functions(embedder, 64, 32, "float32")["serve_image_bytes"][0])
    photo = Image.open(io.BytesIO(jpeg_bytes(3, (128, 64))))
    png = io.BytesIO()
    photo.save(png, "PNG")
    clean = [jpeg_bytes(0), jpeg_bytes(1, (128, 64)), _jpeg(photo, quality=50, progressive=True),
             _jpeg(photo.convert("L"), quality=95), _jpeg(photo, subsampling=0, optimize=True), png.getvalue()]
    for data in clean[:-1]:
        simplejpeg.decode_jpeg(data)  # the reference finds nothing wrong
    assert serve(tf.constant(clean))["embedding"].shape == (len(clean), 3)

    skipped = corrupt_jpeg_bytes()  # the decoder loses step and completes the image early
    malformed = bytearray(jpeg_bytes(2))
    malformed[len(malformed) // 2: len(malformed) // 2 + 2] = b"\xff\x12"  # a marker no scan may hold
    for index, (data, why) in enumerate([(skipped, "a corrupt JPEG \\(its decoder completed the image before the end"),
                                         (bytes(malformed), "a corrupt JPEG \\(its entropy-coded data is malformed"),
                                         (b"", "not a complete JPEG or PNG")], start=1):  # the scan must not fail first
        if data:  # the reference agrees that the JPEGs are corrupt
            with pytest.raises(ValueError, match="Corrupt JPEG data|Unsupported marker"):
                simplejpeg.decode_jpeg(data)
        batch = clean[:index] + [data] + clean[index:]
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=rf"serve_image_bytes: item\] \[{index}\] \[of the batch is {why}"):
            serve(tf.constant(batch))

    # A signature of a loaded SavedModel lets a single string or a 2-D batch through its declared [None]: refused.
    module = tf.Module()
    module.serve = tf.function(serve.python_function, input_signature=[tf.TensorSpec([None], tf.string)])
    tf.saved_model.save(module, str(tmp_path / "served"), signatures={"bytes": module.serve.get_concrete_function()})
    signature = tf.saved_model.load(str(tmp_path / "served")).signatures["bytes"]
    for wrong, shape in ((tf.constant(clean[0]), r"\[\]"), (tf.constant([clean[:2]]), r"\[1 2\]")):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"serve_image_bytes: expected a 1-D batch of encoded "
                                                                 rf"images .* got shape\] {shape}"):
            signature(image_bytes=wrong)


# ---- second round (issue 25): CSV lists as people save them, unusable features, outputs, files named ---------

def test_csv_lists_as_excel_saves_them(tmp_path):
    """A UTF-8 BOM with and without a header, CRLF and trailing empty cells, a repeated row (dropped with a
    note), and a link inside the root that leads out of it (noted as absolute paths are)."""
    from rga_keras.data import DatasetWarning, load_dataset

    data = tmp_path / "data"
    write_images(data / "img", ["a.jpg", "b.jpg", "c.jpg"])
    write_images(tmp_path / "elsewhere", ["d.jpg"])
    (data / "img" / "link.jpg").symlink_to(tmp_path / "elsewhere" / "d.jpg")
    bom = "\ufeff"
    (data / "train.csv").write_text(f"{bom}path,person_id,camera_id,,\r\nimg/a.jpg,1,1,,\r\nimg/b.jpg,2,1,,\r\n"
                                    "img/a.jpg,1,1,,\r\n", encoding="utf-8")  # Excel: CRLF, a column per header cell
    (data / "query.csv").write_text(f"{bom}img/c.jpg,1,2\n", encoding="utf-8")
    (data / "gallery.csv").write_text(f"{bom}img/link.jpg,1,1\nimg/b.jpg,2,2\n", encoding="utf-8")
    with pytest.warns(DatasetWarning, match=r"dropped 1 duplicate rows, the first: .*train.csv:4 repeats line 2"):
        ds = load_dataset("csv", data)
    assert [s.path for s in ds.train] == [str(data / "img" / "a.jpg"), str(data / "img" / "b.jpg")]
    assert [s.path for s in ds.query] == [str(data / "img" / "c.jpg")]  # its first row, BOM and all
    assert len(ds.gallery) == 2
    assert f"1 images outside {data} (absolute paths or links, e.g. {data / 'img' / 'link.jpg'})" in ds.summary()


def test_image_lists_with_a_bom_or_in_another_encoding(tmp_path):
    from rga_keras.retrieval import list_images

    write_images(tmp_path, ["a.jpg", "b.jpg"])
    (tmp_path / "list.txt").write_text("\ufeffa.jpg\nb.jpg\n", encoding="utf-8")
    assert list_images([tmp_path / "list.txt"]) == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    (tmp_path / "list.csv").write_bytes("path\na.jpg\nb\xe9.jpg\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"list.csv: not UTF-8 text \(byte 0xe9 on line 3\)"):
        list_images([tmp_path / "list.csv"])


def _features_file(path, features, names=None, model="stand-in"):
    from pathlib import Path

    from rga_keras.retrieval import FeatureSet, write_features

    source = {"model": model, "model_sha256": "0" * 64, "model_format": "keras", "feature": "after_bn",
              "input_size": [64, 32], "flip": False}
    names = names or [f"/g/{i}.jpg" for i in range(len(features))]
    return write_features(Path(path), FeatureSet(np.asarray(features, np.float32), names, source))


def test_rga_embed_refuses_a_model_that_gives_nan(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from rga_keras import retrieval
    from rga_keras.retrieval.models import Embedder

    write_images(tmp_path / "crops", ["a.jpg", "b.jpg"])
    (tmp_path / "model.keras").write_bytes(b"stand-in")
    nan_model = Embedder(Path(tmp_path / "model.keras"), "keras", (64, 32), "after_bn",
                         lambda x: np.full((len(x), 8), np.nan, np.float32))
    monkeypatch.setattr(retrieval, "load_embedder", lambda path, feature: nan_model)
    status, _, err = run(rga_embed, [tmp_path / "model.keras", tmp_path / "crops", "--out", tmp_path / "f.h5",
                                     "--quiet"], capsys)
    assert_one_line_error(status, err, "rga-embed", r"2 of 2 embeddings hold NaN or Inf values \(first: row 0, "
                                                    r".*a.jpg\); the model .*model.keras does not give usable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops", "model.keras"]


def test_rga_search_leaves_bad_gallery_rows_out_and_refuses_a_dead_gallery(tmp_path, capsys):
    from rga_keras.cli import search as rga_search

    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(6, 8)).astype(np.float32)
    gallery[1] = np.nan
    gallery[4] = 0.0
    query = gallery[[2]] + 0.01
    _features_file(tmp_path / "g.h5", gallery)
    _features_file(tmp_path / "q.h5", query, ["/q/0.jpg"])
    status, out, err = run(rga_search, [tmp_path / "q.h5", "--gallery", tmp_path / "g.h5", "--top-k", "10",
                                        "--csv", tmp_path / "hits.csv", "--quiet"], capsys)
    assert status == 0, err
    assert err.strip() == ("rga-search: warning: 1 of 6 gallery rows hold NaN or Inf values (first: row 1, /g/1.jpg); "
                           "1 of 6 gallery rows are all zero (first: row 4, /g/4.jpg); left out of the search")
    hits = (tmp_path / "hits.csv").read_text().splitlines()[1:]
    with np.errstate(invalid="ignore"):
        unit = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    reference = [f"/g/{i}.jpg" for i in np.argsort(-(unit @ (query[0] / np.linalg.norm(query[0]))))
                 if i not in (1, 4)]
    assert [row.split(",")[2] for row in hits] == reference  # brute force over the usable rows
    _features_file(tmp_path / "zero.h5", np.zeros((5, 8)))
    status, _, err = run(rga_search, [tmp_path / "q.h5", "--gallery", tmp_path / "zero.h5"], capsys)
    assert_one_line_error(status, err, "rga-search", r"5 of 5 gallery rows are all zero \(first: row 0, /g/0.jpg\); "
                                                     r"nothing to search")
    _features_file(tmp_path / "same.h5", np.ones((5, 8)))
    status, _, err = run(rga_search, [tmp_path / "q.h5", "--gallery", tmp_path / "same.h5"], capsys)
    assert_one_line_error(status, err, "rga-search", r"all 5 usable gallery rows are the same vector")


@pytest.fixture
def nan_query_features(tmp_path, monkeypatch):
    """A stand-in model whose query features are all NaN (query_gallery_features stubbed, as eval and visualize
    call it)."""
    from rga_keras import models
    from rga_keras.evaluation import features

    def nan_features(model, data, config, verbose, features=None):
        meta = lambda samples: {"person_id": np.array([s.person_id for s in samples]),  # noqa: E731
                                "camera_id": np.array([s.camera_id for s in samples]),
                                "path": np.array([s.path for s in samples])}
        nan, ones = np.full((len(data.query), 4), np.nan, np.float32), np.ones((len(data.gallery), 4), np.float32)
        if features is None:  # rga-visualize: one feature, as arrays
            return (nan, meta(data.query)), (ones, meta(data.gallery))
        return ({name: nan for name in features}, meta(data.query)), ({n: ones for n in features}, meta(data.gallery))

    class Model:
        name, input = "stand-in", type("Input", (), {"shape": (None, 64, 32, 3)})

    monkeypatch.setattr(models, "load_reid_model", lambda path: Model())
    monkeypatch.setattr(features, "query_gallery_features", nan_features)
    monkeypatch.setenv("RGA_KERAS_CACHE", str(tmp_path / "cache"))


def test_rga_eval_refuses_features_that_hold_nan(tmp_path, capsys, nan_query_features):
    status, _, err = run(rga_eval, [tmp_path / "m.keras", "--dataset", "synthetic", "--feature", "after_bn",
                                    "--json", tmp_path / "r.json"], capsys)
    assert_one_line_error(status, err, "rga-eval", r"query_features: \d+ of \d+ rows hold NaN or Inf values \(first: "
                                                   r"row 0\); these features cannot be ranked")
    assert not (tmp_path / "r.json").exists()


def test_rga_visualize_refuses_features_that_hold_nan(tmp_path, capsys, nan_query_features):
    """A NaN model drew ranked lists (and attention pictures) with exit 0, where rga-eval refused it."""
    from rga_keras.cli import visualize

    status, _, err = run(visualize, [tmp_path / "m.keras", "--dataset", "synthetic", "--out", tmp_path / "pictures"],
                         capsys)
    assert_one_line_error(status, err, "rga-visualize", r"query_features: \d+ of \d+ rows hold NaN or Inf values "
                                                        r"\(first: row 0\); these features cannot be ranked")
    assert not (tmp_path / "pictures").exists()  # made for the lock only: removed with it


def test_rga_export_refuses_a_model_that_gives_nan(tmp_path, capsys, monkeypatch):
    from rga_keras import models
    from rga_keras.cli import export as rga_export
    from rga_keras.export import exporter

    monkeypatch.setattr(models, "load_reid_model", lambda path: object())
    monkeypatch.setattr(exporter, "reid_model_info", lambda model: {"input_size": [64, 32]})
    monkeypatch.setattr(exporter, "embedding_model", lambda model, feature: lambda x, training: x[:, 0, 0] * np.nan)
    status, _, err = run(rga_export, ["--model", "m.keras", "--out", tmp_path / "out", "--skip-parity-check"], capsys)
    assert_one_line_error(status, err, "rga-export", r"8 of 8 embeddings of random test images hold NaN or Inf values "
                                                     r"\(first: row 0\); the model's weights are damaged")
    assert not (tmp_path / "out").exists()


def test_outputs_keep_their_permissions_and_are_written_through_links(tmp_path, capsys):
    """A replaced results file keeps its 0600; an output path that is a link writes its target, the link stays."""
    import os
    import stat

    from rga_keras.cli import search as rga_search

    _features_file(tmp_path / "g.h5", np.eye(5, 8))
    _features_file(tmp_path / "q.h5", np.eye(1, 8), ["/q/0.jpg"])
    private, target = tmp_path / "private.json", tmp_path / "shared" / "today.csv"
    private.write_text("old")
    private.chmod(0o600)
    target.parent.mkdir()
    target.write_text("old")
    (tmp_path / "hits.csv").symlink_to(target)
    status, _, err = run(rga_search, [tmp_path / "q.h5", "--gallery", tmp_path / "g.h5", "--json", private,
                                      "--csv", tmp_path / "hits.csv", "--quiet"], capsys)
    assert status == 0, err
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and '"queries"' in private.read_text()
    assert (tmp_path / "hits.csv").is_symlink() and target.read_text().startswith("query,rank,path,similarity")
    umask = os.umask(0)
    os.umask(umask)
    status, _, err = run(rga_search, [tmp_path / "q.h5", "--gallery", tmp_path / "g.h5", "--json",
                                      tmp_path / "new.json", "--quiet"], capsys)
    assert status == 0 and stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.h5", "hits.csv", "new.json", "private.json", "q.h5",
                                                          "shared"]  # no temporaries, no lock files


def test_a_replaced_folder_keeps_its_permissions(tmp_path):
    import stat

    from rga_keras.files import publish, staging_dir

    version = tmp_path / "serving" / "rga" / "1"
    version.mkdir(parents=True)
    version.chmod(0o750)
    staged, aside = staging_dir(tmp_path, ".export-"), staging_dir(tmp_path, ".old-")
    (staged / "saved_model.pb").write_bytes(b"new")
    assert publish(staged, version, aside=aside) == version
    assert stat.S_IMODE(version.stat().st_mode) == 0o750 and (version / "saved_model.pb").read_bytes() == b"new"


@pytest.mark.parametrize("damage,pattern", [
    ("truncate", r"g.h5: cannot be read as an rga-embed features file \(HDF5\) \(.*truncated file: eof = 1000"),
    ("attribute", r"g.h5 is an incomplete rga-embed features file: it lacks the attribute\(s\) flip"),
])
def test_a_damaged_features_file_is_named(tmp_path, capsys, damage, pattern):
    import h5py

    from rga_keras.cli import search as rga_search

    path = _features_file(tmp_path / "g.h5", np.eye(300, 8))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        with h5py.File(path, "a") as file:
            del file.attrs["flip"]
    status, _, err = run(rga_search, [path, "--gallery", path], capsys)
    assert_one_line_error(status, err, "rga-search", pattern)


@pytest.fixture
def holds_gallery(tmp_path):
    from rga_keras.locks import writer_lock

    with writer_lock(tmp_path / "gallery.h5", inside=False):
        yield tmp_path / "gallery.h5"


def test_rga_embed_refuses_a_features_file_another_writes(tmp_path, capsys, monkeypatch, holds_gallery):
    import os

    from rga_keras import retrieval

    write_images(tmp_path / "crops", ["a.jpg"])
    monkeypatch.setattr(retrieval, "load_embedder", lambda *a: pytest.fail("loaded a model while locked out"))
    status, _, err = run(rga_embed, [tmp_path / "model.keras", tmp_path / "crops", "--out", holds_gallery], capsys)
    assert_one_line_error(status, err, "rga-embed", rf"gallery.h5 is being written by another process \(pid "
                                                    rf"{os.getpid()} on host ")
    assert not holds_gallery.exists()


# ---- the second round's mechanisms in rga-gallery and the indexed and Milvus galleries (issue 23's programs) ---

@pytest.fixture
def damaged_gallery(tmp_path):
    """A 1,000-row features file whose row 5 holds NaN and row 9 is all zero, and a query file of 6 rows."""
    import faiss

    from rga_keras import retrieval
    from tests.test_retrieval_gallery import grid_set
    from tests.test_retrieval_search import grid_vectors

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # tiny indexes: threads only spin
    rng = np.random.default_rng(0)
    data = grid_set(rng, 1000)
    data.features[5], data.features[9] = np.nan, 0.0
    query = retrieval.FeatureSet(grid_vectors(rng, 6), [f"/q/{i}.jpg" for i in range(6)], data.source)
    yield (retrieval.write_features(tmp_path / "g.h5", data), retrieval.write_features(tmp_path / "q.h5", query),
           data, query)
    faiss.omp_set_num_threads(threads)


BAD_ROWS_WARNING = ("warning: 1 of 1000 gallery rows hold NaN or Inf values (first: row 5, /crops/0005_c3s1_000005_01.jpg); "
                    "1 of 1000 gallery rows are all zero (first: row 9, /crops/0009_c1s1_000009_01.jpg)")


def test_an_index_and_its_search_leave_bad_gallery_rows_out(damaged_gallery, capsys, tmp_path):
    """rga-gallery index trains and searches without the NaN and zero rows (a NaN row made faiss' centroids NaN),
    warning once each time; what the index returns equals brute force over the usable rows."""
    from rga_keras.cli import gallery as rga_gallery
    from rga_keras.cli import search as rga_search
    from tests.test_retrieval_search import brute_force

    gallery, query, data, queries = damaged_gallery
    status, out, err = run(rga_gallery, ["index", gallery, "--factory", "IVF4,PQ8x4fs", "--nprobe", "4",
                                         "--train-rows", "700", "--quiet"], capsys)
    assert status == 0 and f"index    wrote {gallery}.faiss" in out, err
    assert err.count("\n") == 1 and err.startswith("rga-gallery: " + BAD_ROWS_WARNING), err
    usable = np.setdiff1d(np.arange(1000), [5, 9])
    order, _, _ = brute_force(queries.features, data.features[usable], 998)
    for search in ("index", "exact"):
        status, _, err = run(rga_search, [query, "--gallery", gallery, "--search", search, "--shortlist", 1000,
                                          "--top-k", 1000, "--json", tmp_path / f"{search}.json", "--quiet"], capsys)
        assert status == 0 and err.count("\n") == 1 and err.startswith("rga-search: " + BAD_ROWS_WARNING), err
        found = [[r["path"] for r in q["results"]] for q in json.loads((tmp_path / f"{search}.json").read_text())["queries"]]
        assert found == [[data.paths[usable[j]] for j in row] for row in order]  # 998 each: 5 and 9 never


def test_rga_gallery_copy_leaves_bad_rows_out_of_milvus(damaged_gallery, capsys, tmp_path):
    from rga_keras.cli import gallery as rga_gallery

    gallery = damaged_gallery[0]
    status, out, err = run(rga_gallery, ["copy", gallery, "--milvus", tmp_path / "m.db"], capsys)
    assert status == 0 and "copied   998 of 1000 images; " in out and "998 images x 32-d" in out, err
    assert err == (f"rga-gallery: warning: 2 of 1000 rows of {gallery} hold NaN/Inf values or are all zero (first: row "
                   "5, /crops/0005_c3s1_000005_01.jpg); not copied\n")
    status, out, _ = run(rga_gallery, ["copy", gallery, "--milvus", tmp_path / "m.db"], capsys)
    assert status == 0 and "copied   0 of 1000 images (998 were there); " in out


def test_a_query_file_with_nan_rows_is_refused_naming_them(damaged_gallery, capsys, tmp_path):
    from rga_keras import retrieval
    from rga_keras.cli import search as rga_search

    gallery, _, data, queries = damaged_gallery
    bad = retrieval.FeatureSet(np.vstack([queries.features, np.full((1, 32), np.nan, np.float32)]),
                               queries.paths + ["/q/nan.jpg"], queries.source)
    query = retrieval.write_features(tmp_path / "bad_q.h5", bad)
    status, _, err = run(rga_search, [query, "--gallery", gallery, "--json", tmp_path / "r.json"], capsys)
    assert_one_line_error(status, err, "rga-search", rf"{query}: 1 of 7 query rows hold NaN or Inf values \(first: "
                                                     r"row 6, /q/nan.jpg\); they cannot be searched with")
    assert not (tmp_path / "r.json").exists()


def test_rga_gallery_index_refuses_a_features_file_another_writes(damaged_gallery, capsys):
    """The features file and its index are one output: rga-gallery takes the lock rga-embed takes."""
    import os
    import socket

    from rga_keras.cli import gallery as rga_gallery
    from rga_keras.locks import writer_lock

    gallery = damaged_gallery[0]
    with writer_lock(gallery, inside=False):
        status, _, err = run(rga_gallery, ["index", gallery], capsys)
    assert_one_line_error(status, err, "rga-gallery", rf"{gallery} is being written by another process \(pid "
                                                      rf"{os.getpid()} on host {socket.gethostname()}")
    assert sorted(p.name for p in gallery.parent.iterdir()) == ["g.h5", "q.h5"]  # no index, no lock file left


def test_a_damaged_faiss_index_is_named(damaged_gallery, capsys):
    """faiss' own error ("Error in void faiss::read_xb_vector …") ended rga-search as an unexpected error (70)."""
    from rga_keras.cli import gallery as rga_gallery
    from rga_keras.cli import search as rga_search

    gallery, query = damaged_gallery[:2]
    assert run(rga_gallery, ["index", gallery, "--factory", "IVF4,PQ8x4fs", "--train-rows", "700", "--quiet"],
               capsys)[0] == 0
    index = gallery.parent / "g.h5.faiss"
    index.write_bytes(index.read_bytes()[:index.stat().st_size // 2])
    status, _, err = run(rga_search, [query, "--gallery", gallery, "--search", "index"], capsys)
    assert_one_line_error(status, err, "rga-search", rf"{index}: cannot be read as a faiss index \(.*\); the file is "
                                                     rf"damaged, truncated or of another kind; rebuild it with "
                                                     rf"`rga-gallery index {gallery} --rebuild`")
