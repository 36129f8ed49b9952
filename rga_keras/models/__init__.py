"""The RGA re-id model family: `RGAResNetBackbone`, the `RGAReID` task, presets (as keras-hub's families).

Importing it registers every class a saved re-id model holds (the losses and optimizers of a compiled one too),
so ``keras.models.load_model`` reads rga-keras checkpoints."""
from rga_keras import losses, optimizers  # noqa: F401  (registered for keras.models.load_model)
from rga_keras.models.backbone import RESNET50_BLOCKS, RESNET50_WIDTHS, RGAResNetBackbone
from rga_keras.models.presets import PRESETS
from rga_keras.models.reid import (
    FEATURES,
    BNNeck,
    RGAReID,
    as_reid_model,
    attention_model,
    build_rga_resnet50,
    count_parameters,
    embedding_model,
    load_reid_model,
    rga_layers,
)

__all__ = [
    "RESNET50_BLOCKS", "RESNET50_WIDTHS", "RGAResNetBackbone", "PRESETS", "FEATURES", "BNNeck", "RGAReID",
    "as_reid_model", "attention_model", "build_rga_resnet50", "count_parameters", "embedding_model",
    "load_reid_model", "rga_layers",
]
