"""One interface over every kind of gallery: a features file searched exactly (`FileGallery`, here), the same
file through a faiss index (`rga_keras.retrieval.index.IndexedGallery`) and a Milvus collection
(`rga_keras.retrieval.milvus.MilvusGallery`).

A gallery holds L2-normalised embeddings under int64 ids (a features file's row numbers; Milvus' primary
keys), what made them (``source``: `rga_keras.retrieval.features.SOURCE_KEYS`) and, per id, a `Crop`: the
image path and, where known, camera, time and identity. Every search returns `Hits` ranked the same way:
cosine similarity, best first, equal similarities in id order. The approximate backends find a shortlist
and re-rank it exactly (`rerank_shortlist`), so what they return are exact similarities of stored vectors;
only which vectors make the shortlist is approximate.
"""
from __future__ import annotations

import abc
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rga_keras.evaluation.distances import stable_argsort_rows
from rga_keras.evaluation.feature_check import check_features
from rga_keras.retrieval.crops import Crop, crops_of
from rga_keras.retrieval.features import FeatureSet, check_same_source, open_features, write_feature_chunks
from rga_keras.retrieval.topk import gallery_rows_left_out, negative_inverse_norms, search, unit_rows

RERANK_ROWS = 1 << 11  # shortlisted vectors gathered at once when re-ranking (16 MiB at 2,048-d)


@dataclass(frozen=True)
class Hits:
    """Search results: ``ids`` int64 (q, k) and cosine ``similarities`` float32 (q, k), best first."""

    ids: np.ndarray
    similarities: np.ndarray


class Gallery(abc.ABC):
    """A searchable set of embeddings (see the module doc). ``name`` says where it is, ``method`` which search
    runs (as programs print them); ``source`` is what made the embeddings."""

    name: str
    source: dict
    method: str

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """The embeddings' dimension."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """How many embeddings the gallery holds."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line: where the gallery is, its size and what made it."""

    @abc.abstractmethod
    def search(self, query: np.ndarray, top_k: int = 10) -> Hits:
        """The ``top_k`` most similar embeddings per query row (cosine; ties in id order)."""

    @abc.abstractmethod
    def ids(self, start: int, count: int) -> list[int]:
        """Up to ``count`` ids from position ``start`` of the gallery's order (for browsing it)."""

    @abc.abstractmethod
    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored embeddings (len(ids), dim) float32 of ``ids``; KeyError naming an unknown id."""

    @abc.abstractmethod
    def crops(self, ids: Sequence[int]) -> list[Crop]:
        """The `Crop` of each id."""

    @abc.abstractmethod
    def known_paths(self, paths: Sequence[str]) -> set[str]:
        """Which of ``paths`` the gallery holds already (appending skips them)."""

    @abc.abstractmethod
    def append(self, data: FeatureSet) -> None:
        """Add embeddings made by the gallery's model (ValueError otherwise)."""

    def check_query(self, query: np.ndarray, what: str = "the query") -> np.ndarray:
        """``query`` as unit float32 rows (q, dim); ValueError for another dimension, an empty query, or query
        rows that cannot be ranked with (NaN/Inf or all zero: `rga_keras.evaluation.check_features`)."""
        query = np.asarray(query, np.float32)
        if query.ndim != 2 or not len(query):
            raise ValueError(f"{what} must be a non-empty (n, {self.dim}) array, got shape {query.shape}")
        if query.shape[1] != self.dim:
            raise ValueError(f"query and gallery dimensions differ: {query.shape[1]} vs {self.dim}")
        found = check_features(query)
        if len(found.unusable):
            raise ValueError(f"{what}: {found.describe('query rows')}; they cannot be searched with")
        return unit_rows(query)

    def check_appended(self, data: FeatureSet) -> None:
        """ValueError unless ``data`` can join this gallery: the same model and settings, the same dimension."""
        check_same_source(self.source, data.source, "the data to append", against=self.name)
        if data.features.ndim != 2 or data.features.shape[1] != self.dim:
            raise ValueError(f"the data to append is {data.features.shape[1]}-d, {self.name} is {self.dim}-d")

    def close(self) -> None:
        """Release files and connections (a closed gallery cannot be searched)."""

    def __enter__(self) -> "Gallery":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_top_k(top_k: int) -> int:
    """``top_k`` as an int >= 1 (ValueError otherwise)."""
    if int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    return int(top_k)


def rerank_shortlist(query: np.ndarray, candidates: np.ndarray, fetch: Callable[[np.ndarray], np.ndarray],
                     top_k: int) -> Hits:
    """Exact top-``top_k`` of each query among its shortlisted ``candidates`` (q, r) int64, -1 = none.

    ``fetch(ids)`` returns the stored vectors of sorted unique ids. Each query is compared with its own
    candidates only (one matrix-vector product per query, not the whole block), by the cosine similarity
    `rga_keras.retrieval.search` computes — equal up to float32 rounding, the same products summed in another
    order — and equal similarities rank in id order, so a shortlist holding the exact top-k gives the exact
    search's result. Rows with fewer than ``top_k`` candidates are padded with id -1 and similarity -inf.
    """
    query = unit_rows(query)
    padding = np.iinfo(np.int64).max
    ordered = np.sort(np.where(candidates < 0, padding, candidates), axis=1)  # id order: ties resolve by it
    valid = ordered != padding
    unique, columns = np.unique(ordered[valid], return_inverse=True)
    distances = np.full(ordered.shape, np.inf, np.float32)
    if len(unique):
        vectors = fetch(unique)
        positions = np.zeros(ordered.shape, np.int64)
        positions[valid] = columns
        dots = np.matmul(vectors[positions], query[:, :, None])[:, :, 0]  # (q, r): each query's candidates
        distances[valid] = (dots * negative_inverse_norms(vectors)[positions])[valid]
    k = min(top_k, ordered.shape[1])
    top = stable_argsort_rows(distances, k)
    ids, similarities = np.take_along_axis(ordered, top, axis=1), -np.take_along_axis(distances, top, axis=1)
    missing = ids == padding
    ids[missing], similarities[missing] = -1, -np.inf
    if k < top_k:
        ids = np.pad(ids, ((0, 0), (0, top_k - k)), constant_values=-1)
        similarities = np.pad(similarities, ((0, 0), (0, top_k - k)), constant_values=-np.inf)
    return Hits(ids, similarities.astype(np.float32))


def search_by_shortlist(query: np.ndarray, top_k: int, shortlist: int, rows: int,
                        find: Callable[[np.ndarray, int], tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]],
                        block: int) -> Hits:
    """Search through a shortlist: for each ``block`` of unit ``query`` rows, ``find(queries, r)`` gives
    r = max(top_k, ``shortlist``) candidates per row and a ``fetch`` of their vectors; `rerank_shortlist` ranks
    them exactly, `RERANK_ROWS` candidates at a time (small gathers stay in cache and reuse memory). ``rows``:
    the gallery size (at most that many results per query, as exact search gives)."""
    wanted = max(top_k, shortlist)
    step = max(1, RERANK_ROWS // wanted)
    ids, similarities = [], []
    for start in range(0, len(query), block):
        queries = query[start:start + block]
        candidates, fetch = find(queries, wanted)
        for first in range(0, len(queries), step):
            hits = rerank_shortlist(queries[first:first + step], candidates[first:first + step], fetch,
                                    min(top_k, rows))
            ids.append(hits.ids)
            similarities.append(hits.similarities)
    return Hits(np.concatenate(ids), np.concatenate(similarities))


class FileGallery(Gallery):
    """A features file searched exactly (`rga_keras.retrieval.search`): every query against every row of the
    memory-mapped features, in chunks. Ids are row numbers."""

    method = "exact"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self.name = str(self.path)
        self._file = open_features(self.path)
        self.source = self._file.source
        self._left_out: np.ndarray | None = None

    @property
    def features(self) -> np.ndarray:
        """The features, memory-mapped (read-only) where the file allows it."""
        return self._file.features

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def __len__(self) -> int:
        return len(self.features)

    def describe(self) -> str:
        return f"{self.path}: {self._file.describe()}"

    def search(self, query: np.ndarray, top_k: int = 10) -> Hits:
        indices, similarities = search(self.check_query(query), self.features, check_top_k(top_k),
                                       left_out=self.left_out())
        return Hits(indices, similarities)

    def left_out(self) -> np.ndarray:
        """The rows no search returns: NaN/Inf or all-zero ones (`rga_keras.retrieval.topk.gallery_rows_left_out`),
        found on the first search, with one warning naming how many and the first; ValueError for a gallery
        with no usable row or collapsed rows."""
        if self._left_out is None:
            self._left_out = gallery_rows_left_out(self.features, RowPaths(self._file), stacklevel=4)
        return self._left_out

    def ids(self, start: int, count: int) -> list[int]:
        return list(range(max(0, start), min(len(self), max(0, start) + max(0, count))))

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        ids = self._checked(ids)
        order = np.argsort(ids, kind="stable")
        rows = np.empty((len(ids), self.dim), np.float32)
        rows[order] = self.features[ids[order]]  # increasing rows: a forward pass over the memory map
        return rows

    def paths(self, ids: Sequence[int]) -> list[str]:
        """The image paths of ``ids``."""
        return self._file.paths_at(self._checked(ids))

    def crops(self, ids: Sequence[int]) -> list[Crop]:
        return crops_of(self.paths(ids))

    def known_paths(self, paths: Sequence[str]) -> set[str]:
        return set(paths).intersection(self._file.paths_at(np.arange(len(self))))

    def append(self, data: FeatureSet) -> None:
        """Rewrite the file with ``data``'s rows added, atomically: the old rows are copied in chunks, not
        recomputed nor held in memory all at once."""
        self.check_appended(data)
        rows = len(self) + len(data.features)
        chunks = itertools.chain(self._file.chunks(), [(data.features, data.paths)])
        write_feature_chunks(self.path, self.source, chunks, (rows, self.dim))
        self.close()
        self._file = open_features(self.path)
        self._left_out = None

    def close(self) -> None:
        self._file.close()

    def _checked(self, ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(-1)
        bad = (ids < 0) | (ids >= len(self))
        if bad.any():
            raise KeyError(f"no gallery image {int(ids[bad][0])} (ids are 0 to {len(self) - 1})")
        return ids


class RowPaths:
    """The image path of a row, read when asked (a message names one or two rows of a large gallery)."""

    def __init__(self, file) -> None:
        self._file = file

    def __getitem__(self, row: int) -> str:
        return self._file.paths_at(np.array([row]))[0]
