"""Re-id evaluation: distances, retrieval metrics (CMC, mAP, mINP; docs/DESIGN.md §4), k-reciprocal re-ranking,
and the features of a model on a dataset's query and gallery images.

    distances      NumPy distances between features and the row order of a distance matrix (tie rule)
    feature_check  `check_features`: non-finite, all-zero and collapsed embeddings (one check for every user)
    metrics        `evaluate`, `evaluate_distances`, `rank_gallery`
    reranking      `k_reciprocal_rerank` (Zhong et al., CVPR 2017)
    features       `extract_features`, `evaluate_model`: a Keras model's embeddings and metrics on a dataset
                   (Keras and the tf.data pipeline: import ``rga_keras.evaluation.features`` for them)

The package itself imports NumPy parts only.
"""
from rga_keras.evaluation.distances import METRICS, as_features, pairwise_distance, stable_argsort_rows
from rga_keras.evaluation.feature_check import DegenerateFeaturesWarning, check_features
from rga_keras.evaluation.metrics import evaluate, evaluate_distances, rank_gallery
from rga_keras.evaluation.reranking import k_reciprocal_rerank

__all__ = [
    "METRICS", "DegenerateFeaturesWarning", "as_features", "check_features", "evaluate", "evaluate_distances",
    "k_reciprocal_rerank", "pairwise_distance", "rank_gallery", "stable_argsort_rows",
]
