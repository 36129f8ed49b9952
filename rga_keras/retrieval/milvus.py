"""A gallery kept in Milvus, for galleries past one machine and galleries several sites append to.

`pymilvus.MilvusClient` talks to Milvus Lite inside the process when the URI is a local path (tests, one
machine: ``gallery.db``), and to a Milvus server or cluster by its address (``http://milvus:19530``, with a
token where the server wants one). One collection is one gallery: an auto-generated int64 primary key
``id``, the L2-normalised ``vector`` and per image ``path``, ``camera``, ``identity`` and ``time``
(`rga_keras.retrieval.crops.Crop`). What made the embeddings (the features file's ``source``: model file
hash, feature, input size, flip) is a collection property, checked on every append: a gallery accepts only
embeddings of the model and settings it was made with, and of its dimension.

Searching asks Milvus for a shortlist with its stored vectors and re-ranks it exactly
(`rga_keras.retrieval.gallery.rerank_shortlist`); equal similarities rank in id order, which is insertion
order for one writer.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Sequence

import numpy as np

from rga_keras.evaluation.feature_check import check_features
from rga_keras.retrieval.crops import Crop, crops_of
from rga_keras.retrieval.features import FeatureSet, describe
from rga_keras.retrieval.gallery import RERANK_ROWS, Gallery, Hits, check_top_k, search_by_shortlist
from rga_keras.retrieval.topk import unit_rows

DEFAULT_COLLECTION = "rga_gallery"
SOURCE_PROPERTY = "rga_keras.source"
SHORTLIST = 50         # Milvus Lite's search time grows with its limit (100 queries: 0.6 s at 10, 3.4 s at 50, 14 s at 200)
MAX_LIMIT = 16384      # Milvus' largest top-k
INSERT_ROWS = 1000     # rows per insert request (a 2,048-d batch is ~16 MB on the wire)
QUERY_PATHS = 500      # paths per "path in [...]" query
TEXT_LENGTH = {"path": 4096, "camera": 256, "identity": 256}
_FIELDS = ("path", "camera", "identity", "time")


class MilvusError(ConnectionError):
    """What Milvus answered to a request it refused, or that it could not be reached (an environment fault,
    so programs report it as bad input: one line, status 2)."""


class MilvusGallery(Gallery):
    """The Milvus collection ``collection`` at ``uri`` (see the module doc).

    ``create_for``: the ``(source, dim)`` of a new gallery, made when the collection does not exist yet
    (rga-embed passes its model's); without it a missing collection is a FileNotFoundError. ``index_type``
    and ``index_params`` pick Milvus' index for a new collection (default ``AUTOINDEX``: the server's choice);
    ``shortlist`` candidates per query are re-ranked exactly; ``search_params`` go to Milvus' search (e.g.
    ``{"nprobe": 32}`` for an IVF index).
    """

    def __init__(self, uri: str | os.PathLike, collection: str = DEFAULT_COLLECTION, *, token: str = "",
                 create_for: tuple[dict, int] | None = None, index_type: str = "AUTOINDEX",
                 index_params: dict | None = None, shortlist: int = SHORTLIST,
                 search_params: dict | None = None) -> None:
        from pymilvus import MilvusClient, MilvusException

        self.uri, self.collection = str(uri), collection
        self.name = f"Milvus collection {collection} at {self.uri}"
        if not 1 <= int(shortlist) <= MAX_LIMIT:
            raise ValueError(f"shortlist must be 1 to {MAX_LIMIT}, got {shortlist}")
        self.shortlist = int(shortlist)
        self.search_params = dict(search_params or {})
        _quiet_logs(self.uri)
        try:
            self._client = MilvusClient(self.uri, token=token or os.environ.get("MILVUS_TOKEN", ""))
        except MilvusException as err:
            raise MilvusError(f"cannot reach Milvus at {self.uri}: {err.message}") from None
        try:
            if not self._call("has_collection", collection):
                if create_for is None:
                    raise FileNotFoundError(f"Milvus at {self.uri} has no gallery {collection!r} (rga-embed "
                                            "--milvus makes one)")
                self._create(*create_for, index_type, index_params or {})
            info = self._call("describe_collection", collection)
            if SOURCE_PROPERTY not in info.get("properties", {}):
                raise ValueError(f"Milvus collection {collection!r} at {self.uri} is not an rga-keras gallery "
                                 f"(no {SOURCE_PROPERTY} property)")
            self.source = json.loads(info["properties"][SOURCE_PROPERTY])
            self._dim = next(int(f["params"]["dim"]) for f in info["fields"] if f["name"] == "vector")
            settings = "".join(f", {key} {value}" for key, value in self.search_params.items())
            self.method = f"milvus {self._index_type()}{settings}, top {self.shortlist} re-ranked exactly"
            self._call("load_collection", collection)  # a collection is "released" in a new client's eyes
        except BaseException:
            self._client.close()
            raise

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return int(self._call("query", self.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def describe(self) -> str:
        return f"{self.name}: {describe(len(self), self.dim, self.source)}"

    def search(self, query: np.ndarray, top_k: int = 10) -> Hits:
        query, top_k = self.check_query(query), check_top_k(top_k)
        if top_k > MAX_LIMIT:
            raise ValueError(f"top_k must be at most {MAX_LIMIT} for a Milvus gallery, got {top_k}")

        def find(chunk: np.ndarray, wanted: int):
            found = self._call("search", self.collection, chunk.tolist(), limit=wanted, output_fields=["vector"],
                               search_params={"params": self.search_params})
            stored: dict[int, list[float]] = {}
            candidates = np.full((len(chunk), wanted), -1, np.int64)
            for row, hits in enumerate(found):
                for column, hit in enumerate(hits):
                    candidates[row, column] = hit["id"]
                    stored[hit["id"]] = hit["entity"]["vector"]
            return candidates, lambda ids: np.asarray([stored[i] for i in ids], np.float32)

        return search_by_shortlist(query, top_k, self.shortlist, len(self), find,
                                   block=max(1, RERANK_ROWS // max(top_k, self.shortlist)))

    def ids(self, start: int, count: int) -> list[int]:
        if count < 1:
            return []
        rows = self._call("query", self.collection, filter="id >= 0", output_fields=["id"], offset=max(0, start),
                                  limit=count)
        return sorted(int(row["id"]) for row in rows)

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        return np.asarray([row["vector"] for row in self._rows(ids, ["vector"])], np.float32).reshape(-1, self.dim)

    def crops(self, ids: Sequence[int]) -> list[Crop]:
        return [Crop(**{name: row[name] for name in _FIELDS}) for row in self._rows(ids, list(_FIELDS))]

    def known_paths(self, paths: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(paths), QUERY_PATHS):
            listed = ", ".join(_literal(p) for p in paths[start:start + QUERY_PATHS])
            found.update(row["path"] for row in self._call("query", self.collection, filter=f"path in [{listed}]",
                                                                   output_fields=["path"]))
        return found

    def append(self, data: FeatureSet, crops: Sequence[Crop] | None = None) -> list[int]:
        """Insert ``data``'s embeddings with their `Crop` (default: from the paths and the files' times);
        returns the new ids, in order."""
        self.check_appended(data)
        found = check_features(data.features)
        if len(found.unusable):
            raise ValueError(f"{found.describe('embeddings to add', data.paths)}; they cannot be searched, nothing "
                             "was added")
        crops = crops_of(data.paths, stat=True) if crops is None else list(crops)
        if len(crops) != len(data.features):
            raise ValueError(f"{len(crops)} crops for {len(data.features)} embeddings")
        for crop in crops:
            for name, limit in TEXT_LENGTH.items():
                if len(getattr(crop, name).encode()) > limit:
                    raise ValueError(f"{name} {getattr(crop, name)[:60]!r}... is longer than Milvus' {limit} bytes")
        vectors, ids = unit_rows(data.features), []
        for start in range(0, len(vectors), INSERT_ROWS):
            rows = [{"vector": v.tolist(), **{name: getattr(c, name) for name in _FIELDS}}
                    for v, c in zip(vectors[start:start + INSERT_ROWS], crops[start:start + INSERT_ROWS])]
            ids.extend(int(i) for i in self._call("insert", self.collection, rows)["ids"])
        return ids

    def delete(self, *, camera: str | None = None, day: datetime.date | None = None) -> int:
        """Delete the crops of ``camera``, of ``day`` (UTC) or, with both, of that camera on that day; returns
        how many were deleted."""
        conditions = []
        if camera is not None:
            conditions.append(f"camera == {_literal(str(camera))}")
        if day is not None:
            start = int(datetime.datetime.combine(day, datetime.time(), datetime.timezone.utc).timestamp())
            conditions.append(f"time >= {start} and time < {start + 86400}")
        if not conditions:
            raise ValueError("say what to delete: a camera, a day or both")
        deleted = self._call("delete", self.collection, filter=" and ".join(f"({c})" for c in conditions))
        return len(deleted) if isinstance(deleted, list) else int(deleted.get("delete_count", 0))

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, *args, **kwargs):
        """``self._client.method(*args, **kwargs)``, Milvus' errors raised as one-line `MilvusError`."""
        from pymilvus import MilvusException

        try:
            return getattr(self._client, method)(*args, **kwargs)
        except MilvusException as err:
            raise MilvusError(f"{self.name}: {' '.join(str(err.message).split())}") from None

    def _rows(self, ids: Sequence[int], fields: list[str]) -> list[dict]:
        ids = [int(i) for i in np.asarray(ids, np.int64).reshape(-1)]
        found = {row["id"]: row for row in self._call("get", self.collection, ids=sorted(set(ids)),
                                                            output_fields=fields)} if ids else {}
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"no gallery image {missing[0]} in Milvus collection {self.collection}")
        return [found[i] for i in ids]

    def _index_type(self) -> str:
        index = self._call("describe_index", self.collection, "vector")
        return index.get("index_type", "index")

    def _create(self, source: dict, dim: int, index_type: str, index_params: dict) -> None:
        from pymilvus import DataType

        schema = self._client.create_schema(auto_id=True, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
        for name, length in TEXT_LENGTH.items():
            schema.add_field(name, DataType.VARCHAR, max_length=length)
        schema.add_field("time", DataType.INT64)
        index = self._client.prepare_index_params()
        index.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=index_params)
        self._call("create_collection", self.collection, schema=schema, index_params=index,
                                       consistency_level="Strong",
                                       properties={SOURCE_PROPERTY: json.dumps(source, sort_keys=True)})


def _literal(text: str) -> str:
    """``text`` as a string literal of Milvus' filter language (double quotes, backslash escapes; Milvus reads
    UTF-8 as it is, not \\u escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _quiet_logs(uri: str) -> None:
    """pymilvus logs every failed request with its traceback, and Milvus Lite's in-process server logs that
    pymilvus asks it for timestamps it does not serve (and pymilvus ignores); `MilvusGallery` reports errors
    itself, once."""
    logging.getLogger("pymilvus.decorators").setLevel(logging.CRITICAL)
    if not uri.startswith(("http://", "https://", "tcp://", "unix:")):  # a local path: Milvus Lite
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
