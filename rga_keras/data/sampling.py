"""The rules of the training input, in NumPy: which images each P×K batch holds and how each is augmented.

Both input pipelines follow this one plan — tf.data (`rga_keras.data.pipeline`) and Grain
(`rga_keras.data.grain_pipeline`) — and differ only in how they decode and transform the pixels, so for a
given seed they yield the same batches (docs/DATA.md, docs/DESIGN.md §3).

A stream is cut into *groups*: K images of one identity. Global batch b holds groups b·P … b·P + P − 1, laid
out identity by identity, so that contiguous per-replica slices of it hold whole identities (the batch-hard
triplet loss then sees all positives on every replica). Identities are visited in passes, each a fresh
random permutation cut into batches of P (the num_ids mod P left over sit the pass out); a pass is one
epoch (`steps_per_epoch`), as the paper's code counts it. An identity with n ≥ K images takes K distinct
ones per visit, the next chunk of its own image order, which is reshuffled on every cycle of ⌊n/K⌋ visits
(the n mod K left over sit that cycle out, as in the usual PyTorch identity sampler); one with fewer than K
images gives all of them, some twice. Augmentations (paper §4.1): with probability 0.5 each, a translate
crop (resize to 1.125× and crop back at a random offset), a horizontal flip, and random erasing (Zhong et al.,
AAAI 2020: area 2–40 %, aspect 0.3–1/0.3) filled with the ImageNet mean pixel, which the model's
normalisation maps to 0.

Every draw comes from a generator seeded with (seed, what is drawn, its position): the identity order of
pass q from (seed, 0, q), the image order of identity i in cycle c from (seed, 1, i, c), the augmentation of
group g from (seed, 2, g). So a group's content depends on the seed and its number alone, whatever reads it,
in which thread or process, and a stream can start at any batch (a resumed run) or hold only some replicas'
slices (one worker of several) and still agree with the whole stream.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from rga_keras.data.samples import check_pk_batch

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
TRANSLATE_SCALE = 1.125
ERASE_ATTEMPTS = 10  # a candidate rectangle that does not fit is redrawn, up to this many times
NUM_UNIFORMS = 5 + 4 * ERASE_ATTEMPTS  # per image: flip, translate, crop top, crop left, erase, 4 per attempt
_IDENTITIES, _IMAGES, _AUGMENT = 0, 1, 2  # the generators' streams


def steps_per_epoch(samples: Sequence, num_ids_per_batch: int) -> int:
    """Batches per epoch as the paper's code counts them: one visit of every identity (its sampler yields
    K images per identity, cut into batches of P·K with the last partial batch dropped), which is
    one pass of the identity order. The paper's 600-epoch recipe assumes this length."""
    return max(1, len({s[1] for s in samples}) // num_ids_per_batch)


def check_enough_identities(samples: Sequence, num_ids_per_batch: int) -> None:
    """Refuse training samples that cannot fill one P×K batch (P = ``num_ids_per_batch`` distinct identities),
    e.g. an empty train split, saying what the split holds; callers check before building anything."""
    ids = {int(s[1]) for s in samples}
    if len(ids) < num_ids_per_batch:
        empty = " (no training images: is the dataset's train folder or list empty?)" if not samples else ""
        raise ValueError(f"the train split holds {len(ids)} identities in {len(samples)} images{empty}, but a batch "
                         f"needs sampler.num_ids_per_batch={num_ids_per_batch} distinct identities")


def check_size(image_size) -> tuple[int, int]:
    """``(height, width)`` of a positive image size, or a ValueError saying what was found."""
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (height, width), got {image_size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return height, width


class PKPlan:
    """The groups of one P×K training stream: for each position in the stream, the identity, the K image
    indices (into `paths`) and the K rows of augmentation parameters (`augment_parameters`).

    samples: (path, person_id, camera_id) items; labels are the person ids.
    num_replicas: the replicas the global batch will be split over; P must divide by it.
    replicas: ``(first, count)``: the stream holds, instead of each global batch, the slices of replicas
    first … first + count − 1 (P / num_replicas identities each), e.g. one worker's share.
    first_batch: the stream starts at that global batch (a resumed run).
    augment=False: every parameter row is zero (plain resized images; the probabilities are then ignored).
    translate_prob, flip_prob, erase_prob: each augmentation's probability.
    """

    def __init__(self, samples: Sequence, *, num_ids_per_batch: int = 16, images_per_id: int = 4,
                 image_size: tuple[int, int] = (256, 128), augment: bool = True, seed: int = 0,
                 num_replicas: int = 1, replicas: tuple[int, int] | None = None, first_batch: int = 0,
                 translate_prob: float = 0.5, flip_prob: float = 0.5, erase_prob: float = 0.5) -> None:
        p, k = num_ids_per_batch, images_per_id
        self.image_size = check_size(image_size)
        check_pk_batch(p, k, num_replicas)
        if not isinstance(first_batch, int) or first_batch < 0:
            raise ValueError(f"first_batch must be an integer >= 0, got {first_batch!r}")
        first, count = _check_replicas(replicas, num_replicas)
        self.paths, self._starts, self._counts, self._ids = _identity_table(samples)  # checks the samples' form
        check_enough_identities(samples, p)
        self.p, self.k, self.first_batch = p, k, first_batch
        share = p // num_replicas  # identities per replica slice
        self.groups_per_element = share if replicas else p  # groups in each element the pipelines yield
        self.groups_per_batch = count * share  # groups this stream holds of each global batch
        self._offset = first * share  # the first of them within the global batch
        self._groups_per_pass = len(self._ids) // p * p  # a pass never splits a batch: its identities differ
        self._seed = int(seed) % 2 ** 64
        self.augment = augment
        self._probabilities = (translate_prob, flip_prob, erase_prob)

    def group_number(self, position: int) -> int:
        """The global group number of a position in this stream (0, 1, … from ``first_batch`` on)."""
        n = self.groups_per_batch
        return (self.first_batch + position // n) * self.p + self._offset + position % n

    def group(self, position: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Label (person id), image indices int64 (K,) and augmentation parameters int32 (K, 8) of a position."""
        g = self.group_number(int(position))
        visit, slot = divmod(g, self._groups_per_pass)  # the pass is the identity's visit number too
        ident = int(_identity_order(self._seed, len(self._ids), visit)[slot])
        n = int(self._counts[ident])
        chunks = max(n // self.k, 1)  # groups of K distinct images per cycle through the identity's images
        place = ((visit % chunks) * self.k + np.arange(self.k)) % n
        order = _generator(self._seed, _IMAGES, ident, visit // chunks).permutation(n)[place]
        if self.augment:
            u = _generator(self._seed, _AUGMENT, g).random((self.k, NUM_UNIFORMS))
            params = augment_parameters(u, self.image_size, *self._probabilities)
        else:
            params = np.zeros((self.k, 8), np.int32)
        return int(self._ids[ident]), self._starts[ident] + order, params

    def groups(self, positions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`group` of each of ``positions``, stacked: labels int32 (n,), image indices int64 (n, K), parameters
        int32 (n, K, 8)."""
        labels, images, params = zip(*(self.group(p) for p in np.asarray(positions).reshape(-1)))
        return (np.array(labels, np.int32), np.stack(images).astype(np.int64), np.stack(params).astype(np.int32))

    def paths_between(self, start: int, stop: int) -> list[str]:
        """The image files of the groups at positions start … stop − 1 (to find which of them are unreadable)."""
        return [self.paths[i] for position in range(int(start), int(stop)) for i in self.group(position)[1]]


def augment_parameters(u: np.ndarray, image_size: tuple[int, int], translate_prob: float = 0.5,
                       flip_prob: float = 0.5, erase_prob: float = 0.5) -> np.ndarray:
    """The augmentation of N images, drawn from uniforms ``u`` (N, `NUM_UNIFORMS`) in [0, 1).

    Returns int32 (N, 8): flip, translate, then the crop's top and left in the 1.125× image, then the
    erased rectangle's top, left, height and width (height and width 0 when not erasing).
    """
    height, width = image_size
    big_h, big_w = round(height * TRANSLATE_SCALE), round(width * TRANSLATE_SCALE)
    crop_top = (u[:, 2] * (big_h - height + 1)).astype(np.int32)
    crop_left = (u[:, 3] * (big_w - width + 1)).astype(np.int32)
    box = erasing_boxes(u[:, 5:], image_size) * (u[:, 4:5] < erase_prob)
    flags = np.stack([u[:, 0] < flip_prob, u[:, 1] < translate_prob], axis=1)
    return np.concatenate([flags, crop_top[:, None], crop_left[:, None], box], axis=1).astype(np.int32)


def erasing_boxes(u: np.ndarray, image_size: tuple[int, int], area: tuple[float, float] = (0.02, 0.4),
                  min_aspect: float = 0.3) -> np.ndarray:
    """Random erasing rectangles (Zhong et al., AAAI 2020) from uniforms ``u`` (N, 4·attempts).

    Each attempt draws a target area in ``area`` × H·W and an aspect h/w in [min_aspect, 1/min_aspect];
    the first rectangle that fits strictly inside the image is placed uniformly at random. Returns
    int32 (N, 4): top, left, height, width; all 0 where no attempt fits.
    """
    height, width = image_size
    u = u.reshape(len(u), -1, 4)
    target = height * width * (area[0] + (area[1] - area[0]) * u[..., 0])
    aspect = min_aspect + (1 / min_aspect - min_aspect) * u[..., 1]
    h = np.round(np.sqrt(target * aspect)).astype(np.int64)
    w = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (h < height) & (w < width)
    rows, pick = np.arange(len(u)), fits.argmax(axis=1)  # the first attempt that fits
    h, w, found = h[rows, pick], w[rows, pick], fits[rows, pick]
    top = (u[rows, pick, 2] * (height - h + 1)).astype(np.int64)
    left = (u[rows, pick, 3] * (width - w + 1)).astype(np.int64)
    return (np.stack([top, left, h, w], axis=1) * found[:, None]).astype(np.int32)


def _generator(seed: int, stream: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *key])


@functools.lru_cache(maxsize=8)
def _identity_order(seed: int, num_ids: int, visit: int) -> np.ndarray:
    """The identities in the order pass ``visit`` visits them (cached: a stream reads each pass P·K at a time)."""
    return _generator(seed, _IDENTITIES, visit).permutation(num_ids)


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
