"""Bad data given to the programs: broken CSV lists, corrupt JPEGs, images scaled to [0, 1]. Each must end in
one line on stderr (``prog: error: …`` naming the file, line or item and what is wrong) and exit status 2,
never a traceback or a silent wrong result. In-process ``main(argv)`` calls: no model is built for these."""
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
    (data / "train.csv").write_text(rows)
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


def test_serve_image_bytes_rejects_corrupt_jpegs_naming_the_item():
    """A JPEG with bytes overwritten mid-stream decodes with only libjpeg's unattributed warning: the signature
    must refuse it, naming the item, and accept clean files of every kind (reference: libjpeg-turbo in strict
    mode, simplejpeg)."""
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
