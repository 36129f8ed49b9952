"""The Grain pipelines (rga_keras.data.grain_pipeline): the batches of the tf.data pipeline, the paper's augmentation
statistics against a NumPy reference, one stream for any number of workers, unreadable files skipped and recorded
as tf.data does, Pillow's and TensorFlow's pixels, and no TensorFlow in the process."""
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from rga_keras.data import (
    IMAGENET_MEAN_255,
    CorruptImages,
    load_dataset,
    make_eval_dataset,
    make_grain_eval_dataset,
    make_grain_train_dataset,
    make_train_dataset,
)
from rga_keras.data.images import decode_image, resize_image
from rga_keras.data.synthetic import generate
from tests.bad_images import jpeg_bytes
from tests.pipeline_images import SIZE, index_of, noise_samples, traced_samples, with_unreadable

ROOT = Path(__file__).resolve().parent.parent
PIXELS = 0.01  # the pipelines' pixels agree to float32 rounding (TensorFlow computes sampling positions in float32)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """A small synthetic set: 4 training identities × 4 JPEGs of 32×16."""
    root = generate(tmp_path_factory.mktemp("synthetic") / "set", num_ids=8, images_per_id=4, num_cameras=2,
                    image_size=(32, 16))
    return load_dataset("market1501", root).train


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return traced_samples(tmp_path_factory.mktemp("images"))


def take(ds, n):
    """The first ``n`` elements of a Grain dataset, its worker processes stopped after."""
    iterator = iter(ds)
    try:
        return [next(iterator) for _ in range(n)]
    finally:
        iterator.close()


def tf_take(ds, n):
    return [tuple(np.asarray(part) for part in element) for element in ds.take(n)]


def assert_same_batches(grain_batches, tf_batches):
    assert len(grain_batches) == len(tf_batches)
    for (x, y), (x_tf, y_tf) in zip(grain_batches, tf_batches):
        assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape == x_tf.shape
        np.testing.assert_array_equal(y, y_tf)
        np.testing.assert_allclose(x, x_tf, rtol=0, atol=PIXELS)


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("size", [SIZE, (40, 20)])  # shrinking (antialiased) and enlarging the 32×16 JPEGs
def test_grain_gives_the_batches_of_tf_data(jpegs, augment, size):
    """Same seed, same batches: identities, images and augmentations, from a resumed position, whole and as the
    slice of the second of two replicas."""
    kwargs = dict(num_ids_per_batch=4, images_per_id=2, image_size=size, augment=augment, seed=5, first_batch=3,
                  num_replicas=2)
    whole = take(make_grain_train_dataset(jpegs, workers=0, **kwargs), 3)
    assert_same_batches(whole, tf_take(make_train_dataset(jpegs, **kwargs), 3))
    second = take(make_grain_train_dataset(jpegs, workers=0, replicas=(1, 1), **kwargs), 3)
    assert_same_batches(second, tf_take(make_train_dataset(jpegs, replicas=(1, 1), **kwargs), 3))
    for (x, y), (x_second, y_second) in zip(whole, second):  # a process's share: its replicas' slices in order
        np.testing.assert_array_equal(x[4:], x_second)
    assert not np.array_equal(whole[0][1], whole[1][1])


def test_workers_give_one_stream_and_skip_unreadable_files_as_tf_data(samples, tmp_path):
    """With three unreadable files, tf.data, Grain in this process and Grain in two worker processes give the same
    batches (the groups holding a bad file skipped, the next taking their place), and record the same files."""
    items, bad = with_unreadable(samples, tmp_path)
    kwargs = dict(num_ids_per_batch=4, images_per_id=2, image_size=SIZE, augment=False)
    logs = {"tf.data": CorruptImages(), 0: CorruptImages(), 2: CorruptImages()}
    expected = tf_take(make_train_dataset(items, corrupt_log=logs["tf.data"], **kwargs), 12)
    for workers in (0, 2):
        out = take(make_grain_train_dataset(items, corrupt_log=logs[workers], workers=workers, **kwargs), 12)
        assert_same_batches(out, expected)
        assert all(items[index_of(x)].path not in bad for images, _ in out for x in images)
    assert all(log.paths == bad and log.count >= 3 and log.unexplained == 0 for log in logs.values())
    with pytest.raises(ValueError, match="workers must be an integer >= 0, got -1"):
        make_grain_train_dataset(items, workers=-1, **kwargs)


def reference_erasing(rng: np.random.Generator, size: tuple[int, int], n: int) -> np.ndarray:
    """Erased fractions of ``n`` rectangles drawn as Zhong et al.'s random erasing draws them: up to 10 tries of
    an area in 2–40 % and an aspect in 0.3–1/0.3, sides rounded, until the rectangle fits inside the image."""
    h, w = size
    fractions = []
    while len(fractions) < n:
        for _ in range(10):
            area, aspect = rng.uniform(0.02, 0.4) * h * w, rng.uniform(0.3, 1 / 0.3)
            eh, ew = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
            if eh < h and ew < w:
                fractions.append(eh * ew / (h * w))
                break
    return np.array(fractions)


def reference_resize(picture, size):
    """Pillow's float bilinear resize, one channel at a time."""
    return np.stack([np.asarray(Image.fromarray(picture[..., c].astype(np.float32)).resize(
        size[::-1], Image.Resampling.BILINEAR)) for c in range(3)], axis=-1)


def augmentation_of(image, pictures, size):
    """(flip, translate offset or None, erased fraction) that turn one of ``pictures`` into ``image``: the
    augmentation read back from the pixels, with a NumPy reference of each operation."""
    erased = (image == np.array(IMAGENET_MEAN_255, np.float32)).all(-1)
    keep = ~erased
    h, w = size
    for picture in pictures:
        for flip in (False, True):
            source = picture[:, ::-1] if flip else picture
            if np.allclose(image[keep], reference_resize(source, size)[keep], atol=PIXELS):
                return flip, None, erased.mean()
            for top in range(source.shape[0] - h + 1):  # the 1.125× image is the picture itself here
                for left in range(source.shape[1] - w + 1):
                    if np.array_equal(image[keep], source[top:top + h, left:left + w][keep]):
                        return flip, (top, left), erased.mean()
    raise AssertionError("no flip, crop and erasing of the sources gives this image")


def test_augmentation_statistics_match_a_numpy_reference(tmp_path):
    """On a fixed seed both pipelines augment every image the same way, read back from the pixels: flips,
    translate crops and erasing each about half of the time, every crop offset about equally often, and erased
    areas distributed as Zhong et al.'s sampler, written here in NumPy, distributes them."""
    size = (32, 16)
    items, pictures = noise_samples(tmp_path, size=(36, 18))  # exactly 1.125 × the output size
    kwargs = dict(num_ids_per_batch=4, images_per_id=2, image_size=size, seed=11)
    found = {}
    for name, batches in (("grain", take(make_grain_train_dataset(items, workers=0, **kwargs), 24)),
                          ("tf.data", tf_take(make_train_dataset(items, **kwargs), 24))):
        found[name] = [augmentation_of(x, pictures[2 * label:2 * label + 2], size)
                       for images, labels in batches for x, label in zip(images, labels)]
    assert found["grain"] == found["tf.data"]
    flips, offsets, erased = zip(*found["grain"])
    n = len(flips)  # 192 images: each rate within 3.4 standard deviations of 0.5
    for rate in (np.mean(flips), np.mean([o is not None for o in offsets]), np.mean(np.array(erased) > 0)):
        assert abs(rate - 0.5) < 3.4 * 0.5 / np.sqrt(n), rate
    counts = np.unique([o for o in offsets if o is not None], axis=0, return_counts=True)[1]
    assert len(counts) == 5 * 3 and stats.chisquare(counts).pvalue > 1e-3
    fractions = np.array([e for e in erased if e > 0])
    reference = reference_erasing(np.random.default_rng(0), size, 4000)
    assert stats.ks_2samp(fractions, reference).pvalue > 1e-3


def test_eval_stream_is_tf_datas(samples, tmp_path):
    """Evaluation: the same images in the order of the samples, the same metadata (paths as str), mirrored with
    flip=True, and unreadable files skipped with their metadata and recorded."""
    items, bad = with_unreadable(samples, tmp_path)
    for flip in (False, True):
        logs = (CorruptImages(), CorruptImages())
        out = take(make_grain_eval_dataset(items, image_size=SIZE, batch_size=5, flip=flip, corrupt_log=logs[0],
                                           workers=0), -(-len(items) // 5))
        expected = list(make_eval_dataset(items, image_size=SIZE, batch_size=5, flip=flip, corrupt_log=logs[1]))
        np.testing.assert_allclose(np.concatenate([x for x, _ in out]),
                                   np.concatenate([np.asarray(x) for x, _ in expected]), rtol=0, atol=PIXELS)
        for key in ("person_id", "camera_id"):
            np.testing.assert_array_equal(np.concatenate([m[key] for _, m in out]),
                                          np.concatenate([np.asarray(m[key]) for _, m in expected]))
        paths = [p for _, m in out for p in m["path"]]
        assert paths == [s.path for s in items if s.path not in bad]
        assert logs[0].paths == logs[1].paths == bad and logs[0].count == 3
    mirrored = take(make_grain_eval_dataset(items[:4], image_size=(10, 6), flip=True, workers=0), 1)[0][0]
    plain = take(make_grain_eval_dataset(items[:4], image_size=(10, 6), workers=0), 1)[0][0]
    np.testing.assert_array_equal(mirrored, plain[:, :, ::-1])


def test_decoding_gives_tensorflows_pixels(tmp_path):
    """JPEG decodes bit for bit as TensorFlow's decode_image does; grey, palette and RGBA PNGs become the same RGB."""
    import tensorflow as tf

    def tf_decode(data):
        return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()

    data = jpeg_bytes(3, size=(64, 32))
    np.testing.assert_array_equal(decode_image(data), tf_decode(data))
    rgba = np.random.default_rng(4).integers(0, 256, (12, 7, 4), dtype=np.uint8)
    for image in (Image.fromarray(rgba[..., 0]), Image.fromarray(rgba), Image.fromarray(rgba[..., :3]).quantize(16)):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        np.testing.assert_array_equal(decode_image(buffer.getvalue()), tf_decode(buffer.getvalue()))
    with pytest.raises(ValueError):
        decode_image(data[: len(data) // 2])  # a truncated JPEG fails, as it does in TensorFlow


@pytest.mark.parametrize("source", [(40, 20), (10, 6), (30, 5), (36, 18), (7, 300)])
@pytest.mark.parametrize("size", [SIZE, (41, 19)])
def test_resize_matches_pillow_and_tensorflow(source, size):
    import tensorflow as tf

    from rga_keras.data.pipeline import resize_image as tf_resize

    picture = np.random.default_rng(5).integers(0, 256, (*source, 3), dtype=np.uint8)
    out = resize_image(picture, *size)
    assert out.shape == (*size, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference_resize(picture, size), rtol=0, atol=1e-3)
    np.testing.assert_allclose(out, tf_resize(tf.constant(picture), *size).numpy(), rtol=0, atol=PIXELS)


def test_grain_pipelines_run_without_tensorflow(tmp_path, jax_environment):
    """Importing the Grain pipelines and reading batches (in this process and in a worker) loads no TensorFlow."""
    script = f"""
import sys
from rga_keras.data import load_dataset, make_grain_eval_dataset, make_grain_train_dataset
from rga_keras.data.synthetic import generate

if __name__ == "__main__":
    data = load_dataset("market1501", generate({str(tmp_path / "set")!r}, num_ids=8, images_per_id=4, num_cameras=2,
                                               image_size=(32, 16)))
    for workers in (0, 1):
        iterator = iter(make_grain_train_dataset(data.train, num_ids_per_batch=2, images_per_id=2, image_size=(16, 8),
                                                 workers=workers))
        images, labels = next(iterator)
        iterator.close()
        assert images.shape == (4, 16, 8, 3) and labels.shape == (4,), (images.shape, labels.shape)
    count = sum(len(x) for x, _ in make_grain_eval_dataset(data.query, image_size=(16, 8), batch_size=3, workers=0))
    assert count == len(data.query), count
    print("tensorflow imported:", "tensorflow" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=jax_environment, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("tensorflow imported: False"), result.stdout[-2000:]
