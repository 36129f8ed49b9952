"""Distances between re-id features, and the row-wise order of a distance matrix with its tie rule.

The retrieval metrics (`rga_keras.evaluation.metrics`), re-ranking (`rga_keras.evaluation.reranking`) and search
(`rga_keras.retrieval`) build on these; everything is NumPy.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rga_keras.checks import check_choice

METRICS = ("cosine", "euclidean")
# Distance entries handled per query chunk. 8 Mi entries keep a chunk's temporaries (distances,
# sort keys, gathered ids, cumulative counts; ~32 bytes per entry) near 256 MiB, while the
# chunk's matrix product stays large enough for BLAS (~100 query rows against MSMT17's gallery).
CHUNK_ENTRIES = 1 << 23
_EPS = 1e-12


def check_metric(metric: str) -> None:
    """A ValueError unless ``metric`` is one of `METRICS`."""
    check_choice("metric", metric, METRICS)



def as_features(x: Any, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, d) array, with a clear error otherwise."""
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (num_images, dim), got shape {arr.shape}")
    return arr



def check_finite(x: np.ndarray, name: str, what: str = "features") -> None:
    """Refuse rows holding NaN or Inf, naming how many there are and the first."""
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} of {len(x)} rows hold NaN or Inf values (first: row "
                         f"{int(np.argmax(bad))}); these {what} cannot be ranked (a diverged model or broken input)")



def feature_norms(x: np.ndarray, metric: str) -> np.ndarray:
    """Per-row norm the distance needs: L2 norm (cosine) or squared L2 norm (euclidean)."""
    sq = np.einsum("ij,ij->i", x, x)
    return np.sqrt(sq) if metric == "cosine" else sq



def distance_from_dot(dot: np.ndarray, norm_a: np.ndarray, norm_b: np.ndarray, metric: str) -> np.ndarray:
    """Turn dot products a·b (any broadcastable shapes) into distances, in place on ``dot``.

    cosine: 1 - a·b / (|a| |b|), clipped to [0, 2];  euclidean: sqrt(max(|a|² + |b|² - 2 a·b, 0)).
    """
    if metric == "cosine":
        dot /= np.maximum(norm_a, _EPS)
        dot /= np.maximum(norm_b, _EPS)
        np.subtract(1.0, dot, out=dot)
        np.clip(dot, 0.0, 2.0, out=dot)
    else:
        dot *= -2.0
        dot += norm_a
        dot += norm_b
        np.maximum(dot, 0.0, out=dot)
        np.sqrt(dot, out=dot)
    return dot



def pairwise_distance(a: Any, b: Any, metric: str = "cosine") -> np.ndarray:
    """(n, d) and (m, d) features → (n, m) float32 distances ("cosine" or "euclidean").

    One matrix product; no normalised copy of ``b`` is made.
    """
    check_metric(metric)
    a, b = as_features(a, "a"), as_features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: a has {a.shape[1]}, b has {b.shape[1]}")
    dot = a @ b.T
    return distance_from_dot(dot, feature_norms(a, metric)[:, None], feature_norms(b, metric)[None, :], metric)



_PAYLOAD_BITS = 2  # low bits of a sort key that carry per-entry flags (kept, match)



_MAX_COLUMNS = 1 << (32 - _PAYLOAD_BITS)



def sort_keys(dist: np.ndarray, payload: np.ndarray | None = None) -> np.ndarray:
    """One unique uint64 key per entry whose order is (distance, column):
    [order-preserving float32 bits | column | 2-bit payload], high to low bits.

    NumPy's vectorised integer sort orders these about 10× faster than
    ``argsort(kind="stable")``, the column makes ties deterministic, and the payload rides along
    so the sorted flags need no gather.
    """
    if dist.shape[1] > _MAX_COLUMNS:
        raise ValueError(f"at most {_MAX_COLUMNS} gallery items are supported, got {dist.shape[1]}")
    bits = (np.asarray(dist, dtype=np.float32) + np.float32(0.0)).view(np.int32)  # a copy; -0.0 becomes 0.0
    flip = bits >> 31  # -1 where the float is negative, else 0
    flip |= np.int32(-(1 << 31))  # all bits (negative: reverse their order) or the sign bit (positive)
    bits ^= flip
    keys = bits.view(np.uint32).astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= np.arange(dist.shape[1], dtype=np.uint64) << np.uint64(_PAYLOAD_BITS)
    if payload is not None:
        keys |= payload
    return keys



def key_columns(keys: np.ndarray) -> np.ndarray:
    """Column indices from sort keys, in place (the keys are consumed)."""
    keys >>= np.uint64(_PAYLOAD_BITS)
    keys &= np.uint64(_MAX_COLUMNS - 1)
    return keys.view(np.int64)



def stable_argsort_rows(dist: np.ndarray, k: int | None = None) -> np.ndarray:
    """Row-wise argsort of float32 distances; equal distances keep column order.

    With ``k`` only the first ``k`` columns of that order are computed (a partition of the
    unique keys, which respects the tie rule too, then a sort of the ``k`` survivors).
    """
    keys = sort_keys(dist)
    if k is not None and k < dist.shape[1]:
        keys.partition(k - 1, axis=1)
        keys = keys[:, :k]
    keys.sort(axis=1)
    return key_columns(keys)

