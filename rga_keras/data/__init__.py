"""Re-id data (docs/DESIGN.md §3, §5): the sample type, dataset readers, a synthetic dataset, the training plan
(identity-balanced P×K batches with the paper's augmentations), and the input pipelines that follow it: tf.data
and Grain (training and evaluation batches).

Importing the package is cheap: the readers and the plan are plain Python and NumPy; the tf.data names load
TensorFlow on first use, the Grain names Grain (never TensorFlow).
"""
from rga_keras._lazy import lazy_exports
from rga_keras.data.corrupt import CorruptImages, corrupt_images
from rga_keras.data.readers import DATASETS, OFFICIAL_COUNTS, load_dataset
from rga_keras.data.samples import DatasetWarning, ReidDataset, Sample, check_pk_batch
from rga_keras.data.sampling import IMAGENET_MEAN_255, check_enough_identities, steps_per_epoch

_TF_DATA = ("load_images", "make_eval_dataset", "make_train_dataset")
_GRAIN = ("make_grain_eval_dataset", "make_grain_train_dataset")
__all__ = ["DATASETS", "IMAGENET_MEAN_255", "OFFICIAL_COUNTS", "CorruptImages", "DatasetWarning", "ReidDataset",
           "Sample", "check_enough_identities", "check_pk_batch", "corrupt_images", "load_dataset", "steps_per_epoch",
           *_TF_DATA, *_GRAIN]
__getattr__, __dir__ = lazy_exports(__name__, {**dict.fromkeys(_TF_DATA, "rga_keras.data.pipeline"),
                                               **dict.fromkeys(_GRAIN, "rga_keras.data.grain_pipeline")})
