"""Exact cosine top-k search of a gallery, chunked over queries so the similarity block stays small.

For each chunk of queries: one float32 matrix product against the whole gallery, then a partial sort of
each row (`rga_keras.evaluation.stable_argsort_rows`: unique 64-bit keys, so equal similarities keep gallery
order, as a stable sort would). The chunk is sized so that the block and the sort's temporaries (about
`BYTES_PER_ENTRY` bytes per query-gallery pair) stay within ``max_block_bytes`` (256 MiB by default): an
MSMT17-size gallery (82,161 × 2,048) never needs its 3,368 × 82,161 similarity matrix (1.1 GB) in memory.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from rga_keras.evaluation.distances import as_features, feature_norms, stable_argsort_rows
from rga_keras.evaluation.feature_check import DegenerateFeaturesWarning, check_features
from rga_keras.evaluation.reranking import k_reciprocal_rerank

MAX_BLOCK_BYTES = 256 * 2**20
# Per query-gallery pair in a chunk: the float32 similarity, and in stable_argsort_rows two int32 copies and
# the uint64 sort keys (tracemalloc: 20 bytes, plus some slack; tests/test_retrieval_search.py checks the bound).
BYTES_PER_ENTRY = 24
RERANK_MAX_ENTRIES = 1 << 26  # re-ranking holds the dense (query, gallery) matrix: at most 256 MiB of it
_EPS = 1e-12


def unit_rows(x: np.ndarray) -> np.ndarray:
    """The rows of ``x`` (float32) scaled to unit L2 norm (all-zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(feature_norms(x, "cosine"), _EPS)[:, None]


def search(
    query: Any,
    gallery: Any,
    top_k: int = 10,
    *,
    rerank: bool = False,
    max_block_bytes: int = MAX_BLOCK_BYTES,
    query_names: Sequence[str] | None = None,
    gallery_names: Sequence[str] | None = None,
    left_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` gallery rows most similar (cosine) to each query row, best first.

    query (q, d), gallery (g, d): features, normalised here (rga-embed's are already). Returns ``indices``
    int64 (q, k) and ``similarities`` float32 (q, k), k = min(top_k, usable gallery rows); equal similarities
    rank in gallery order. ``rerank=True`` orders by k-reciprocal re-ranking
    (`rga_keras.evaluation.reranking.k_reciprocal_rerank`, cosine) instead, which needs the dense (q, g) matrix:
    allowed up to `RERANK_MAX_ENTRIES` pairs; the similarities returned are still the cosine ones.

    Gallery rows that cannot be ranked (NaN/Inf or all zero: `rga_keras.evaluation.check_features`) are left
    out with a `DegenerateFeaturesWarning` naming how many and the first (by ``gallery_names`` if given); a
    gallery with no usable row, or a collapsed one, and query rows that cannot be ranked, are a ValueError
    (``query_names`` name the first). ``left_out``: the gallery rows to leave out, found already by
    `gallery_rows_left_out` (a gallery searched many times is checked once).
    """
    query, gallery = as_features(query, "query"), as_features(gallery, "gallery")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query and gallery dimensions differ: {query.shape[1]} vs {gallery.shape[1]}")
    if int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    found = check_features(query)
    if len(found.unusable):
        raise ValueError(f"{found.describe('query rows', query_names)}; they cannot be searched with")
    bad = gallery_rows_left_out(gallery, gallery_names) if left_out is None else np.asarray(left_out, np.int64)
    query = unit_rows(query)
    nq, ng = len(query), len(gallery)
    k = min(int(top_k), ng - len(bad))
    scale = negative_inverse_norms(gallery)
    reranked = _rerank_order(query, gallery, k, bad) if rerank else None
    rows = max(1, int(max_block_bytes) // (BYTES_PER_ENTRY * ng))
    indices, similarities = np.empty((nq, k), np.int64), np.empty((nq, k), np.float32)
    for start in range(0, nq, rows):
        stop = start + rows
        indices[start:stop], similarities[start:stop] = _block_top(
            query[start:stop], gallery, scale, bad, k, None if reranked is None else reranked[start:stop])
    return indices, similarities


def negative_inverse_norms(gallery: np.ndarray) -> np.ndarray:
    """-1 / |row| per gallery row: dot products with unit queries times this are minus the cosine similarity,
    so that ascending order is best first (no (g, d) temporary)."""
    return -1.0 / np.maximum(feature_norms(gallery, "cosine"), _EPS)


def gallery_rows_left_out(gallery: Any, names: Sequence[str] | None = None, stacklevel: int = 3) -> np.ndarray:
    """The indices of the gallery rows to leave out of searches (NaN/Inf or all zero), warned about once here;
    ValueError when none is usable or the rows have collapsed. Chunked: a memory-mapped gallery is not copied."""
    found = check_features(gallery)
    if found.collapsed or len(found.unusable) == found.rows:
        raise ValueError(f"{found.describe('gallery rows', names)}; nothing to search (re-embed the gallery "
                         "with a working model)")
    if len(found.unusable):
        warnings.warn(f"{found.describe('gallery rows', names)}; left out of the search", DegenerateFeaturesWarning,
                      stacklevel=stacklevel)
    return found.unusable


def _block_top(query: np.ndarray, gallery: np.ndarray, scale: np.ndarray, bad: np.ndarray, k: int,
               order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k indices and similarities of a chunk of queries (or their similarities at ``order``), the ``bad``
    gallery rows ranked last (past k). A function of its own so that the chunk's block and sort keys are freed
    before the next chunk's are made."""
    with np.errstate(invalid="ignore"):  # NaN rows of the gallery: replaced below
        block = query @ gallery.T
        block *= scale  # minus the cosine similarity: ascending order is best first
    block[:, bad] = np.inf
    top = stable_argsort_rows(block, k) if order is None else order
    return top, -np.take_along_axis(block, top, axis=1)


def _rerank_order(query: np.ndarray, gallery: np.ndarray, k: int, bad: np.ndarray) -> np.ndarray:
    """The first ``k`` gallery indices per query by k-reciprocal re-ranked distance (``bad`` rows left out)."""
    if len(query) * len(gallery) > RERANK_MAX_ENTRIES:
        raise ValueError(f"re-ranking holds the dense {len(query):,} x {len(gallery):,} distance matrix, more "
                         f"than the {RERANK_MAX_ENTRIES:,} entries allowed; search without re-ranking, or with fewer "
                         "queries")
    kept = np.setdiff1d(np.arange(len(gallery)), bad)
    return kept[stable_argsort_rows(k_reciprocal_rerank(query, gallery[kept], metric="cosine"), k)]
