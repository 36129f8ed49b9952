"""Re-id for real use (issue 13): embed image files with any model format, and search a gallery.

    from rga_keras import retrieval
    embedder = retrieval.load_embedder("exported/tflite/rga_v1_float32.tflite")   # or .keras, SavedModel, .onnx
    features, paths, skipped = retrieval.embed_images(embedder, retrieval.list_images(["crops/"]))
    indices, similarities = retrieval.search(query_features, features, top_k=10)

Modules: `images` (which files), `models` (model formats), `embed` (images → embeddings), `features`
(the HDF5 features file), `topk` (exact chunked top-k search). The programs are rga-embed and rga-search
(docs/RETRIEVAL.md).
"""
from rga_keras.retrieval.embed import embed_images
from rga_keras.retrieval.features import (FILE_FORMAT, FeatureSet, append_features, check_same_source, feature_source,
                                          is_features_candidate, read_features, write_features)
from rga_keras.retrieval.images import IMAGE_SUFFIXES, list_images
from rga_keras.retrieval.models import MODEL_FORMATS, Embedder, load_embedder, model_format, model_sha256
from rga_keras.retrieval.topk import MAX_BLOCK_BYTES, search, unit_rows

__all__ = [
    "FILE_FORMAT", "IMAGE_SUFFIXES", "MAX_BLOCK_BYTES", "MODEL_FORMATS", "Embedder", "FeatureSet",
    "append_features", "check_same_source", "embed_images", "feature_source", "is_features_candidate",
    "list_images", "load_embedder", "model_format", "model_sha256", "read_features", "search", "unit_rows",
    "write_features",
]
