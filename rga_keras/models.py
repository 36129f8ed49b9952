"""The re-id network: ResNet-50 v1.5 with RGA modules after its stages and a BNNeck head (DESIGN.md §2).

The model is a Keras functional model. It takes raw RGB pixels (float, 0–255) and normalises them with the
ImageNet mean/std itself, so exported models need no preprocessing. Its output is a dict:
``"features"`` (the 2048-d pooled feature before the BNNeck, used by the triplet loss) and ``"logits"``.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import keras
import numpy as np

from rga_keras.layers import BN_EPSILON, BN_MOMENTUM, MODES, RGA, batch_norm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET50_BLOCKS = (3, 4, 6, 3)
RESNET50_WIDTHS = (64, 128, 256, 512)
FEATURES = ("after_bn", "before_bn")


@keras.saving.register_keras_serializable(package="rga_keras")
class BNNeck(keras.layers.BatchNormalization):
    """BNNeck (Luo et al., 2019): BatchNorm between the feature and the classifier whose shift is frozen
    at zero, so the "after BN" feature is a pure per-channel scaling of a centred feature."""

    def build(self, input_shape: tuple) -> None:
        super().build(input_shape)
        if self.center:
            self.beta.trainable = False


def _conv(x, filters: int, kernel: int, stride: int, name: str):
    """Conv without bias, padded symmetrically as PyTorch does (explicit ZeroPadding2D + "valid")."""
    pad = kernel // 2
    if pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(filters, kernel, strides=stride, use_bias=False, name=name)(x)


def _bottleneck(x, width: int, stride: int, name: str, synchronized_bn: bool, zero_init_residual: bool):
    """ResNet v1.5 bottleneck: the stride sits on the 3×3 convolution (as torchvision)."""
    shortcut = x
    out = keras.layers.ReLU()(batch_norm(f"{name}_bn1", synchronized_bn)(_conv(x, width, 1, 1, f"{name}_conv1")))
    out = keras.layers.ReLU()(batch_norm(f"{name}_bn2", synchronized_bn)(_conv(out, width, 3, stride, f"{name}_conv2")))
    last_bn = batch_norm(f"{name}_bn3", synchronized_bn, gamma_initializer="zeros" if zero_init_residual else "ones")
    out = last_bn(_conv(out, 4 * width, 1, 1, f"{name}_conv3"))
    if stride != 1 or x.shape[-1] != 4 * width:
        shortcut = _conv(x, 4 * width, 1, stride, f"{name}_downsample_conv")
        shortcut = batch_norm(f"{name}_downsample_bn", synchronized_bn)(shortcut)
    return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add()([out, shortcut]))


def build_rga_resnet50(
    num_classes: int,
    attention: str | None = "sc",
    input_shape: Sequence[int] = (256, 128, 3),
    last_stride: int = 1,
    rga_stages: Iterable[int] = (1, 2, 3, 4),
    backbone_weights: str | None = None,
    *,
    s1: int = 8,
    s2: int = 8,
    use_relation: bool = True,
    use_original: bool = True,
    embedding: str = "asymmetric",
    relation: str = "fused",
    synchronized_bn: bool = False,
    zero_init_residual: bool = True,
    name: str | None = None,
) -> keras.Model:
    """Build the RGA re-id network (paper Fig. 3): ResNet-50 v1.5 + RGA after each chosen stage + BNNeck.

    Args:
        num_classes: training identities (classifier width).
        attention: an `RGA` mode ("s", "c", "sc", "cs", "s//c") or None for the paper's baseline.
        input_shape: (H, W, 3) of the raw RGB input; RGA weights depend on it.
        last_stride: stride of stage 4 (1 in the paper, giving a 16×8 final map for 256×128).
        rga_stages: which of the stages 1–4 get an RGA module.
        backbone_weights: None, "imagenet", or a path to a Keras ResNet50 ``*_notop.h5`` or a torchvision
            ``resnet50`` state dict (``.npz``, or ``.pth`` with torch installed); see `rga_keras.weights`.
        s1, s2, use_relation, use_original, embedding, relation: `RGA` options (ablations of Tables 1, 4).
        synchronized_bn: synchronise every BatchNorm's statistics across replicas.
        zero_init_residual: start the last BN of every residual branch at γ = 0 (Goyal et al., 2017), so
            each block starts as the identity. Loaded backbone weights replace it; from scratch it makes
            the network learn several times sooner (docs/TRAINING.md, the demo).
    """
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if attention is not None and attention not in MODES:
        raise ValueError(f"attention must be None or one of {MODES}, got {attention!r}")
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
    stages = tuple(sorted(set(int(s) for s in rga_stages)))
    if any(s not in (1, 2, 3, 4) for s in stages):
        raise ValueError(f"rga_stages must be a subset of (1, 2, 3, 4), got {tuple(rga_stages)}")
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or input_shape[2] != 3 or min(input_shape[:2]) < 32:
        raise ValueError(f"input_shape must be (height, width, 3) with height, width >= 32, got {input_shape}")

    images = keras.Input(input_shape, name="images")
    x = keras.layers.Normalization(
        mean=[255.0 * m for m in IMAGENET_MEAN],
        variance=[(255.0 * s) ** 2 for s in IMAGENET_STD],
        name="normalize",
    )(images)
    x = keras.layers.ReLU()(batch_norm("bn1", synchronized_bn)(_conv(x, 64, 7, 2, "conv1")))
    x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="maxpool")(x)
    rga_options = dict(
        s1=s1, s2=s2, use_relation=use_relation, use_original=use_original,
        embedding=embedding, relation=relation, synchronized_bn=synchronized_bn,
    )
    for stage, (blocks, width) in enumerate(zip(RESNET50_BLOCKS, RESNET50_WIDTHS), start=1):
        stride = 1 if stage == 1 else (last_stride if stage == 4 else 2)
        for block in range(blocks):
            x = _bottleneck(x, width, stride if block == 0 else 1, f"layer{stage}_{block}", synchronized_bn,
                            zero_init_residual)
        if attention is not None and stage in stages:
            x = RGA(attention, name=f"rga{stage}", **rga_options)(x)

    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    # The head runs in float32 under mixed precision, as Keras advises for model outputs.
    features = keras.layers.Activation("linear", dtype="float32", name="features")(pooled)
    after_bn = BNNeck(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype="float32", synchronized=synchronized_bn,
                      name="bnneck")(features)
    logits = keras.layers.Dense(
        num_classes,
        use_bias=False,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
        dtype="float32",
        name="classifier",
    )(after_bn)
    default_name = f"rga_{attention.replace('//', '_par_')}_resnet50" if attention else "baseline_resnet50"
    model = keras.Model(images, {"features": features, "logits": logits}, name=name or default_name)
    if backbone_weights is not None:
        from rga_keras.weights import load_backbone_weights

        load_backbone_weights(model, backbone_weights)
    return model


def _require_reid_model(model: keras.Model) -> None:
    names = {layer.name for layer in model.layers}
    if not {"features", "bnneck"} <= names:
        raise ValueError(
            f"expected an RGA re-id model built by rga_keras.build_rga_resnet50 (with layers 'features' and "
            f"'bnneck'), got model '{model.name}' with layers {sorted(names)[:8]}..."
        )


def embedding_model(model: keras.Model, feature: str = "after_bn") -> keras.Model:
    """Inference model images → retrieval embedding: the feature "after_bn" (BNNeck output) or "before_bn".

    The embedding is not L2-normalised; the cosine distance used for retrieval normalises it.
    """
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    _require_reid_model(model)
    layer = "bnneck" if feature == "after_bn" else "features"
    return keras.Model(model.input, model.get_layer(layer).output, name=f"{model.name}_embedding_{feature}")


def rga_layers(model: keras.Model) -> list[RGA]:
    """The model's RGA modules, in network order."""
    return [layer for layer in model.layers if isinstance(layer, RGA)]


def attention_model(model: keras.Model) -> keras.Model:
    """Inference model images → {"rga1": {"spatial_attention": ..., ...}, ...}: each RGA module's maps.

    The maps are the exact tensors the modules multiply the features by (and their relation matrices),
    computed by the same layers and weights as ``model``, so visualisations show what the network applies.
    """
    layers = rga_layers(model)
    if not layers:
        raise ValueError(f"model '{model.name}' has no RGA layers (a baseline model has no attention maps)")
    outputs = {layer.name: _AttentionMaps(layer, name=f"{layer.name}_maps")(layer.input) for layer in layers}
    return keras.Model(model.input, outputs, name=f"{model.name}_attention")


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


def count_parameters(model: keras.Model) -> int:
    """Every weight, trainable or frozen, except BatchNorm moving statistics (the paper's Table 3 count)."""
    moving = {
        id(v)
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
        for v in (layer.moving_mean, layer.moving_variance)
    }
    return int(sum(np.prod(v.shape) for v in model.weights if id(v) not in moving))


def describe(model: keras.Model) -> dict[str, Any]:
    """A small summary for logs: name, input shape, parameter count, RGA modes per stage."""
    return {
        "name": model.name,
        "input_shape": tuple(model.input.shape[1:]),
        "parameters": count_parameters(model),
        "rga": {layer.name: layer.mode for layer in rga_layers(model)},
    }
