"""Re-id data: dataset readers, tf.data pipelines and a synthetic dataset (issue 3, docs/DESIGN.md §3, §5)."""
from rga_keras.data.pipeline import (
    IMAGENET_MEAN_255,
    CorruptImages,
    check_enough_identities,
    corrupt_images,
    make_eval_dataset,
    make_train_dataset,
    steps_per_epoch,
)
from rga_keras.data.readers import OFFICIAL_COUNTS, DatasetWarning, ReidDataset, Sample, load_dataset

__all__ = [
    "IMAGENET_MEAN_255",
    "OFFICIAL_COUNTS",
    "CorruptImages",
    "DatasetWarning",
    "ReidDataset",
    "Sample",
    "check_enough_identities",
    "corrupt_images",
    "load_dataset",
    "make_eval_dataset",
    "make_train_dataset",
    "steps_per_epoch",
]
