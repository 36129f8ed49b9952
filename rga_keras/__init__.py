"""rga-keras: Relation-Aware Global Attention (Zhang et al., CVPR 2020) for person re-id in Keras 3.

    import rga_keras
    model = rga_keras.RGAReID.from_preset("rga_sc_resnet50", num_classes=751)   # RGA-SC, 256×128 input
    embed = model.embedding_model("after_bn")                                  # images → 2048-d embedding

The model core (layers, models, losses, optimizers, weights) uses ``keras.ops`` only and runs on every Keras
backend; the data pipeline, distributed training and export (`rga_keras.data`, `rga_keras.training`,
`rga_keras.export`) are TensorFlow's and are imported only when used.
"""
from rga_keras.native_logs import quiet_native_stderr

with quiet_native_stderr():  # TensorFlow's C++ start-up lines, when TF_CPP_MIN_LOG_LEVEL asks (native_logs.py)
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow

        tensorflow.config.list_physical_devices()  # where it probes for CUDA and logs its absence

# losses and optimizers register their classes, so `keras.models.load_model` reads our checkpoints.
from rga_keras import losses, optimizers  # noqa: F401
from rga_keras.layers import RGA, RelationAttention, RGAOptions
from rga_keras.models import (
    PRESETS,
    BNNeck,
    RGAReID,
    RGAResNetBackbone,
    attention_model,
    build_rga_resnet50,
    count_parameters,
    embedding_model,
    load_reid_model,
    rga_layers,
)
from rga_keras.weights import load_backbone_weights, load_official_state_dict

__version__ = "0.2.0"

__all__ = [
    "RGA",
    "RelationAttention",
    "RGAOptions",
    "RGAResNetBackbone",
    "RGAReID",
    "PRESETS",
    "BNNeck",
    "build_rga_resnet50",
    "embedding_model",
    "attention_model",
    "rga_layers",
    "count_parameters",
    "load_reid_model",
    "load_backbone_weights",
    "load_official_state_dict",
]
