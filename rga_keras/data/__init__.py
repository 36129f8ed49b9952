"""Re-id data (docs/DESIGN.md §3, §5): the sample type, dataset readers, a synthetic dataset, and the tf.data
pipelines (identity-balanced P×K training batches with the paper's augmentations; evaluation batches).

Importing the package is cheap: the pipeline names load TensorFlow on first use.
"""
from rga_keras._lazy import lazy_exports
from rga_keras.data.readers import DATASETS, OFFICIAL_COUNTS, load_dataset
from rga_keras.data.samples import DatasetWarning, ReidDataset, Sample, check_pk_batch

_PIPELINE = ("IMAGENET_MEAN_255", "CorruptImages", "check_enough_identities", "corrupt_images", "load_images",
             "make_eval_dataset", "make_train_dataset", "steps_per_epoch")
__all__ = ["DATASETS", "OFFICIAL_COUNTS", "DatasetWarning", "ReidDataset", "Sample", "check_pk_batch", "load_dataset",
           *_PIPELINE]
__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(_PIPELINE, "rga_keras.data.pipeline"))
