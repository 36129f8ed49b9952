"""The RGA re-id model family: `RGAResNetBackbone`, the `RGAReID` task, presets (as keras-hub's families)."""
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
