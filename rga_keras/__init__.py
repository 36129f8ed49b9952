"""rga-keras: Relation-Aware Global Attention (Zhang et al., CVPR 2020) for person re-id in Keras 3.

    import rga_keras
    model = rga_keras.RGAReID.from_preset("rga_sc_resnet50", num_classes=751)   # RGA-SC, 256×128 input
    embed = model.embedding_model("after_bn")                                  # images → 2048-d embedding

The model core (layers, models, losses, optimizers, weights) uses ``keras.ops`` only and runs on every Keras
backend; the tf.data pipeline, ``tf.distribute`` training and SavedModel/TFLite export (`rga_keras.data`,
`rga_keras.training`, `rga_keras.export`) are TensorFlow's and are imported only when used.

``import rga_keras`` imports nothing heavy, so the programs (`rga_keras.cli`) start at once; the first use of
a name below imports the model core, which registers every class a saved model holds (layers, models, losses,
optimizers) for ``keras.models.load_model``.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

__version__ = "0.2.0"

_CORE = ("rga_keras.layers", "rga_keras.schemes", "rga_keras.models", "rga_keras.losses", "rga_keras.optimizers",
         "rga_keras.weights")
_EXPORTS = {
    "RGA": "rga_keras.layers", "RelationAttention": "rga_keras.layers", "RGAOptions": "rga_keras.layers",
    "PRESETS": "rga_keras.models", "BNNeck": "rga_keras.models", "RGAReID": "rga_keras.models",
    "RGAResNetBackbone": "rga_keras.models", "attention_model": "rga_keras.models",
    "build_rga_resnet50": "rga_keras.models", "count_parameters": "rga_keras.models",
    "embedding_model": "rga_keras.models", "load_reid_model": "rga_keras.models", "rga_layers": "rga_keras.models",
    "load_backbone_weights": "rga_keras.weights", "load_official_state_dict": "rga_keras.weights",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (PEP 562), the whole model core at once."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rga_keras' has no attribute {name!r}")
    from rga_keras.native_logs import quiet_native_stderr

    with quiet_native_stderr():  # TensorFlow's C++ start-up lines, when TF_CPP_MIN_LOG_LEVEL asks (native_logs.py)
        for module in _CORE:
            importlib.import_module(module)
        if "tensorflow" in sys.modules:  # where it probes for CUDA and logs its absence
            sys.modules["tensorflow"].config.list_physical_devices()
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
