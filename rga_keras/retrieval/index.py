"""A faiss index beside a features file, for galleries past one machine's memory: a compact approximate index
finds a shortlist per query, and the shortlist is re-ranked exactly against the memory-mapped features
(`rga_keras.retrieval.gallery.rerank_shortlist`), so the similarities returned are exact and only the
shortlist is approximate.

The index (`default_factory`: PCA to `PCA_DIM` dimensions, an inverted file of ``nlist`` lists, 4-bit
fast-scan product-quantised codes; measured against the alternatives in docs/BENCHMARKS.md) is trained on a
sample of the features and filled in chunks, so memory stays bounded by the sample and the codes, never the
features. A query visits a quarter of the lists (``nprobe``) and re-ranks `SHORTLIST` candidates. It
is saved atomically as ``<features file>.faiss``: a header line, a JSON line (the factory, search settings,
and the rows and fingerprint of the features it indexes), then faiss' own serialisation.

The index is tied to its features file by a fingerprint (`fingerprint`: row count, dimension, source and 64
sampled rows with their paths). Opening it checks the fingerprint: an index built for another version of the
file is refused with a message saying what to do; one that is behind by an append (rows added to the file
after the index was written, e.g. an interrupted ``rga-embed --append``) is caught up by `update_index`,
which adds only the new rows.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from rga_keras.files import atomic_write
from rga_keras.reading import naming
from rga_keras.retrieval.features import SOURCE_KEYS, FeatureSet, FeaturesFile, open_features
from rga_keras.retrieval.gallery import FileGallery, Hits, RowPaths, check_top_k, search_by_shortlist
from rga_keras.retrieval.topk import gallery_rows_left_out

INDEX_FORMAT = b"rga-keras faiss index\n"
INDEX_VERSION = 1
PCA_DIM = 256
PROBED = 4           # by default a query visits 1/PROBED of the lists (nprobe = nlist / 4)
SHORTLIST = 200      # candidates per query re-ranked exactly
TRAIN_ROWS = 40_000  # sample the index is trained on (at most)
ADD_ROWS = 20_000    # rows read and added per chunk
SEARCH_ROWS = 4096   # queries sent to faiss at once (their shortlists: 6.3 MiB of ids)
FINGERPRINT_ROWS = 64
MIN_TRAIN_ROWS = 1000  # fewer rows than this: too few to train quantisers on


def index_path(features_path: str | os.PathLike) -> Path:
    """Where the index of a features file lives: beside it, ``gallery.h5`` → ``gallery.h5.faiss``."""
    path = Path(features_path).expanduser()
    return path.with_name(path.name + ".faiss")


def default_factory(rows: int, dim: int) -> str:
    """The faiss factory string for a gallery of ``rows`` × ``dim``: ``PCA256,IVF<nlist>,PQ128x4fs`` — a PCA to
    `PCA_DIM` dimensions (none for galleries of at most that many), an inverted file of nlist ≈ √rows lists (a
    power of two, at most one per 39 training rows, faiss' minimum), and 4-bit fast-scan product-quantised codes
    of 64 bytes. Chosen by
    bench/bench_gallery.py (docs/BENCHMARKS.md): the shortlist's recall is set by the lists visited, hardly by
    the codes, and fast-scan codes are the quickest to train, fill and scan. Below `MIN_TRAIN_ROWS` rows there
    is too little to train on: "Flat", the vectors themselves (an exact shortlist)."""
    if rows < MIN_TRAIN_ROWS:
        return "Flat"
    nlist = min(2 ** round(np.log2(np.sqrt(rows))), 2 ** int(np.log2(min(rows, TRAIN_ROWS) / 39)))
    return f"{'' if dim <= PCA_DIM else f'PCA{PCA_DIM},'}IVF{nlist},PQ{min(dim, PCA_DIM) // 2}x4fs"


def fingerprint(file: FeaturesFile, rows: int | None = None) -> str:
    """SHA-256 of what identifies the first ``rows`` rows (default all) of a features file: their count and
    dimension, the file's source, and `FINGERPRINT_ROWS` evenly spaced rows with their paths. Cheap at any
    size; rga-embed never edits rows in place, so a file that changed changes its fingerprint."""
    rows = len(file.features) if rows is None else rows
    picked = np.unique(np.linspace(0, rows - 1, min(rows, FINGERPRINT_ROWS)).astype(np.int64))
    digest = hashlib.sha256(json.dumps([rows, file.features.shape[1], [file.source[k] for k in SOURCE_KEYS]],
                                       sort_keys=True).encode())
    digest.update(np.ascontiguousarray(file.features[picked], "<f4").tobytes())
    for path in file.paths_at(picked):
        digest.update(path.encode() + b"\0")
    return digest.hexdigest()


def build_index(features_path: str | os.PathLike, *, factory: str | None = None, nprobe: int | None = None,
                shortlist: int = SHORTLIST, train_rows: int = TRAIN_ROWS, seed: int = 0, verbose: int = 1) -> Path:
    """Build the index of a features file and save it beside it (atomically); returns its path.

    Trained on ``train_rows`` rows sampled at random (all of a smaller file), filled `ADD_ROWS` rows at a time.
    ``factory`` is any faiss factory string (default `default_factory`); the index measures L2 distance, which
    ranks unit vectors as cosine similarity does and, unlike the inner product, is unchanged by a PCA's
    centring. ``nprobe`` (default: a quarter of the lists) and ``shortlist`` are the search settings saved with
    it. ``verbose``: a progress bar over the rows added.
    """
    import faiss

    for name, value in (("nprobe", 1 if nprobe is None else nprobe), ("shortlist", shortlist),
                        ("train_rows", train_rows)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    with open_features(features_path) as file:
        rows, dim = file.features.shape
        factory = factory or default_factory(rows, dim)
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
        except RuntimeError as err:
            raise ValueError(f"faiss cannot make index {factory!r} for {dim}-d vectors: "
                             f"{str(err).strip().splitlines()[-1]}") from None
        usable = _usable_rows(file)
        sample = np.sort(np.random.default_rng(seed).choice(usable, min(len(usable), int(train_rows)), replace=False))
        index.train(file.take(sample))
        _drop_training_state(index)
        _add_rows(index, file, 0, rows, verbose)
        header = {"version": INDEX_VERSION, "features": file.path.name, "rows": rows, "dim": dim,
                  "fingerprint": fingerprint(file), "source": file.source, "factory": factory,
                  "nprobe": int(nprobe or _default_nprobe(index)), "shortlist": int(shortlist),
                  "train_rows": len(sample)}
    return _save(index_path(features_path), header, index)


def update_index(features_path: str | os.PathLike, verbose: int = 1) -> int:
    """Add the rows appended to a features file since its index was saved; returns how many were added
    (0 when the index is current). ValueError when the file changed otherwise (`load_index`'s message)."""
    with open_features(features_path) as file:
        header, index = load_index(file, allow_behind=True)
        added = len(file.features) - header["rows"]
        if added:
            _add_rows(index, file, header["rows"], len(file.features), verbose)
            _save(index_path(features_path), {**header, "rows": len(file.features), "fingerprint": fingerprint(file)},
                  index)
    return added


def load_index(file: FeaturesFile, *, allow_behind: bool = False):
    """The (header, faiss index) saved beside the open features file ``file``, after checking it indexes this
    very file. FileNotFoundError when there is none; ValueError for a stale one (or one behind by an append,
    unless ``allow_behind``), saying how to rebuild or update it."""
    import faiss

    path = index_path(file.path)
    if not path.is_file():
        raise FileNotFoundError(f"{file.path} has no index ({path.name} beside it); build one with "
                                f"`rga-gallery index {file.path}`")
    with open(path, "rb") as handle:
        header = _read_header(path, handle)
        rows, now = header["rows"], len(file.features)
        if (header["dim"] != file.features.shape[1] or rows > now
                or header["fingerprint"] != fingerprint(file, rows)):
            raise ValueError(f"index {path} is stale: it was built for another version of {file.path.name} "
                             f"({rows} rows then, {now} now); rebuild it with `rga-gallery index {file.path} "
                             "--rebuild`, or search exactly (--search exact)")
        if rows < now and not allow_behind:
            raise ValueError(f"index {path} covers {rows} of the {now} rows of {file.path.name} (rows were "
                             f"appended after it was saved); add the rest with `rga-gallery index {file.path}`, "
                             "or search exactly (--search exact)")
        with naming(path, "a faiss index", f"rebuild it with `rga-gallery index {file.path} --rebuild`"):
            index = faiss.read_index(faiss.PyCallbackIOReader(handle.read))
    return header, index


def index_status(features_path: str | os.PathLike) -> str:
    """"none", "current", "behind" (rows appended since) or "stale" (another version of the file): what
    `load_index` would find, for programs that choose the search."""
    with open_features(features_path) as file:
        try:
            header, _ = load_index(file, allow_behind=True)
        except FileNotFoundError:
            return "none"
        except ValueError:
            return "stale"
        return "current" if header["rows"] == len(file.features) else "behind"


class IndexedGallery(FileGallery):
    """A features file searched through its faiss index: ``nprobe`` lists per query give ``shortlist``
    candidates (defaults: those saved with the index), re-ranked exactly against the memory-mapped features."""

    def __init__(self, path: str | os.PathLike, *, nprobe: int | None = None, shortlist: int | None = None) -> None:
        super().__init__(path)
        try:
            self._load(nprobe, shortlist)
        except BaseException:
            self.close()
            raise

    def _load(self, nprobe: int | None, shortlist: int | None) -> None:
        """Read the (current) index and set its search parameters."""
        import faiss

        self.header, self.index = load_index(self._file)
        self.nprobe = int(nprobe or self.header["nprobe"])
        self.shortlist = int(shortlist or self.header["shortlist"])
        if min(self.nprobe, self.shortlist) < 1:
            raise ValueError(f"nprobe and shortlist must be >= 1, got {self.nprobe} and {self.shortlist}")
        inverted = faiss.try_extract_index_ivf(self.index)
        if inverted is not None:
            inverted.nprobe = self.nprobe
        self.method = (f"faiss {self.header['factory']}{f', nprobe {self.nprobe}' if inverted else ''}, "
                       f"top {self.shortlist} re-ranked exactly")

    def search(self, query: np.ndarray, top_k: int = 10) -> Hits:
        query, bad = self.check_query(query), self.left_out()  # rows no search returns (warned about once)

        def find(chunk: np.ndarray, wanted: int):
            candidates = self.index.search(chunk, wanted)[1]
            if len(bad):
                candidates[np.isin(candidates, bad)] = -1
            return candidates, self._fetch

        return search_by_shortlist(query, check_top_k(top_k), self.shortlist, len(self) - len(bad), find,
                                   block=SEARCH_ROWS)

    def append(self, data: FeatureSet) -> None:
        """Rewrite the features file with ``data``'s rows added, then add them to the index (no rebuild)."""
        super().append(data)
        update_index(self.path, verbose=0)
        self._load(self.nprobe, self.shortlist)

    def _fetch(self, ids: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.features[ids])


def _add_rows(index, file: FeaturesFile, start: int, stop: int, verbose: int) -> None:
    """Add rows ``start:stop`` of the memory-mapped features to ``index``, `ADD_ROWS` at a time."""
    import keras

    if index.ntotal != start:
        raise ValueError(f"the index holds {index.ntotal} vectors, expected {start}")
    progbar = keras.utils.Progbar(stop - start, verbose=verbose, unit_name="vector")
    for first in range(start, stop, ADD_ROWS):
        # NaN/Inf rows added as zeros: searches leave them out (IndexedGallery.left_out), k-means never sees them
        index.add(np.nan_to_num(file.rows(first, min(first + ADD_ROWS, stop)), nan=0.0, posinf=0.0, neginf=0.0))
        progbar.update(min(first + ADD_ROWS, stop) - start)


def _usable_rows(file: FeaturesFile) -> np.ndarray:
    """The rows an index may train on: all but NaN/Inf and all-zero ones (a NaN row makes faiss' k-means
    centroids NaN); the others are warned about, a file with none usable or collapsed rows refused."""
    bad = gallery_rows_left_out(file.features, RowPaths(file), stacklevel=4)
    return np.setdiff1d(np.arange(len(file.features)), bad)


def _default_nprobe(index) -> int:
    """A quarter of an inverted file's lists (1 for an index without lists)."""
    import faiss

    inverted = faiss.try_extract_index_ivf(index)
    return max(1, inverted.nlist // PROBED) if inverted is not None else 1


def _drop_training_state(index) -> None:
    """Free what only training needs: a PCA keeps its full d × d eigenvector matrix (16 MiB at 2,048-d, more
    than the codes of 60,000 vectors), of which searching uses the first rows, kept apart."""
    import faiss

    if isinstance(index, faiss.IndexPreTransform):
        for position in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(position))
            if isinstance(transform, faiss.PCAMatrix):
                transform.PCAMat.clear()


def _save(path: Path, header: dict, index) -> Path:
    import faiss

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(INDEX_FORMAT + json.dumps(header).encode() + b"\n")
            writer = faiss.PyCallbackIOWriter(handle.write)
            faiss.write_index(index, writer)
            del writer  # flushes its buffer into the file

    return atomic_write(path, write)


def _read_header(path: Path, handle) -> dict:
    if handle.readline() != INDEX_FORMAT:
        raise ValueError(f"{path} is not an rga-keras faiss index")
    try:
        header = json.loads(handle.readline())
    except ValueError:
        raise ValueError(f"{path} is damaged: its header is not JSON") from None
    if header.get("version", INDEX_VERSION + 1) > INDEX_VERSION:
        raise ValueError(f"{path} is a version {header.get('version')} index; this rga-keras reads version "
                         f"{INDEX_VERSION}")
    return header

