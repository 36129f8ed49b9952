"""Re-id retrieval metrics: CMC, mAP and mINP of a query set against a gallery.

Protocol (docs/DESIGN.md §4, the Market-1501 / torchreid convention):

* For each query, gallery images with the query's identity AND camera are removed ("junk"),
  as are gallery images whose identity is ``junk_id`` (Market-1501 uses -1 for junk boxes).
  Distractors (Market identity 0) stay in the gallery and simply never match.
* Queries left without any true match are skipped and counted in ``num_skipped_queries``.
* CMC: fraction of queries whose first true match is within rank k.
  AP is non-interpolated: the mean over the true matches of precision at their rank.
  INP (Ye et al., TPAMI 2021, "Deep Learning for Person Re-identification: A Survey and
  Outlook", eq. 7) is  #true matches / rank of the hardest (last) true match.
* Ties: gallery items at exactly the same float32 distance from a query have no order, so
  CMC, AP and INP are their exact expected values over all orders of the tied items (as if
  ties were broken uniformly at random; McSherry & Najork, ECIR 2008). Constant features
  therefore score at chance, not at whatever the gallery's file order gives. `rank_gallery`
  and `stable_argsort_rows`, which return an order, put tied items in gallery order.
* Features with NaN or Inf are an error; all-zero rows, a collapsed set (`rga_keras.evaluation.feature_check`)
  and features under which a query sees every gallery item at the same distance give a
  `DegenerateFeaturesWarning`.

Everything is NumPy and chunked over queries: a chunk of the (query × gallery) distance
matrix is computed, ranked and reduced to per-query numbers before the next chunk, so an
MSMT17-sized problem never holds the full 11,659 × 82,161 matrix.
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from typing import Any, Iterator

import numpy as np

from rga_keras.evaluation.distances import (CHUNK_ENTRIES, as_features, check_finite, check_metric, distance_from_dot,
                                            feature_norms, key_columns, sort_keys)
from rga_keras.evaluation.feature_check import DegenerateFeaturesWarning, check_features
from rga_keras.evaluation.reranking import k_reciprocal_rerank




def _as_labels(x: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array with {n} entries (one per image), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def rank_gallery(
    distances: np.ndarray,
    query_ids: np.ndarray,
    query_cams: np.ndarray,
    gallery_ids: np.ndarray,
    gallery_cams: np.ndarray,
    junk_id: int | None = -1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank the gallery for a block of queries under the protocol of this module.

    Returns ``order`` (q, g): gallery indices, best first (ties → lower index first);
    ``kept`` (q, g): False where ``order`` points to a junk item (same id and camera, or
    ``junk_id``); ``match`` (q, g): kept true matches.
    """
    keys = _ranked_keys(distances, query_ids, query_cams, gallery_ids, gallery_cams, junk_id)
    kept, match = (keys & np.uint64(1)).astype(bool), (keys & np.uint64(2)).astype(bool)
    return key_columns(keys), kept, match


def _ranked_keys(distances, query_ids, query_cams, gallery_ids, gallery_cams, junk_id) -> np.ndarray:
    """Sorted `sort_keys` of a block, payload bit 0 = kept, bit 1 = kept true match."""
    same_id = query_ids[:, None] == gallery_ids[None, :]
    junk = same_id & (query_cams[:, None] == gallery_cams[None, :])
    if junk_id is not None:
        junk |= gallery_ids == junk_id
    np.logical_not(junk, out=junk)  # now: kept
    flags = junk.view(np.uint8) | ((same_id & junk).view(np.uint8) << 1)  # bit 0 kept, bit 1 match
    keys = sort_keys(distances, flags)
    keys.sort(axis=1)
    return keys


def _query_stats(distances, query_ids, query_cams, gallery_ids, gallery_cams, junk_id):
    """Per query of a block: number of true matches; the tie group holding the first match as (kept items
    ranked before it, its kept items, its matches); expected AP; expected INP; whether every gallery item
    lies at one distance. Expectations are over the orders of tied items (module docstring)."""
    check_finite(distances, "distances", "distances")
    keys = _ranked_keys(distances, query_ids, query_cams, gallery_ids, gallery_cams, junk_id)
    kept, match = (keys & np.uint64(1)).astype(bool), (keys & np.uint64(2)).astype(bool)
    # The high 32 bits of a key order like its distance: a strided view of them, no copy.
    high = keys.view(np.uint32)[:, 1 if sys.byteorder == "little" else 0 :: 2]
    n, g = distances.shape
    rank = np.cumsum(kept, axis=1, dtype=np.int32)  # 1-based rank among kept items, per position
    hits = np.cumsum(match, axis=1, dtype=np.int32)
    num_match = hits[:, -1].astype(np.int64)
    rows, cols = np.nonzero(match)  # row-major: each row's matches in rank order
    # Each match's tie group (positions with its distance), as (kept before, kept in it, matches before, in it);
    # a match without a tied neighbour is a group of one.
    group = np.stack([rank[rows, cols] - 1, np.ones_like(cols), hits[rows, cols] - 1, np.ones_like(cols)])
    tied = np.flatnonzero(_tied_neighbour(high, rows, cols))
    if tied.size:
        group[:, tied] = _tie_groups(high, kept, match, rank, hits, rows[tied], cols[tied])
    before, size, ahead, count = group
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, g + 1))])
    precision = _expected_precision(before, size, ahead, count, harmonic)
    ap = np.bincount(rows, precision, minlength=n) / np.maximum(num_match, 1)
    has = num_match > 0
    first_match = np.cumsum(num_match)[has] - num_match[has]  # index in rows/cols of each query's first match
    last_match = first_match + num_match[has] - 1
    first = np.zeros((3, n), np.int64)  # kept before the first match's group, its size, its matches
    first[1:] = 1
    first[:, has] = group[[0, 1, 3]][:, first_match]
    inp = np.zeros(n)
    inp[has] = num_match[has] * _expected_inverse_last(*group[[0, 1, 3]][:, last_match])
    single = (high[:, 0] == high[:, -1]) & (g > 1)  # rows are sorted: first equals last only if all tie
    return num_match, first, ap, inp, single


def _tied_neighbour(high: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Whether the sorted item at each (row, col) has the same distance as the item before or after it."""
    g = high.shape[1]
    value = high[rows, cols]
    left = (cols > 0) & (high[rows, np.maximum(cols - 1, 0)] == value)
    return left | ((cols < g - 1) & (high[rows, np.minimum(cols + 1, g - 1)] == value))


def _tie_groups(high, kept, match, rank, hits, rows, cols) -> np.ndarray:
    """(kept before, kept in it, matches before, matches in it) of the tie group of each (row, col)."""
    lo, hi = np.empty_like(cols), np.empty_like(cols)
    bounds = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:]):  # rows with tied matches: usually few, all when features collapse
        line, value = high[rows[a]], high[rows[a], cols[a:b]]
        lo[a:b], hi[a:b] = np.searchsorted(line, value, "left"), np.searchsorted(line, value, "right") - 1
    before = rank[rows, lo] - kept[rows, lo]
    ahead = hits[rows, lo] - match[rows, lo]
    return np.stack([before, rank[rows, hi] - before, ahead, hits[rows, hi] - ahead])


def _expected_precision(before, size, ahead, count, harmonic):
    """Expected precision at a match in a tie group of n kept items with r matches, after b kept items of
    which h match. The match sits at a uniform position y ∈ [0, n) with on average y (r-1)/(n-1) other
    matches ahead of it, so the expectation is Σ_y (h + 1 + y c) / (b + 1 + y) / n with c = (r-1)/(n-1),
    a difference of harmonic numbers H. Without ties (n = 1) it is the plain (h + 1) / (b + 1)."""
    s0 = harmonic[before + size] - harmonic[before]  # Σ_y 1 / (b + 1 + y)
    c = (count - 1) / np.maximum(size - 1, 1)
    return ((ahead + 1) * s0 + c * (size - (before + 1) * s0)) / size


def _expected_inverse_last(before, size, count):
    """E[1 / rank of the last match] when it is the last of r matches placed uniformly in a tie group of n
    after b kept items: it sits at m ∈ [r, n] of the group with P(m) = C(m-1, r-1) / C(n, r)."""
    out = 1.0 / (before + size)  # r == n (a group of one included): the group's last item
    for i in np.flatnonzero(count < size):
        b, n, r = int(before[i]), int(size[i]), int(count[i])
        m = np.arange(r, n + 1)
        log_weight = np.concatenate([[0.0], np.cumsum(np.log((m[1:] - 1) / (m[1:] - r)))])  # ∝ C(m-1, r-1)
        weight = np.exp(log_weight - log_weight.max())
        out[i] = np.sum(weight / (b + m)) / weight.sum()
    return out


def _within(first: np.ndarray, ranks: int) -> np.ndarray:
    """P(first match at rank ≤ k) for k = 1..ranks, per query, from its first-match tie group (b, n, r):
    the first of r matches placed uniformly in n slots is beyond slot j with probability C(n-r, j) / C(n, j)."""
    before, size, count = (a[:, None].astype(np.float64) for a in first)
    i = np.arange(ranks)
    survive = np.cumprod(np.clip((size - count - i) / np.maximum(size - i, 1), 0.0, 1.0), axis=1)
    reach = np.arange(1, ranks + 1) - before  # how far rank k reaches into the group
    beyond = np.take_along_axis(survive, np.clip(reach - 1, 0, ranks - 1).astype(np.int64), axis=1)
    return np.where(reach >= 1, 1.0 - beyond, 0.0)


def _summarise(stats: list, max_rank: int) -> dict:
    num_match = np.concatenate([s[0] for s in stats])
    first = np.concatenate([s[1] for s in stats], axis=1)
    ap, inp, single = (np.concatenate([s[i] for s in stats]) for i in (2, 3, 4))
    valid = num_match > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            "no query has a true match in the gallery once same-identity-same-camera "
            "(and junk) images are removed; check the ids and camera ids"
        )
    if single.any():
        warnings.warn(f"{int(single.sum())} of {single.size} queries see every gallery image at the same "
                      "distance (degenerate features, e.g. all equal: a collapsed model); their metrics are "
                      "at chance level", DegenerateFeaturesWarning, stacklevel=3)
    within = _within(first[:, valid], max(max_rank, 10)).mean(axis=0)
    return {
        "cmc": within[:max_rank],
        "rank1": float(within[0]),
        "rank5": float(within[4]),
        "rank10": float(within[9]),
        "mAP": float(np.mean(ap[valid])),
        "mINP": float(np.mean(inp[valid])),
        "num_valid_queries": num_valid,
        "num_skipped_queries": int(valid.size - num_valid),
    }


def _check_common(num_query, num_gallery, query_ids, gallery_ids, query_cams, gallery_cams, max_rank, chunk_size):
    if int(max_rank) < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of queries or None, got {chunk_size}")
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ENTRIES // num_gallery)
    return (
        _as_labels(query_ids, num_query, "query_ids"),
        _as_labels(gallery_ids, num_gallery, "gallery_ids"),
        _as_labels(query_cams, num_query, "query_cams"),
        _as_labels(gallery_cams, num_gallery, "gallery_cams"),
        int(chunk_size),
    )


def evaluate_distances(
    distances: Any,
    query_ids: Any,
    gallery_ids: Any,
    query_cams: Any,
    gallery_cams: Any,
    *,
    max_rank: int = 50,
    chunk_size: int | None = None,
    junk_id: int | None = -1,
) -> dict:
    """Metrics from a precomputed (num_query, num_gallery) distance matrix; see :func:`evaluate`."""
    distances = np.asarray(distances)
    if distances.ndim != 2:
        raise ValueError(f"distances must be 2-D (num_query, num_gallery), got shape {distances.shape}")
    nq, ng = distances.shape
    qid, gid, qcam, gcam, chunk = _check_common(nq, ng, query_ids, gallery_ids, query_cams, gallery_cams,
                                                max_rank, chunk_size)
    stats = [
        _query_stats(distances[s : s + chunk], qid[s : s + chunk], qcam[s : s + chunk], gid, gcam, junk_id)
        for s in range(0, nq, chunk)
    ]
    return _summarise(stats, int(max_rank))


def _distance_chunks(query, gallery, metric, chunk) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, distance block) over query chunks, gallery norms computed once."""
    qn, gn = feature_norms(query, metric), feature_norms(gallery, metric)[None, :]
    for s in range(0, query.shape[0], chunk):
        block = query[s : s + chunk] @ gallery.T
        yield s, distance_from_dot(block, qn[s : s + chunk, None], gn, metric)


def evaluate(
    query_features: Any,
    gallery_features: Any,
    query_ids: Any,
    gallery_ids: Any,
    query_cams: Any,
    gallery_cams: Any,
    *,
    metric: str = "cosine",
    rerank: bool = False,
    max_rank: int = 50,
    chunk_size: int | None = None,
    junk_id: int | None = -1,
) -> dict:
    """Rank-k, CMC, mAP and mINP of a query set against a gallery (protocol in the module docstring).

    Features are (n, d) arrays (anything ``np.asarray`` takes, TF tensors included); ids and
    cameras are 1-D integer arrays. ``chunk_size`` is the number of queries per block
    (default: about 8 Mi distance entries per block). ``rerank=True`` first replaces the
    distances by k-reciprocal re-ranking (:func:`rga_keras.evaluation.reranking.k_reciprocal_rerank`,
    default k1=20, k2=6, λ=0.3), which needs the dense (q, g) result in memory.

    Returns ``{"cmc": (max_rank,) array, "rank1", "rank5", "rank10", "mAP", "mINP"`` (floats in
    [0, 1]), ``"num_valid_queries", "num_skipped_queries"}``.
    """
    check_metric(metric)
    query = as_features(query_features, "query_features")
    gallery = as_features(gallery_features, "gallery_features")
    for name, features in (("query_features", query), ("gallery_features", gallery)):
        check_rankable(features, name)
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query and gallery feature dimensions differ: {query.shape[1]} vs {gallery.shape[1]}"
        )
    if rerank:
        distances = k_reciprocal_rerank(query, gallery, metric=metric)
        return evaluate_distances(distances, query_ids, gallery_ids, query_cams, gallery_cams,
                                  max_rank=max_rank, chunk_size=chunk_size, junk_id=junk_id)
    nq, ng = query.shape[0], gallery.shape[0]
    qid, gid, qcam, gcam, chunk = _check_common(nq, ng, query_ids, gallery_ids, query_cams, gallery_cams,
                                                max_rank, chunk_size)
    stats = [
        _query_stats(block, qid[s : s + chunk], qcam[s : s + chunk], gid, gcam, junk_id)
        for s, block in _distance_chunks(query, gallery, metric, chunk)
    ]
    return _summarise(stats, int(max_rank))


def check_rankable(features: np.ndarray, name: str) -> None:
    """Refuse rows holding NaN or Inf; warn about all-zero rows and collapse (`check_features`)."""
    found = check_features(features)
    if len(found.nonfinite):
        only_nonfinite = dataclasses.replace(found, zero=found.zero[:0], collapsed=False)
        raise ValueError(f"{name}: {only_nonfinite.describe('rows')}; these features cannot be ranked "
                         "(a diverged model or broken input)")
    if not found.ok:
        warnings.warn(f"{name}: {found.describe('rows')}; their metrics are at chance level",
                      DegenerateFeaturesWarning, stacklevel=3)
