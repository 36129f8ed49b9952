"""rga-keras: Relation-Aware Global Attention (Zhang et al., CVPR 2020) for person re-id in Keras 3.

    import rga_keras
    model = rga_keras.build_rga_resnet50(num_classes=751)          # RGA-SC, 256×128 input
    embed = rga_keras.embedding_model(model, feature="after_bn")   # images → 2048-d embedding
"""
# losses and optimizers register their classes, so `keras.models.load_model` reads our checkpoints.
from rga_keras import losses, optimizers  # noqa: F401
from rga_keras.layers import RGA, RelationAttention
from rga_keras.models import (
    BNNeck,
    attention_model,
    build_rga_resnet50,
    count_parameters,
    embedding_model,
    rga_layers,
)
from rga_keras.weights import load_backbone_weights, load_official_state_dict

__version__ = "0.1.0"

__all__ = [
    "RGA",
    "RelationAttention",
    "BNNeck",
    "build_rga_resnet50",
    "embedding_model",
    "attention_model",
    "rga_layers",
    "count_parameters",
    "load_backbone_weights",
    "load_official_state_dict",
]
