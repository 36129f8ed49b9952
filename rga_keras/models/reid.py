"""The re-id task model: an RGA ResNet-50 backbone with the BNNeck head of the paper (docs/DESIGN.md §2).

``RGAReID`` maps raw RGB pixels to ``{"features": f, "logits": z}``: f is the 2048-d pooled feature before
the BNNeck (used by the triplet loss and, or after the BNNeck, for retrieval), z the identity logits. It
holds its parts (``backbone``, ``bnneck``, ``classifier``), so other code asks it for an embedding model,
an attention model or a feature-map model instead of looking layers up by name.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np

from rga_keras.layers import BN_EPSILON, BN_MOMENTUM, RGA, RGAOptions
from rga_keras.models.backbone import RGAResNetBackbone

FEATURES = ("after_bn", "before_bn")


@keras.saving.register_keras_serializable(package="rga_keras")
class BNNeck(keras.layers.BatchNormalization):
    """BNNeck (Luo et al., 2019): BatchNorm between the feature and the classifier whose shift is frozen
    at zero, so the "after BN" feature is a pure per-channel scaling of a centred feature."""

    def build(self, input_shape: tuple) -> None:
        super().build(input_shape)
        if self.center:
            self.beta.trainable = False


@keras.saving.register_keras_serializable(package="rga_keras")
class RGAReID(keras.Model):
    """Re-id network (paper Fig. 3): backbone → global average pool → f → BNNeck → f_bn → classifier.

    The head runs in float32 under mixed precision, as Keras advises for a model's outputs.

    Args:
        backbone: an `RGAResNetBackbone`.
        num_classes: training identities (classifier width; no bias, initialised N(0, 0.001)).

    Example:
        >>> model = RGAReID.from_preset("rga_sc_resnet50", num_classes=751)
        >>> model(images)["features"].shape      # raw RGB pixels 0–255 → (B, 2048)
        >>> embed = model.embedding_model("after_bn")
    """

    def __init__(self, backbone: RGAResNetBackbone, num_classes: int, **kwargs: Any) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        # === Layers ===
        pool = keras.layers.GlobalAveragePooling2D(name="pool", dtype=backbone.dtype_policy)
        to_float32 = keras.layers.Activation("linear", dtype="float32", name="features")
        bnneck = BNNeck(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype="float32",
                        synchronized=backbone.synchronized_bn, name="bnneck")
        classifier = keras.layers.Dense(
            int(num_classes), use_bias=False, kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            dtype="float32", name="classifier")

        # === Functional model ===
        images = backbone.input
        features = to_float32(pool(backbone(images)))
        logits = classifier(bnneck(features))
        kwargs.setdefault("name", backbone.name.removesuffix("_backbone"))
        super().__init__(inputs=images, outputs={"features": features, "logits": logits}, **kwargs)

        # === Parts and config === (set after the functional init: PyTorch modules refuse attributes before it)
        self.backbone, self.pool, self.bnneck, self.classifier = backbone, pool, bnneck, classifier
        self.num_classes = int(num_classes)

    @property
    def rga_layers(self) -> list[RGA]:
        return self.backbone.rga_layers

    def embedding_model(self, feature: str = "after_bn") -> keras.Model:
        """Inference model images → retrieval embedding, "after_bn" (BNNeck output) or "before_bn" (f).

        The embedding is not L2-normalised; the cosine distance used for retrieval normalises it.
        """
        if feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
        features = self.output["features"]
        output = self.bnneck(features) if feature == "after_bn" else features
        return keras.Model(self.input, output, name=f"{self.name}_embedding_{feature}")

    def feature_map_model(self) -> keras.Model:
        """Inference model images → {"feature_map": the last stage's map (after its RGA), "logits"}."""
        return keras.Model(self.input, {"feature_map": self.pool.input, "logits": self.output["logits"]},
                           name=f"{self.name}_feature_map")

    def attention_model(self) -> keras.Model:
        """Inference model images → {"rga1": {"spatial_attention": ..., ...}, ...}: each module's maps.

        The maps are the exact tensors the modules multiply the features by (and their relation matrices),
        computed by the same layers and weights, so visualisations show what the network applies.
        """
        layers = self.rga_layers
        if not layers:
            raise ValueError(f"model '{self.name}' has no RGA layers (baseline and Table 2 scheme models have no "
                             "RGA attention maps)")
        outputs = {layer.name: _AttentionMaps(layer, name=f"{layer.name}_maps")(layer.input) for layer in layers}
        return keras.Model(self.backbone.input, outputs, name=f"{self.name}_attention")

    @classmethod
    def from_preset(cls, preset: str, num_classes: int, backbone_weights: str | os.PathLike | None = None,
                    **backbone_overrides: Any) -> "RGAReID":
        """The re-id network of a named variant (`rga_keras.models.presets.PRESETS`), e.g.
        ``RGAReID.from_preset("rga_sc_resnet50", num_classes=751, input_shape=(256, 128, 3))``.
        ``backbone_weights`` as `RGAResNetBackbone.load_pretrained`; architecture only otherwise."""
        backbone = RGAResNetBackbone.from_preset(preset, **backbone_overrides)
        if backbone_weights is not None:
            backbone.load_pretrained(backbone_weights)
        return cls(backbone, num_classes)

    def get_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable, "backbone": keras.layers.serialize(self.backbone),
                "num_classes": self.num_classes}

    @classmethod
    def from_config(cls, config: dict) -> "RGAReID":
        config = dict(config)
        config["backbone"] = keras.layers.deserialize(config["backbone"])
        return cls(**config)


class _AttentionMaps(keras.layers.Layer):
    """Calls an existing RGA layer (same weights) with ``return_maps=True`` and returns its maps.

    A wrapper rather than a second call of the RGA layer itself: Keras' functional graph cannot re-run
    a layer node whose outputs change structure with a call argument.
    """

    def __init__(self, rga: RGA, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rga = rga

    def call(self, inputs, training=None):
        return self.rga(inputs, training=training, return_maps=True)[1]

    def compute_output_spec(self, inputs, training=None):
        return self.rga.compute_output_spec(inputs, return_maps=True)[1]


def build_rga_resnet50(
    num_classes: int,
    attention: str | None = "sc",
    input_shape: Sequence[int] = (256, 128, 3),
    last_stride: int = 1,
    rga_stages: Sequence[int] = (1, 2, 3, 4),
    backbone_weights: str | os.PathLike | None = None,
    *,
    rga_options: RGAOptions | dict | None = None,
    synchronized_bn: bool = False,
    zero_init_residual: bool = True,
    name: str | None = None,
    **options: Any,
) -> RGAReID:
    """The paper's re-id network in one call: `RGAReID` over an `RGAResNetBackbone` (arguments as theirs).

    ``options`` are `RGAOptions` fields as keywords (``use_relation=False``, ``embedding="symmetric"``, ...);
    ``backbone_weights`` is None, "imagenet" or a weights file (`RGAResNetBackbone.load_pretrained`).
    """
    options = RGAOptions.make(rga_options, **options)
    backbone = RGAResNetBackbone(attention, input_shape, last_stride, rga_stages, options, synchronized_bn,
                                 zero_init_residual)
    if backbone_weights is not None:
        backbone.load_pretrained(backbone_weights)
    return RGAReID(backbone, num_classes, **({"name": name} if name else {}))


def _require_reid_model(model: Any) -> RGAReID:
    if not isinstance(model, RGAReID):
        raise ValueError(f"{type(model).__name__} '{getattr(model, 'name', '?')}' is not an RGA re-id model "
                         f"(rga_keras.RGAReID, as build_rga_resnet50 builds); a .keras file of rga-keras 0.1 "
                         f"loads as one with rga_keras.load_reid_model(path)")
    return model


def embedding_model(model: RGAReID, feature: str = "after_bn") -> keras.Model:
    """``model.embedding_model(feature)`` (images → retrieval embedding), with a clear error for other models."""
    return _require_reid_model(model).embedding_model(feature)


def attention_model(model: RGAReID) -> keras.Model:
    """``model.attention_model()`` (images → each RGA module's maps), with a clear error for other models."""
    return _require_reid_model(model).attention_model()


def rga_layers(model: RGAReID | RGAResNetBackbone) -> list[RGA]:
    """The model's RGA modules, in network order."""
    return model.rga_layers


def count_parameters(model: keras.Model) -> int:
    """Every weight, trainable or frozen, except BatchNorm moving statistics (the paper's Table 3 count)."""
    moving = {
        id(v)
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
        for v in (layer.moving_mean, layer.moving_variance)
    }
    return int(sum(np.prod(v.shape) for v in model.weights if id(v) not in moving))


def load_reid_model(path: str | os.PathLike) -> RGAReID:
    """Load the re-id model of a ``.keras`` file (`as_reid_model` of what it holds: a file written by rga-keras 0.1
    is converted). FileNotFoundError or ValueError saying which file and why when it is not one."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    if not path.is_file() or path.suffix != ".keras":
        raise ValueError(f"expected a Keras model file ending in .keras (model.save('model.keras')), got {path}")
    if not zipfile.is_zipfile(path):  # Keras itself would say "File not found" about an existing file
        raise ValueError(f"could not load {path} as a Keras model: a .keras file is a zip archive, this one is not "
                         "(truncated, or not saved by model.save)")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as err:  # a zip that is not a model, unknown classes, ...: say which file and why
        raise ValueError(f"could not load {path} as a Keras model: {type(err).__name__}: {err}") from None
    return as_reid_model(model, source=str(path))


def as_reid_model(model: Any, source: str = "the model") -> RGAReID:
    """``model`` itself if it is an `RGAReID`; a flat functional model as rga-keras 0.1 saved them, converted
    to an `RGAReID` with the same weights (same layer names); a clear error for anything else."""
    if isinstance(model, RGAReID):
        return model
    if not isinstance(model, keras.Model) or not any(isinstance(layer, BNNeck) for layer in model.layers):
        raise ValueError(f"{source} holds {type(model).__name__} '{getattr(model, 'name', '?')}', which is not an "
                         f"RGA re-id model (rga_keras.RGAReID, as build_rga_resnet50 builds)")
    return _from_legacy(model)


def _from_legacy(old: keras.Model) -> RGAReID:
    """An `RGAReID` with the weights of a 0.1 functional model (one graph, layers named as our backbone's)."""
    rgas = [layer for layer in old.layers if isinstance(layer, RGA)]
    classifier = next(layer for layer in old.layers if isinstance(layer, keras.layers.Dense))
    backbone = RGAResNetBackbone(
        attention=rgas[0].mode if rgas else None, input_shape=old.input.shape[1:],
        last_stride=old.get_layer("layer4_0_conv2").strides[0],
        rga_stages=[int(layer.name.removeprefix("rga")) for layer in rgas] or (1, 2, 3, 4),
        rga_options=rgas[0].options if rgas else None, synchronized_bn=old.get_layer("bn1").synchronized,
        dtype=old.get_layer("conv1").dtype_policy, name=f"{old.name}_backbone")
    model = RGAReID(backbone, classifier.units, name=old.name)
    new_layers = {layer.name: layer for layer in (*backbone.layers, model.bnneck, model.classifier)}
    for layer in old.layers:
        if layer.weights:
            new_layers[layer.name].set_weights(layer.get_weights())
    return model
