"""Re-id for real use (issues 13, 23): embed image files with any model format, and search a gallery.

    from rga_keras import retrieval
    embedder = retrieval.load_embedder("exported/tflite/rga_v1_float32.tflite")   # or .keras, SavedModel, .onnx
    features, paths, skipped = retrieval.embed_images(embedder, retrieval.list_images(["crops/"]))
    indices, similarities = retrieval.search(query_features, features, top_k=10)
    with retrieval.open_gallery("gallery.h5") as gallery:      # or milvus="http://milvus:19530"
        hits = gallery.search(query_features, top_k=10)       # hits.ids, hits.similarities; gallery.crops(ids)

Modules: `images` (which files), `models` (model formats), `embed` (images → embeddings), `features`
(the HDF5 features file), `topk` (exact chunked top-k search), `crops` (path, camera, time, identity of an
image), `gallery` (the interface every gallery shares; a features file searched exactly), `index` (a faiss
index beside a features file), `milvus` (a gallery in Milvus), `galleries` (which one a program names),
`web` (rga-serve's app). The programs are rga-embed, rga-search, rga-gallery and rga-serve
(docs/RETRIEVAL.md).
"""
from rga_keras.retrieval.crops import Crop, crops_of
from rga_keras.retrieval.embed import embed_images
from rga_keras.retrieval.features import (FILE_FORMAT, FeatureSet, FeaturesFile, append_features, check_same_source,
                                          feature_source, is_features_candidate, open_features, read_features,
                                          write_features)
from rga_keras.retrieval.galleries import open_gallery
from rga_keras.retrieval.gallery import FileGallery, Gallery, Hits
from rga_keras.retrieval.images import IMAGE_SUFFIXES, list_images
from rga_keras.retrieval.index import IndexedGallery, build_index, index_path, index_status, update_index
from rga_keras.retrieval.milvus import MilvusGallery
from rga_keras.retrieval.models import MODEL_FORMATS, Embedder, load_embedder, model_format, model_sha256
from rga_keras.retrieval.topk import MAX_BLOCK_BYTES, search, unit_rows

__all__ = [
    "FILE_FORMAT", "IMAGE_SUFFIXES", "MAX_BLOCK_BYTES", "MODEL_FORMATS", "Crop", "Embedder", "FeatureSet",
    "FeaturesFile", "FileGallery", "Gallery", "Hits", "IndexedGallery", "MilvusGallery", "append_features",
    "build_index", "check_same_source", "crops_of", "embed_images", "feature_source", "index_path", "index_status",
    "is_features_candidate", "list_images", "load_embedder", "model_format", "model_sha256", "open_features",
    "open_gallery", "read_features", "search", "unit_rows", "update_index", "write_features",
]
