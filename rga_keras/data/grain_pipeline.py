"""Grain pipelines: the P×K training stream and the evaluation stream without TensorFlow (docs/DATA.md).

The training stream follows the plan of `rga_keras.data.sampling`, as the tf.data pipeline does, and gives
the same batches for a seed: the same identities and images in the same layout, the same augmentations, the
same pixels up to float32 rounding (`rga_keras.data.images`), and the same rule for unreadable files (the
K-image group holding one is skipped, the next group takes its place, the file is recorded in a
`CorruptImages`). Keras' ``fit`` accepts the result on every backend; on JAX it is the input of `rga-train`.

How it runs: worker processes (Grain's ``mp_prefetch``, one per available core by default) each build whole
batches — read, decode and augment the batch's groups into one array in shared memory — and the main
process takes them in stream order without copying them. Only after a group was skipped does the main process
copy: the batches from then on are cut from the readable groups that follow. Each group's content depends on
the seed and its position alone, so the output is the same for any number of workers.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import flags
from grain.python import SharedMemoryArray

from rga_keras.cores import available_cores
from rga_keras.data.corrupt import CorruptImages, check_some_decode, corrupt_images, read_or_empty
from rga_keras.data.images import augment_image, decode_image, decodes, resize_image
from rga_keras.data.sampling import PKPlan, check_size


def make_grain_train_dataset(samples: Sequence, *, cache: bool = False, corrupt_log: CorruptImages | None = None,
                             workers: int | None = None, **plan: Any) -> grain.IterDataset:
    """Endless ``grain.IterDataset`` of ``(images, labels)``: float32 (P·K, H, W, 3) in 0–255, int32 (P·K,).

    The arguments are `rga_keras.data.make_train_dataset`'s, with the same meaning, except ``replicas``:
    ``(first, count)`` makes each element the slices of replicas first … first + count − 1 together, in
    order (count · P / num_replicas identities), the share of the global batch one JAX process feeds to its
    devices. ``workers``: the processes that build the batches (default: one per available core; 0 builds
    them in this process).
    """
    plan = PKPlan(samples, **plan)
    check_some_decode(plan.paths, decodes)
    workers = _worker_count(workers)
    chunks = grain.MapDataset.range(0, sys.maxsize).map(_LoadBatch(plan, _Reader(plan.paths, cache), workers > 0))
    return _Regroup(_in_workers(chunks, workers), plan, corrupt_log or corrupt_images)


def make_grain_eval_dataset(
    samples: Sequence,
    *,
    image_size: tuple[int, int] = (256, 128),
    batch_size: int = 64,
    flip: bool = False,
    corrupt_log: CorruptImages | None = None,
    workers: int | None = None,
) -> grain.IterDataset:
    """Finite ``grain.IterDataset`` of ``(images, {"person_id", "camera_id", "path"})`` in the order of
    ``samples``, as `rga_keras.data.make_eval_dataset` gives (``path`` as str here): resized images, mirrored
    with flip=True. An unreadable image is skipped with its metadata and recorded in ``corrupt_log``; its
    batch is one image shorter."""
    size = check_size(image_size)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(samples) == 0:
        raise ValueError("make_eval_dataset: no samples")
    paths = [str(s[0]) for s in samples]
    check_some_decode(paths, decodes)
    table = (paths, np.array([int(s[1]) for s in samples], np.int32), np.array([int(s[2]) for s in samples], np.int32))
    workers = _worker_count(workers)
    batches = grain.MapDataset.range(-(-len(paths) // batch_size)).map(
        _LoadEvalBatch(paths, size, batch_size, flip, workers > 0))
    return _in_workers(batches, workers).map(_DropUnreadable(table, corrupt_log or corrupt_images))


def _worker_count(workers: int | None) -> int:
    workers = available_cores() if workers is None else workers
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    return workers


def _in_workers(ds: grain.MapDataset, workers: int) -> grain.IterDataset:
    """``ds`` (one element per batch) built by ``workers`` processes, each one batch at a time with one more
    ready, and taken back in order; with 0 workers, one batch at a time in this process."""
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if workers == 0:
        return ds
    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags as it starts workers; outside an absl app
        flags.FLAGS.mark_as_parsed()  # nobody parsed them, and their defaults are what a program here wants
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=1),
                          worker_init_fn=_exit_with_parent)


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Run in each worker as it starts: the worker ends as soon as the process that started it is gone. Grain
    stops its workers when the main process exits or closes the stream, but not after a SIGKILL (kill -9, the
    out-of-memory killer), which would leave them idle and holding their memory for good."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), name="exit-with-parent", daemon=True).start()


def _empty(shape: tuple[int, ...], shared: bool) -> np.ndarray:
    """A float32 array to build a batch in: in shared memory when a worker builds it for the main process."""
    return SharedMemoryArray(shape, np.float32) if shared else np.empty(shape, np.float32)


class _Reader:
    """A file's bytes by index: from disk, or from memory with ``cache`` (read once; unreadable → b"")."""

    def __init__(self, paths: Sequence[str], cache: bool = False) -> None:
        self.paths = list(paths)
        self.contents = [read_or_empty(p) for p in paths] if cache else None

    def __call__(self, index: int) -> bytes:
        if self.contents is not None:
            return self.contents[index]
        with open(self.paths[index], "rb") as handle:
            return handle.read()


def _decoded(read: _Reader, indices) -> list[np.ndarray] | None:
    """The decoded images of the files ``indices``, or None when one of them cannot be read or decoded."""
    try:
        return [decode_image(read(int(i))) for i in indices]
    except Exception:  # noqa: BLE001 - Pillow's decoders raise many kinds (OSError, SyntaxError, ValueError, …)
        return None


class _LoadBatch:
    """Batch number (from the stream's first) → its n groups: ``{"images": float32 (n, K, H, W, 3), "labels":
    int32 (n,), "readable": bool (n,)}``; a group whose files do not all read and decode is marked unreadable."""

    def __init__(self, plan: PKPlan, read: _Reader, shared: bool) -> None:
        self.plan, self.read, self.shared = plan, read, shared

    def __call__(self, batch: int) -> dict:
        plan, n = self.plan, self.plan.groups_per_batch
        height, width = plan.image_size
        images = _empty((n, plan.k, height, width, 3), self.shared)
        labels, readable = np.zeros(n, np.int32), np.ones(n, bool)
        for i in range(n):
            labels[i], indices, params = plan.group(batch * n + i)
            decoded = _decoded(self.read, indices)
            if decoded is None:
                readable[i] = False
                continue
            for j, (image, row) in enumerate(zip(decoded, params)):
                augment_image(image, row, images[i, j])
        return {"images": images, "labels": labels, "readable": readable}


class _Regroup(grain.IterDataset):
    """The main process's stage of the training stream: each worker batch as it is while every group read;
    after a skipped group (its files recorded in ``log``), batches of the readable groups that follow."""

    def __init__(self, parent: grain.IterDataset, plan: PKPlan, log: CorruptImages) -> None:
        super().__init__(parent)
        self.plan, self.log = plan, log

    def __iter__(self) -> grain.DatasetIterator:
        return _RegroupIterator(self._parent.__iter__(), self.plan, self.log)


class _RegroupIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, plan: PKPlan, log: CorruptImages) -> None:
        super().__init__(parent)
        self.plan, self.log = plan, log
        self.batch = 0  # the worker batch to take next
        self.carry: list[tuple[np.ndarray, np.ndarray]] = []  # readable groups not yet yielded, after a skip

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        n, k = self.plan.groups_per_batch, self.plan.k
        while sum(len(labels) for _, labels in self.carry) < n:
            chunk = next(self._parent)
            images, labels, readable = chunk["images"], chunk["labels"], chunk["readable"]
            for i in np.flatnonzero(~readable):
                position = self.batch * n + int(i)
                self.log.record_dropped(self.plan.paths_between(position, position + 1), decodes)
            self.batch += 1
            if readable.all() and not self.carry:
                return images.reshape(-1, *images.shape[2:]), np.repeat(labels, k)  # the worker's batch itself
            self.carry.append((images[readable], labels[readable]))
        images, labels = (np.concatenate(parts) for parts in zip(*self.carry))
        self.carry = [(images[n:], labels[n:])]
        return images[:n].reshape(-1, *images.shape[2:]), np.repeat(labels[:n], k)

    def get_state(self) -> dict[str, Any]:
        raise NotImplementedError("a P×K stream resumes by its first_batch, not from an iterator state")

    def set_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError("a P×K stream resumes by its first_batch, not from an iterator state")


class _LoadEvalBatch:
    """Batch number → ``{"images": float32 (b, H, W, 3), "index": int64 (b,), "readable": bool (b,)}`` of the
    samples batch·batch_size …, resized (and mirrored with ``flip``)."""

    def __init__(self, paths: list[str], size: tuple[int, int], batch_size: int, flip: bool, shared: bool) -> None:
        self.read, self.size, self.batch_size, self.flip, self.shared = _Reader(paths), size, batch_size, flip, shared

    def __call__(self, batch: int) -> dict:
        index = np.arange(batch * self.batch_size, min((batch + 1) * self.batch_size, len(self.read.paths)))
        images = _empty((len(index), *self.size, 3), self.shared)
        readable = np.ones(len(index), bool)
        for i, sample in enumerate(index):
            decoded = _decoded(self.read, [sample])
            if decoded is None:
                readable[i] = False
                continue
            image = resize_image(decoded[0], *self.size)
            images[i] = image[:, ::-1] if self.flip else image
        return {"images": images, "index": index, "readable": readable}


class _DropUnreadable:
    """The main process's stage of the evaluation stream: ``(images, metadata)`` of a batch's readable
    samples, the unreadable ones recorded in ``log``."""

    def __init__(self, table: tuple[list[str], np.ndarray, np.ndarray], log: CorruptImages) -> None:
        self.table, self.log = table, log

    def __call__(self, chunk: dict) -> tuple[np.ndarray, dict]:
        paths, pids, cams = self.table
        images, index, readable = chunk["images"], chunk["index"], chunk["readable"]
        if not readable.all():
            self.log.record_dropped([paths[i] for i in index[~readable]], decodes)
            images, index = images[readable], index[readable]
        return images, {"person_id": pids[index], "camera_id": cams[index],
                        "path": np.array([paths[i] for i in index])}
