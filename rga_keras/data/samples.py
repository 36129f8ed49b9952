"""The sample type of every re-id dataset, the dataset record, and the rule of a P×K training batch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

SPLITS = ("train", "query", "gallery")


class DatasetWarning(UserWarning):
    """A dataset loaded, but something about it deserves the user's attention."""


class Sample(NamedTuple):
    """One image: its file, person identity and camera."""

    path: str
    person_id: int
    camera_id: int



@dataclass(frozen=True)
class ReidDataset:
    """A re-id dataset: training samples (ids 0..num_train_ids-1), query and gallery samples; ``sources``: the
    file or folder each split was read from, for messages."""

    name: str
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    num_train_ids: int
    notes: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)

    def require(self, splits: tuple[str, ...], purpose: str) -> None:
        """A ValueError naming the first empty split of ``splits`` and where it was read from, said before the
        work of ``purpose`` (e.g. "evaluation") that needs them, not by the pipeline after a model load."""
        for split in splits:
            if not getattr(self, split):
                where = f" ({self.sources[split]} gives no usable image)" if split in self.sources else ""
                raise ValueError(f"{self.name}: the {split} split is empty{where}; {purpose} needs "
                                 f"{' and '.join(splits)} images")

    def summary(self) -> str:
        """One line: identities and images per split, then the notes (count check, skipped files)."""
        parts = ["{} {} ids/{} images".format(s, *count_split(getattr(self, s))) for s in SPLITS]
        notes = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"{self.name}: " + ", ".join(parts) + notes



def count_split(samples: list[Sample]) -> tuple[int, int]:
    """(identities, images) of a split."""
    return len({s.person_id for s in samples}), len(samples)


def check_pk_batch(num_ids_per_batch: int, images_per_id: int, num_replicas: int = 1) -> None:
    """The P×K rule: P identities × K images, P and K positive integers, and every replica's share of the global
    batch whole identities (the batch-hard triplet loss mines inside each share), so P is a multiple of the
    replicas. A ValueError saying what was found otherwise."""
    p, k = num_ids_per_batch, images_per_id
    for name, value in (("num_ids_per_batch", p), ("images_per_id", k), ("num_replicas", num_replicas)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if p % num_replicas:
        raise ValueError(f"the global batch of {p * k} images (P={p} identities × K={k}) cannot be split into "
                         f"{num_replicas} replicas holding whole identities: P must be a multiple of {num_replicas} "
                         f"(the global batch a multiple of replicas × K = {num_replicas * k})")


def spread_indices(n: int, k: int) -> np.ndarray:
    """min(k, n) indices spread evenly over 0..n-1, first and last included (the queries a picture shows,
    the calibration images an export uses)."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))
