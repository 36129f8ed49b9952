"""Re-id retrieval metrics (CMC, mAP, mINP), distances and feature extraction.

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
* Features with NaN or Inf are an error; features under which a query sees every gallery
  item at the same distance (e.g. all equal: a collapsed model) give a `DegenerateFeaturesWarning`.

Everything is NumPy and chunked over queries: a chunk of the (query × gallery) distance
matrix is computed, ranked and reduced to per-query numbers before the next chunk, so an
MSMT17-sized problem never holds the full 11,659 × 82,161 matrix.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Iterator

import numpy as np

METRICS = ("cosine", "euclidean")
# Distance entries handled per query chunk. 8 Mi entries keep a chunk's temporaries (distances,
# sort keys, gathered ids, cumulative counts; ~32 bytes per entry) near 256 MiB, while the
# chunk's matrix product stays large enough for BLAS (~100 query rows against MSMT17's gallery).
_CHUNK_ENTRIES = 1 << 23
_EPS = 1e-12


class DegenerateFeaturesWarning(UserWarning):
    """Features under which distances carry no ranking information (metrics are then at chance)."""


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def as_features(x: Any, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, d) array, with a clear error otherwise."""
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (num_images, dim), got shape {arr.shape}")
    return arr


def _check_finite(x: np.ndarray, name: str, what: str = "features") -> None:
    """Refuse rows holding NaN or Inf, naming how many there are and the first."""
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} of {len(x)} rows hold NaN or Inf values (first: row "
                         f"{int(np.argmax(bad))}); these {what} cannot be ranked (a diverged model or broken input)")


def _as_labels(x: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array with {n} entries (one per image), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


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
    _check_metric(metric)
    a, b = as_features(a, "a"), as_features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: a has {a.shape[1]}, b has {b.shape[1]}")
    dot = a @ b.T
    return distance_from_dot(dot, feature_norms(a, metric)[:, None], feature_norms(b, metric)[None, :], metric)


_PAYLOAD_BITS = 2  # low bits of a sort key that carry per-entry flags (kept, match)
_MAX_COLUMNS = 1 << (32 - _PAYLOAD_BITS)


def _sort_keys(dist: np.ndarray, payload: np.ndarray | None = None) -> np.ndarray:
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


def _key_columns(keys: np.ndarray) -> np.ndarray:
    """Column indices from sort keys, in place (the keys are consumed)."""
    keys >>= np.uint64(_PAYLOAD_BITS)
    keys &= np.uint64(_MAX_COLUMNS - 1)
    return keys.view(np.int64)


def stable_argsort_rows(dist: np.ndarray, k: int | None = None) -> np.ndarray:
    """Row-wise argsort of float32 distances; equal distances keep column order.

    With ``k`` only the first ``k`` columns of that order are computed (a partition of the
    unique keys, which respects the tie rule too, then a sort of the ``k`` survivors).
    """
    keys = _sort_keys(dist)
    if k is not None and k < dist.shape[1]:
        keys.partition(k - 1, axis=1)
        keys = keys[:, :k]
    keys.sort(axis=1)
    return _key_columns(keys)


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
    return _key_columns(keys), kept, match


def _ranked_keys(distances, query_ids, query_cams, gallery_ids, gallery_cams, junk_id) -> np.ndarray:
    """Sorted `_sort_keys` of a block, payload bit 0 = kept, bit 1 = kept true match."""
    same_id = query_ids[:, None] == gallery_ids[None, :]
    junk = same_id & (query_cams[:, None] == gallery_cams[None, :])
    if junk_id is not None:
        junk |= gallery_ids == junk_id
    np.logical_not(junk, out=junk)  # now: kept
    flags = junk.view(np.uint8) | ((same_id & junk).view(np.uint8) << 1)  # bit 0 kept, bit 1 match
    keys = _sort_keys(distances, flags)
    keys.sort(axis=1)
    return keys


def _query_stats(distances, query_ids, query_cams, gallery_ids, gallery_cams, junk_id):
    """Per query of a block: number of true matches; the tie group holding the first match as (kept items
    ranked before it, its kept items, its matches); expected AP; expected INP; whether every gallery item
    lies at one distance. Expectations are over the orders of tied items (module docstring)."""
    _check_finite(distances, "distances", "distances")
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
        chunk_size = max(1, _CHUNK_ENTRIES // num_gallery)
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
    distances by k-reciprocal re-ranking (:func:`rga_keras.reranking.k_reciprocal_rerank`,
    default k1=20, k2=6, λ=0.3), which needs the dense (q, g) result in memory.

    Returns ``{"cmc": (max_rank,) array, "rank1", "rank5", "rank10", "mAP", "mINP"`` (floats in
    [0, 1]), ``"num_valid_queries", "num_skipped_queries"}``.
    """
    _check_metric(metric)
    query = as_features(query_features, "query_features")
    gallery = as_features(gallery_features, "gallery_features")
    _check_finite(query, "query_features")
    _check_finite(gallery, "gallery_features")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query and gallery feature dimensions differ: {query.shape[1]} vs {gallery.shape[1]}"
        )
    if rerank:
        from rga_keras.reranking import k_reciprocal_rerank

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


def extract_features(model: Any, dataset: Any, *, flip: bool = False, verbose: int = 1,
                     num_batches: int | None = None) -> tuple[np.ndarray | dict[str, np.ndarray], dict]:
    """Run an inference model (images → embeddings) over a ``tf.data`` dataset.

    ``dataset`` yields ``(images, {"person_id", "camera_id", "path"})`` batches. A model with a dict of
    embedding outputs (e.g. ``{"after_bn": ..., "before_bn": ...}``) gives a dict of features keyed the same,
    all from one forward pass per batch. With ``flip=True`` the feature is the mean of the image's and its
    horizontal mirror's (``tf.image.flip_left_right`` on the batch), the usual flip test-time augmentation.
    A ``keras.utils.Progbar`` shows progress (``verbose=0`` hides it); its length is the dataset's
    cardinality or, where that is unknown (e.g. after the pipeline's corrupt-image filter), ``num_batches``.

    Returns ``(features (n, d) float32 (or a dict of them), {"person_id": int64 (n,), "camera_id": int64 (n,),
    "path": str (n,)})``.
    """
    import keras
    import tensorflow as tf

    spec = getattr(dataset, "element_spec", None)
    if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict)):
        raise TypeError(
            "dataset must be a tf.data.Dataset yielding (images, {'person_id', 'camera_id', 'path'}), "
            f"got element_spec {spec!r}"
        )
    missing = {"person_id", "camera_id", "path"} - set(spec[1])
    if missing:
        raise ValueError(f"dataset metadata lacks keys {sorted(missing)}; it has {sorted(spec[1])}")
    if len(spec[0].shape) != 4:
        raise ValueError(f"dataset images must be batched (batch, height, width, channels), got {spec[0].shape}")

    cardinality = int(dataset.cardinality())
    progbar = keras.utils.Progbar(cardinality if cardinality >= 0 else num_batches, verbose=verbose,
                                  unit_name="batch")

    def embed(images) -> dict:
        out = model.predict_on_batch(images)  # Keras compiles and caches the inference step
        named = out if isinstance(out, dict) else {None: out}
        for value in named.values():
            if not (isinstance(value, np.ndarray) and value.ndim == 2):
                raise ValueError(
                    "model must map a batch of images to (batch, dim) embedding tensors (one, or a dict of them), "
                    f"got {type(value).__name__} {getattr(value, 'shape', '')}"
                )
        return {k: v.astype(np.float32, copy=False) for k, v in named.items()}

    batches, ids, cams, paths = [], [], [], []
    for images, meta in dataset:
        feature = embed(images)
        if flip:
            mirror = embed(tf.image.flip_left_right(images))
            feature = {k: (v + mirror[k]) / 2.0 for k, v in feature.items()}
        batches.append(feature)
        ids.append(meta["person_id"].numpy())
        cams.append(meta["camera_id"].numpy())
        paths.extend(p.decode() if isinstance(p, bytes) else str(p) for p in meta["path"].numpy())
        progbar.add(1)
    progbar.update(len(batches), finalize=True)
    if not batches:
        raise ValueError("dataset is empty: no images to extract features from")
    meta = {
        "person_id": np.concatenate(ids).astype(np.int64),
        "camera_id": np.concatenate(cams).astype(np.int64),
        "path": np.asarray(paths, dtype=str),
    }
    features = {k: np.concatenate([batch[k] for batch in batches]) for k in batches[0]}
    return features.get(None, features), meta  # a single-output model: the array itself
