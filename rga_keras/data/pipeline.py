"""tf.data pipelines: identity-balanced P×K training batches with the paper's augmentations, and evaluation.

Training follows the plan of `rga_keras.data.sampling` (which identities and images each batch holds, laid
out identity by identity so that tf.distribute's contiguous per-replica slices hold whole identities, and
each image's augmentation parameters); this module decodes and transforms the pixels with TensorFlow's ops.
The Grain pipeline (`rga_keras.data.grain_pipeline`) follows the same plan without TensorFlow, so both give
the same batches for a seed. The plan is keyed on (seed, position in the stream), so the output is
identical for a given seed however many threads decode.

Images are float32 RGB in 0–255 (the model normalises internally). Augmentations (translate crop,
horizontal flip, random erasing with the ImageNet mean pixel, docs/DESIGN.md §3): each image costs a decode,
a resize and two cheap ops.

A file that cannot be read or decoded never stops an epoch: the element holding it is skipped (the
whole K-image group in training, so batches stay whole), and the bad file is recorded in a
:class:`CorruptImages` log (by default the module's ``corrupt_images``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from rga_keras.cores import available_cores
from rga_keras.data.corrupt import CorruptImages, check_some_decode, corrupt_images, read_or_empty
from rga_keras.data.samples import spread_indices
from rga_keras.data.sampling import IMAGENET_MEAN_255, TRANSLATE_SCALE, PKPlan, check_size


def make_train_dataset(samples: Sequence, *, cache: bool = False, corrupt_log: CorruptImages | None = None,
                       **plan: Any) -> tf.data.Dataset:
    """Infinite dataset of ``(images, labels)``: float32 (P·K, H, W, 3) in 0–255, int32 (P·K,).

    samples: (path, person_id, camera_id) items, e.g. ``ReidDataset.train``; labels are the person ids.
    plan: `rga_keras.data.sampling.PKPlan`'s keyword arguments (num_ids_per_batch=16, images_per_id=4,
    image_size=(256, 128), augment=True, seed=0, num_replicas=1, replicas=None, first_batch=0, and the
    augmentations' probabilities translate_prob, flip_prob, erase_prob, 0.5 each).
    replicas: ``(first, count)`` yields, instead of each global batch, the slices of replicas first, …,
    first + count − 1 in turn (P / num_replicas identities × K images each): one worker's input for
    ``strategy.distribute_datasets_from_function`` (see `rga_keras.training.distribute_pk_dataset`). Only
    that worker's images are read; the slices equal those of the global batch, augmentations included.
    cache: read every file once into memory (saves file-system reads; decoding still happens per use).
    first_batch: start the stream there. A run resumed after ``n`` steps passes ``n`` and trains on the
    batches the uninterrupted run would have seen (the same ones, unless unreadable files were skipped
    before that point, which shifts the batch boundaries).
    """
    plan = PKPlan(samples, **plan)
    first_batch, augment = plan.first_batch, plan.augment
    k, (height, width) = plan.k, plan.image_size
    n, per_element = plan.groups_per_batch, plan.groups_per_element
    log = corrupt_log or corrupt_images
    check_some_decode(plan.paths, _decodes)
    paths_t = tf.constant(plan.paths)
    contents = tf.constant([read_or_empty(x) for x in plan.paths]) if cache else None

    def plan_batch(batch):
        """Stream positions, labels, image indices and augmentation parameters of one batch's groups."""
        positions = (batch - first_batch) * n + tf.range(n, dtype=tf.int64)
        labels, images, params = tf.numpy_function(plan.groups, [positions], [tf.int32, tf.int64, tf.int32],
                                                   stateful=False)
        return positions, tf.ensure_shape(labels, [n]), tf.ensure_shape(images, [n, k]), \
            tf.ensure_shape(params, [n, k, 8])

    def load_group(position, label, images, params):
        """Decode and augment the K images of one group."""
        pictures = []
        for j in range(k):
            data = tf.gather(contents, images[j]) if cache else tf.io.read_file(tf.gather(paths_t, images[j]))
            picture = decode_image(data)
            pictures.append(_augment(picture, params[j], height, width) if augment
                            else resize_image(picture, height, width))
        return position, tf.stack(pictures), label

    def group_paths(start, stop):
        return tf.numpy_function(lambda *span: np.array(plan.paths_between(*span), object), [start, stop],
                                 tf.string, stateful=False)

    ds = tf.data.Dataset.counter(start=first_batch)
    ds = ds.map(plan_batch).unbatch()
    ds = ds.map(load_group, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = _skip_failures(ds, group_paths, log)
    ds = ds.map(_drop_position).batch(per_element, drop_remainder=True)
    ds = ds.map(lambda x, y: (tf.reshape(x, [per_element * k, height, width, 3]), tf.repeat(y, k)))
    return _on_available_cores(ds.prefetch(tf.data.AUTOTUNE))


def make_eval_dataset(
    samples: Sequence,
    *,
    image_size: tuple[int, int] = (256, 128),
    batch_size: int = 64,
    flip: bool = False,
    corrupt_log: CorruptImages | None = None,
) -> tf.data.Dataset:
    """Finite dataset of ``(images, {"person_id", "camera_id", "path"})`` in the order of ``samples``.

    Images are resized only (float32 0–255); flip=True mirrors them, for test-time flip averaging.
    An unreadable image is skipped together with its metadata and recorded in ``corrupt_log``.
    """
    height, width = check_size(image_size)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(samples) == 0:
        raise ValueError("make_eval_dataset: no samples")
    log = corrupt_log or corrupt_images
    paths = [str(s[0]) for s in samples]
    check_some_decode(paths, _decodes)
    n = len(paths)
    paths_t = tf.constant(paths)
    # A sentinel element after the last sample lets failures at the very end be recorded too.
    index = tf.range(n + 1, dtype=tf.int64)
    pids = tf.constant([int(s[1]) for s in samples] + [0], tf.int32)
    cams = tf.constant([int(s[2]) for s in samples] + [0], tf.int32)

    def load(i, pid, cam):
        def picture():
            image = resize_image(decode_image(tf.io.read_file(paths_t[i])), height, width)
            return tf.reverse(image, axis=[1]) if flip else image

        image = tf.cond(i < n, picture, lambda: tf.zeros([height, width, 3]))
        return i, image, {"person_id": pid, "camera_id": cam, "path": tf.gather(paths_t, tf.minimum(i, n - 1))}

    ds = tf.data.Dataset.from_tensor_slices((index, pids, cams))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = _skip_failures(ds, lambda first, stop: paths_t[first:stop], log)
    ds = ds.filter(lambda i, *_: i < n).map(_drop_position)
    return _on_available_cores(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE))


def load_images(samples: Sequence, image_size: Sequence[int], limit: int | None = None) -> np.ndarray:
    """Up to ``limit`` images (evenly spread over ``samples``: (path, person_id, camera_id) items or paths) as
    raw-pixel float32 (n, H, W, 3), read and resized as `make_eval_dataset` does."""
    samples = list(samples)
    if limit is not None:
        samples = [samples[i] for i in spread_indices(len(samples), limit)]
    samples = [s if isinstance(s, (tuple, list)) else (str(s), 0, 0) for s in samples]
    dataset = make_eval_dataset(samples, image_size=tuple(image_size), batch_size=32)
    return np.concatenate([images.numpy() for images, _ in dataset])


def _on_available_cores(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Size the pipeline's threads and tf.data's autotuning (the AUTOTUNE parallel maps and prefetch) to
    `available_cores`."""
    options, cores = tf.data.Options(), available_cores()
    options.threading.private_threadpool_size = cores
    options.autotune.cpu_budget = cores
    return ds.with_options(options)


# --------------------------------------------------------------------------- image ops


def decode_image(contents: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG/BMP/GIF bytes → (H, W, 3) uint8 RGB (grey and RGBA converted)."""
    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize_image(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Bilinear resize to float32 as PIL does it: antialiased when shrinking (when enlarging, plain
    bilinear gives the same values at a quarter of the cost)."""
    shape = tf.shape(image)
    image = tf.cast(image, tf.float32)  # resizing float input is faster than uint8
    return tf.cond((shape[0] > height) | (shape[1] > width),
                   lambda: tf.image.resize(image, [height, width], antialias=True),
                   lambda: tf.image.resize(image, [height, width]))


def _augment(image: tf.Tensor, params: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Apply one row of `rga_keras.data.sampling.augment_parameters` to a decoded uint8 image.

    The flip happens first, on the small decoded image: mirroring commutes with resizing, and with
    the random crop in distribution.
    """
    image = tf.cond(params[0] > 0, lambda: tf.reverse(image, axis=[1]), lambda: image)
    big_h, big_w = round(height * TRANSLATE_SCALE), round(width * TRANSLATE_SCALE)
    image = tf.cond(params[1] > 0,
                    lambda: tf.slice(resize_image(image, big_h, big_w), [params[2], params[3], 0], [height, width, 3]),
                    lambda: resize_image(image, height, width))
    top, left, h, w = params[4], params[5], params[6], params[7]
    # one in-place-style slice update: far cheaper on CPU than a full-image mask and select
    return tf.raw_ops.TensorStridedSliceUpdate(
        input=image, begin=tf.stack([top, left, 0]), end=tf.stack([top + h, left + w, 3]), strides=[1, 1, 1],
        value=tf.broadcast_to(tf.constant(IMAGENET_MEAN_255, tf.float32), tf.stack([h, w, 3])))


# --------------------------------------------------------------------------- helpers


def _skip_failures(ds: tf.data.Dataset, paths_between, log: CorruptImages) -> tf.data.Dataset:
    """Drop elements whose loading raised, and record the files of each dropped element.

    Elements are tuples whose first entry is their int64 position in the stream; a jump in it after
    ``ignore_errors`` means elements were dropped, and ``paths_between(first, stop)`` gives their files.
    """

    def record(paths):
        log.record_dropped(paths.numpy(), _decodes)
        return 0

    def step(last, element):
        position = element[0]
        done = tf.cond(position > last + 1,
                       lambda: tf.py_function(record, [paths_between(last + 1, position)], tf.int32),
                       lambda: tf.constant(0))
        with tf.control_dependencies([done]):
            position = tf.identity(position)
        return position, element

    return ds.ignore_errors().scan(tf.constant(-1, tf.int64), step)


def _drop_position(position, *rest):
    return rest


def _decodes(path: str) -> bool:
    try:
        decode_image(tf.io.read_file(path))
        return True
    except (tf.errors.OpError, ValueError):
        return False
