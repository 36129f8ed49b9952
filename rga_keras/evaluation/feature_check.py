"""The one check of a set of embeddings, wherever features are made, searched, evaluated or exported.

Three faults make embeddings useless without any error of their own: rows holding NaN or Inf (a diverged
or damaged model), all-zero rows (no direction: every cosine with them is 0) and a collapsed set (every row
the same vector: retrieval at chance). `check_features` finds them, a chunk of rows at a time, so that a
gallery larger than memory (a memory map) is checked without an (n, d) temporary; each user decides what
to do: rga-embed and rga-export refuse, rga-search leaves bad gallery rows out with a warning, the metrics
refuse non-finite rows and warn about the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

CHUNK_BYTES = 64 * 2**20  # rows checked at a time: their boolean temporaries stay near this size
MIN_COLLAPSE_ROWS = 4  # fewer identical rows may well be copies of one picture
COLLAPSE_TOLERANCE = 1e-6  # relative to max(1, the largest magnitude), as `DivergenceGuard` judges a collapse


class DegenerateFeaturesWarning(UserWarning):
    """Features under which distances carry no ranking information (metrics are then at chance)."""


@dataclass(frozen=True)
class FeatureCheck:
    """What `check_features` found in ``rows`` embeddings: the indices of the rows holding NaN/Inf
    (``nonfinite``) and of the all-zero ones (``zero``), and whether the other rows have ``collapsed``."""

    rows: int
    nonfinite: np.ndarray
    zero: np.ndarray
    collapsed: bool

    @property
    def unusable(self) -> np.ndarray:
        """Sorted indices of the rows that cannot be ranked (non-finite or zero)."""
        return np.union1d(self.nonfinite, self.zero)

    @property
    def ok(self) -> bool:
        return not (len(self.nonfinite) or len(self.zero) or self.collapsed)

    def describe(self, what: str, names: Sequence[str] | None = None) -> str:
        """The faults in one line: ``what`` names the rows ("embeddings of the images", "gallery rows"),
        ``names`` (one per row, e.g. the image paths) names the first faulty row of each kind."""
        def first(rows: np.ndarray) -> str:
            row = int(rows[0])
            return f"row {row}" + (f", {names[row]}" if names is not None else "")

        parts = []
        if len(self.nonfinite):
            parts.append(f"{len(self.nonfinite)} of {self.rows} {what} hold NaN or Inf values (first: "
                         f"{first(self.nonfinite)})")
        if len(self.zero):
            parts.append(f"{len(self.zero)} of {self.rows} {what} are all zero (first: {first(self.zero)})")
        if self.collapsed:
            parts.append(f"all {self.rows - len(self.unusable)} usable {what} are the same vector (a collapsed model, "
                         "or every image the same picture): retrieval would be at chance")
        return "; ".join(parts)


def check_features(x: Any) -> FeatureCheck:
    """Check the (n, d) embeddings ``x`` (any array, a `numpy.memmap` included) for non-finite rows, all-zero
    rows and collapse (at least `MIN_COLLAPSE_ROWS` usable rows, all within `COLLAPSE_TOLERANCE` of one another)."""
    x = x if isinstance(x, np.ndarray) else np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array (num_images, dim), got shape {x.shape}")
    n, d = x.shape
    step = max(1, CHUNK_BYTES // max(1, d * max(4, x.dtype.itemsize)))
    nonfinite, zero = [], []
    low = high = None
    usable, scale = 0, 0.0
    for start in range(0, n, step):
        block = np.asarray(x[start:start + step], np.float32)
        finite = np.isfinite(block).all(axis=1)
        empty = finite & ~block.any(axis=1)
        nonfinite.append(start + np.flatnonzero(~finite))
        zero.append(start + np.flatnonzero(empty))
        good = block[finite & ~empty]
        if len(good):
            usable += len(good)
            scale = max(scale, float(np.abs(good).max()))
            low = good.min(axis=0) if low is None else np.minimum(low, good.min(axis=0))
            high = good.max(axis=0) if high is None else np.maximum(high, good.max(axis=0))
    collapsed = usable >= MIN_COLLAPSE_ROWS and float((high - low).max()) <= COLLAPSE_TOLERANCE * max(1.0, scale)
    return FeatureCheck(n, _indices(nonfinite), _indices(zero), collapsed)


def _indices(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def refuse_faulty(x: Any, what: str, names: Sequence[str] | None = None, hint: str = "") -> FeatureCheck:
    """`check_features`, and a ValueError saying what was found (and ``hint``: what to do) unless the
    embeddings are all usable; returns the check."""
    found = check_features(x)
    if not found.ok:
        raise ValueError(found.describe(what, names) + (f"; {hint}" if hint else ""))
    return found
