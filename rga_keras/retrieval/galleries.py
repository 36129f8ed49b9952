"""Which gallery a program names, and which search it gets: a features file searched exactly or through its
faiss index, or a Milvus collection (`rga_keras.retrieval.gallery.Gallery` for all three)."""
from __future__ import annotations

import os

from rga_keras.retrieval.gallery import FileGallery, Gallery
from rga_keras.retrieval.index import IndexedGallery, index_path
from rga_keras.retrieval.milvus import DEFAULT_COLLECTION, MilvusGallery

SEARCHES = ("auto", "exact", "index")
INDEX_MIN_ROWS = 50_000  # "auto" searches a smaller gallery exactly even when it has an index


def open_gallery(features: str | os.PathLike | None = None, *, milvus: str | None = None,
                 collection: str = DEFAULT_COLLECTION, search: str = "auto", nprobe: int | None = None,
                 shortlist: int | None = None) -> Gallery:
    """The gallery of a features file (``features``) or of a Milvus collection (``milvus`` URI, ``collection``).

    For a features file, ``search`` picks the search: "exact"; "index" (its faiss index, which must be
    current: a stale one is refused, saying why); "auto" (default): the index when the file has one and at
    least `INDEX_MIN_ROWS` rows, else exact. ``nprobe``/``shortlist`` override the index's saved settings
    (for Milvus: the candidates re-ranked, and the lists an IVF index visits)."""
    if (features is None) == (milvus is None):
        raise ValueError("name one gallery: a features file or a Milvus URI")
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if milvus is not None:
        if search == "index":
            raise ValueError("a Milvus gallery is searched through Milvus' own index; --search index is for a "
                             "features file's faiss index")
        return MilvusGallery(milvus, collection, **({"shortlist": shortlist} if shortlist else {}),
                             search_params={"nprobe": nprobe} if nprobe else None)
    if search == "index" or (search == "auto" and index_path(features).is_file()):
        gallery = IndexedGallery(features, nprobe=nprobe, shortlist=shortlist)
        if search == "index" or len(gallery) >= INDEX_MIN_ROWS:
            return gallery
        gallery.close()
    return FileGallery(features)
