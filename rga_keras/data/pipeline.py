"""tf.data pipelines: identity-balanced P×K training batches with the paper's augmentations, and evaluation.

Training (docs/DESIGN.md §3): each batch holds P identities × K images, laid out identity by identity
(K images of the first identity, then K of the second, ...), so that when tf.distribute cuts the
global batch into contiguous per-replica slices every replica holds whole identities and the
batch-hard triplet loss sees all positives. Identities are visited in passes, each a fresh random
permutation cut into batches of P (the num_ids mod P left over sit the pass out); a pass is one epoch
(`steps_per_epoch`), as the paper's code counts it. An identity with
n ≥ K images takes K distinct ones per visit, the next chunk of its own image order, which is
reshuffled on every cycle of ⌊n/K⌋ visits (the n mod K left over sit that cycle out, as in the
usual PyTorch identity sampler); one with fewer than K images gives all of them, some twice.
All randomness is stateless and keyed on (seed, position in
the stream), so the output is identical for a given seed however many threads decode.

Images are float32 RGB in 0–255 (the model normalises internally). Augmentations: random translate
crop (resize to 1.125× and crop back, half of the time), horizontal flip, random erasing (Zhong et
al., AAAI 2020: p 0.5, area 2–40 %, aspect 0.3–1/0.3) filled with the ImageNet mean pixel, which the
model's normalisation maps to 0. Their parameters are drawn for a whole batch at once
(:func:`augment_parameters`); each image then costs a decode, a resize and two cheap ops.

A file that cannot be read or decoded never stops an epoch: the element holding it is skipped (the
whole K-image group in training, so batches stay whole), and the bad file is recorded in a
:class:`CorruptImages` log (by default the module's ``corrupt_images``).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from rga_keras.cores import available_cores
from rga_keras.data.samples import check_pk_batch, spread_indices

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
TRANSLATE_SCALE = 1.125
ERASE_ATTEMPTS = 10  # a candidate rectangle that does not fit is redrawn, up to this many times

_log = logging.getLogger(__name__)


class CorruptImages:
    """Thread-safe record of the image files the pipelines had to skip.

    count: how many times a bad image was met (a file met in several epochs counts each time).
    paths: the distinct bad files. unexplained: skipped elements in which no bad file was found.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.unexplained = 0
        self._paths: set[str] = set()

    @property
    def paths(self) -> list[str]:
        return sorted(self._paths)

    def summary(self) -> str:
        text = f"{self.count} corrupt image reads skipped ({len(self._paths)} distinct files)"
        return text + (f", {self.unexplained} elements dropped for other errors" if self.unexplained else "")

    def record_dropped(self, paths: Sequence[str | bytes]) -> None:
        """Find which of the files of a skipped element are unreadable, and record them."""
        bad = [p for p in (p.decode() if isinstance(p, bytes) else p for p in paths) if not _decodes(p)]
        with self._lock:
            self.count += len(bad)
            self.unexplained += not bad
            new = [p for p in bad if p not in self._paths]
            self._paths.update(new)
        for path in new:
            _log.warning("skipping unreadable image %s", path)


corrupt_images = CorruptImages()


def steps_per_epoch(samples: Sequence, num_ids_per_batch: int) -> int:
    """Batches per epoch as the paper's code counts them: one visit of every identity (its sampler yields
    K images per identity, cut into batches of P·K with the last partial batch dropped), which is
    one pass of `make_train_dataset`'s identity order. The paper's 600-epoch recipe assumes this length."""
    return max(1, len({s[1] for s in samples}) // num_ids_per_batch)


def check_enough_identities(samples: Sequence, num_ids_per_batch: int) -> None:
    """Refuse training samples that cannot fill one P×K batch (P = ``num_ids_per_batch`` distinct identities),
    e.g. an empty train split, saying what the split holds; callers check before building anything."""
    ids = {int(s[1]) for s in samples}
    if len(ids) < num_ids_per_batch:
        empty = " (no training images: is the dataset's train folder or list empty?)" if not samples else ""
        raise ValueError(f"the train split holds {len(ids)} identities in {len(samples)} images{empty}, but a batch "
                         f"needs sampler.num_ids_per_batch={num_ids_per_batch} distinct identities")


def make_train_dataset(
    samples: Sequence,
    *,
    num_ids_per_batch: int = 16,
    images_per_id: int = 4,
    image_size: tuple[int, int] = (256, 128),
    augment: bool = True,
    seed: int = 0,
    num_replicas: int = 1,
    cache: bool = False,
    translate_prob: float = 0.5,
    flip_prob: float = 0.5,
    erase_prob: float = 0.5,
    corrupt_log: CorruptImages | None = None,
    first_batch: int = 0,
    replicas: tuple[int, int] | None = None,
) -> tf.data.Dataset:
    """Infinite dataset of ``(images, labels)``: float32 (P·K, H, W, 3) in 0–255, int32 (P·K,).

    samples: (path, person_id, camera_id) items, e.g. ``ReidDataset.train``; labels are the person ids.
    num_replicas: the number of replicas the global batch will be split over; P must divide by it.
    replicas: ``(first, count)`` yields, instead of each global batch, the slices of replicas first, …,
    first + count − 1 in turn (P / num_replicas identities × K images each): one worker's input for
    ``strategy.distribute_datasets_from_function`` (see `rga_keras.training.distribute_pk_dataset`). Only
    that worker's images are read; the slices equal those of the global batch, augmentations included.
    cache: read every file once into memory (saves file-system reads; decoding still happens per use).
    augment=False gives plain resized images (the probabilities are then ignored).
    first_batch: start the stream there. A run resumed after ``n`` steps passes ``n`` and trains on the
    batches the uninterrupted run would have seen (the same ones, unless unreadable files were skipped
    before that point, which shifts the batch boundaries).
    """
    p, k = num_ids_per_batch, images_per_id
    height, width = _check_size(image_size)
    check_pk_batch(p, k, num_replicas)
    if not isinstance(first_batch, int) or first_batch < 0:
        raise ValueError(f"first_batch must be an integer >= 0, got {first_batch!r}")
    first, count = _check_replicas(replicas, num_replicas)
    share = p // num_replicas  # identities per replica slice
    per_batch = share if replicas else p  # identities per element of the output
    n = count * share  # groups this stream reads per global batch
    log = corrupt_log or corrupt_images
    paths, starts, counts, ids = _identity_table(samples)  # checks the samples' form first
    check_enough_identities(samples, p)
    _check_some_decode(paths)

    num_ids = len(ids)
    groups_per_pass = num_ids // p * p  # a pass never splits a batch, so a batch's identities are distinct
    paths_t = tf.constant(paths)
    contents = tf.constant([_read_or_empty(x) for x in paths]) if cache else None
    starts_t, counts_t, ids_t = (tf.constant(a, tf.int64) for a in (starts, counts, ids))
    seed = int(seed)

    def plan(groups):
        """Identity number and the K image indices of each group number in ``groups``."""
        passes = groups // groups_per_pass
        ident = _index_shuffle(groups % groups_per_pass, num_ids - 1, seed, 0, key=passes)
        n = tf.gather(counts_t, ident)[:, None]
        chunks = tf.maximum(n // k, 1)  # groups of K distinct images per cycle through the identity's images
        place = ((passes[:, None] % chunks) * k + tf.range(k, dtype=tf.int64)) % n
        order = _index_shuffle(place, n - 1, seed, 1, key=ident[:, None], cycle=passes[:, None] // chunks)
        return ident, tf.gather(starts_t, ident)[:, None] + order

    def group_of(position):
        """Group number of each stream position (0, 1, … over this stream's groups, from first_batch)."""
        return (first_batch + position // n) * p + first * share + position % n

    def plan_batch(batch):
        """Stream positions, identities, image indices and augmentation parameters of one batch's groups."""
        positions = (batch - first_batch) * n + tf.range(n, dtype=tf.int64)
        ident, images = plan(group_of(positions))
        u = tf.random.stateless_uniform([p * k, 5 + 4 * ERASE_ATTEMPTS],
                                        seed=tf.stack([tf.constant(seed, tf.int64), batch]))
        params = augment_parameters(u[first * share * k:(first + count) * share * k], (height, width),
                                    translate_prob, flip_prob, erase_prob)
        return positions, ident, images, tf.reshape(params, [n, k, 8])

    def load_group(group, ident, images, params):
        """Decode and augment the K images of one group."""
        pictures = []
        for j in range(k):
            data = tf.gather(contents, images[j]) if cache else tf.io.read_file(tf.gather(paths_t, images[j]))
            picture = decode_image(data)
            pictures.append(_augment(picture, params[j], height, width) if augment
                            else resize_image(picture, height, width))
        return group, tf.stack(pictures), tf.cast(tf.gather(ids_t, ident), tf.int32)

    def group_paths(start, stop):
        _, images = plan(group_of(tf.range(start, stop)))
        return tf.reshape(tf.gather(paths_t, images), [-1])

    ds = tf.data.Dataset.counter(start=first_batch)
    ds = ds.map(plan_batch).unbatch()
    ds = ds.map(load_group, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = _skip_failures(ds, group_paths, log)
    ds = ds.map(_drop_position).batch(per_batch, drop_remainder=True)
    ds = ds.map(lambda x, y: (tf.reshape(x, [per_batch * k, height, width, 3]), tf.repeat(y, k)))
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
    height, width = _check_size(image_size)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(samples) == 0:
        raise ValueError("make_eval_dataset: no samples")
    log = corrupt_log or corrupt_images
    paths = [str(s[0]) for s in samples]
    _check_some_decode(paths)
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


def augment_parameters(u: tf.Tensor, image_size: tuple[int, int], translate_prob: float = 0.5,
                       flip_prob: float = 0.5, erase_prob: float = 0.5) -> tf.Tensor:
    """The augmentation of N images, drawn from uniforms ``u`` (N, 5 + 4·ERASE_ATTEMPTS), vectorised.

    Returns int32 (N, 8): flip, translate, then the crop's top and left in the 1.125× image, then the
    erased rectangle's top, left, height and width (height and width 0 when not erasing).
    """
    height, width = image_size
    big_h, big_w = round(height * TRANSLATE_SCALE), round(width * TRANSLATE_SCALE)
    crop_top = tf.cast(u[:, 2] * (big_h - height + 1), tf.int32)
    crop_left = tf.cast(u[:, 3] * (big_w - width + 1), tf.int32)
    box = erasing_boxes(u[:, 5:], image_size) * tf.cast(u[:, 4:5] < erase_prob, tf.int32)
    flags = tf.cast(tf.stack([u[:, 0] < flip_prob, u[:, 1] < translate_prob], axis=1), tf.int32)
    return tf.concat([flags, crop_top[:, None], crop_left[:, None], box], axis=1)


def erasing_boxes(u: tf.Tensor, image_size: tuple[int, int], area: tuple[float, float] = (0.02, 0.4),
                  min_aspect: float = 0.3) -> tf.Tensor:
    """Random erasing rectangles (Zhong et al., AAAI 2020) from uniforms ``u`` (N, 4·attempts).

    Each attempt draws a target area in ``area`` × H·W and an aspect h/w in [min_aspect, 1/min_aspect];
    the first rectangle that fits strictly inside the image is placed uniformly at random. Returns
    int32 (N, 4): top, left, height, width; all 0 where no attempt fits.
    """
    height, width = image_size
    u = tf.reshape(u, [tf.shape(u)[0], -1, 4])
    target = height * width * (area[0] + (area[1] - area[0]) * u[..., 0])
    aspect = min_aspect + (1 / min_aspect - min_aspect) * u[..., 1]
    h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
    w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
    fits = (h < height) & (w < width)
    pick = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)[:, None]  # the first that fits

    def first(values):
        return tf.gather(values, pick, axis=1, batch_dims=1)[:, 0]

    h, w = first(h), first(w)
    top = tf.cast(first(u[..., 2]) * tf.cast(height - h + 1, tf.float32), tf.int32)
    left = tf.cast(first(u[..., 3]) * tf.cast(width - w + 1, tf.float32), tf.int32)
    return tf.stack([top, left, h, w], axis=1) * tf.cast(first(fits), tf.int32)[:, None]


def _augment(image: tf.Tensor, params: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Apply one row of :func:`augment_parameters` to a decoded uint8 image.

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


def _index_shuffle(index, max_index, seed: int, stream: int, key, cycle=0):
    """Position of each ``index`` in a pseudo-random permutation of [0, max_index]; one permutation
    per (seed, stream, key, cycle). Calls the raw op: tf.random.experimental.index_shuffle pads a
    batch of seeds along the wrong axis."""
    index = tf.cast(index, tf.int64)
    shape = tf.shape(index)

    def flat(value):
        return tf.reshape(tf.broadcast_to(tf.cast(value, tf.int64), shape), [-1])

    # The op's shuffles are weak when the first seed word is 0 (as a user seed of 0 would make it),
    # so offset it by the constant tf.random.experimental.index_shuffle puts there.
    seeds = tf.stack([flat(seed + 498247692), flat(key) * 2 + stream, flat(cycle)], axis=1)
    out = tf.raw_ops.RandomIndexShuffle(index=flat(index), seed=seeds, max_index=flat(max_index), rounds=4)
    return tf.reshape(out, shape)


def _skip_failures(ds: tf.data.Dataset, paths_between, log: CorruptImages) -> tf.data.Dataset:
    """Drop elements whose loading raised, and record the files of each dropped element.

    Elements are tuples whose first entry is their int64 position in the stream; a jump in it after
    ``ignore_errors`` means elements were dropped, and ``paths_between(first, stop)`` gives their files.
    """

    def record(paths):
        log.record_dropped(paths.numpy())
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


def _check_replicas(replicas, num_replicas: int) -> tuple[int, int]:
    """``(first, count)`` of the replica slices a training stream yields (all of them when None)."""
    if replicas is None:
        return 0, num_replicas
    try:
        first, count = (int(v) for v in replicas)
    except (TypeError, ValueError):
        raise ValueError(f"replicas must be (first, count), got {replicas!r}") from None
    if first < 0 or count < 1 or first + count > num_replicas:
        raise ValueError(f"replicas=({first}, {count}) must lie within the num_replicas={num_replicas} slices")
    return first, count


def _identity_table(samples: Sequence) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Paths sorted by identity (stable), with each identity's first index, image count and id."""
    if len(samples) == 0:
        raise ValueError("make_train_dataset: no samples")
    try:
        items = sorted(((int(s[1]), str(s[0])) for s in samples), key=lambda item: item[0])
    except (TypeError, ValueError, IndexError):
        raise ValueError("samples must be (path, person_id, camera_id) items with integer ids") from None
    pids = np.array([pid for pid, _ in items])
    if pids[0] < 0:
        raise ValueError(f"person ids must be >= 0 for training (found {pids[0]}); drop junk images first")
    ids, starts, counts = np.unique(pids, return_index=True, return_counts=True)
    return [path for _, path in items], starts, counts, ids


def _check_size(image_size) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (height, width), got {image_size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return height, width


def _decodes(path: str) -> bool:
    try:
        decode_image(tf.io.read_file(path))
        return True
    except (tf.errors.OpError, ValueError):
        return False


def _read_or_empty(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""  # fails to decode later, and is then skipped and recorded like any bad file


def _check_some_decode(paths: Sequence[str], tries: int = 8) -> None:
    """Fail early, with a clear message, when none of a few spread-out files decodes (wrong folder or
    format): the pipelines skip unreadable files, and would otherwise skip forever or yield nothing."""
    picks = sorted({round(i * (len(paths) - 1) / max(tries - 1, 1)) for i in range(min(tries, len(paths)))})
    if not any(_decodes(paths[i]) for i in picks):
        raise ValueError(f"none of {len(picks)} images tried could be read as JPEG/PNG/BMP/GIF "
                         f"(e.g. {paths[picks[0]]})")
