"""The RGA ResNet-50 backbone: ResNet-50 v1.5 with RGA modules after chosen stages (docs/DESIGN.md §2).

A functional model (as keras-hub's backbones are): raw RGB pixels (float, 0–255) → the last stage's feature
map (B, H/16, W/16, 2048) at last stride 1. It normalises its input with the ImageNet mean/std itself, so
exported models need no preprocessing. Its constructor arguments are its config, so it round-trips through
``.keras`` files, and the paper's variants are presets (`rga_keras.models.presets`).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Sequence

import keras

from rga_keras import weights
from rga_keras.attention import ATTENTION_LAYERS, ATTENTIONS, attention_slug, check_attention
from rga_keras.layers import RGA, RGAOptions, batch_norm
from rga_keras.models.presets import backbone_config

RESNET50_BLOCKS = (3, 4, 6, 3)
RESNET50_WIDTHS = (64, 128, 256, 512)


def _conv(x, filters: int, kernel: int, stride: int, name: str, dtype: Any):
    """Conv without bias, padded symmetrically as PyTorch does (explicit ZeroPadding2D + "valid")."""
    pad = kernel // 2
    if pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad", dtype=dtype)(x)
    return keras.layers.Conv2D(filters, kernel, strides=stride, use_bias=False, name=name, dtype=dtype)(x)


def _bottleneck(x, width: int, stride: int, name: str, synchronized_bn: bool, zero_init_residual: bool, dtype: Any,
                attention: keras.layers.Layer | None = None):
    """ResNet v1.5 bottleneck: the stride sits on the 3×3 convolution (as torchvision). ``attention``, if
    given, acts on the residual branch before the addition (as SE-ResNet's SE blocks)."""
    def conv_bn(y, filters, kernel, stride_, part, **bn_kwargs):
        y = _conv(y, filters, kernel, stride_, f"{name}_{part[0]}", dtype)
        return batch_norm(f"{name}_{part[1]}", synchronized_bn, dtype=dtype, **bn_kwargs)(y)

    out = keras.layers.ReLU(dtype=dtype)(conv_bn(x, width, 1, 1, ("conv1", "bn1")))
    out = keras.layers.ReLU(dtype=dtype)(conv_bn(out, width, 3, stride, ("conv2", "bn2")))
    out = conv_bn(out, 4 * width, 1, 1, ("conv3", "bn3"), gamma_initializer="zeros" if zero_init_residual else "ones")
    if attention is not None:
        out = attention(out)
    shortcut = x
    if stride != 1 or x.shape[-1] != 4 * width:
        shortcut = conv_bn(x, 4 * width, 1, stride, ("downsample_conv", "downsample_bn"))
    return keras.layers.ReLU(name=f"{name}_out", dtype=dtype)(keras.layers.Add(dtype=dtype)([out, shortcut]))


@keras.saving.register_keras_serializable(package="rga_keras")
class RGAResNetBackbone(keras.Model):
    """ResNet-50 v1.5 (last stride 1) with an RGA module after each chosen stage (paper Fig. 3).

    Args:
        attention: a name of `rga_keras.attention.ATTENTIONS` — an `RGA` mode ("s", "c", "sc", "cs", "s//c")
            or one of the comparison schemes of Table 2 ("se", "cbam_c", "cbam_s", "cbam_cs", "fc_s", "fc_c",
            "fc_s/c", "nl", "snl") — or None for the paper's baseline; placed after each chosen stage as RGA,
            or inside every bottleneck of the chosen stages where the design puts it there (SE).
        input_shape: (H, W, 3) of the raw RGB input; the RGA weights depend on it.
        last_stride: stride of stage 4 (1 in the paper: a 16×8 final map for 256×128).
        rga_stages: which of the stages 1–4 get an RGA module (or the comparison scheme).
        rga_options: an `RGAOptions` (or its dict) for every module: the ablations of Tables 1 and 4.
        synchronized_bn: synchronise every BatchNorm's statistics across replicas.
        zero_init_residual: start the last BN of every residual branch at γ = 0 (Goyal et al., 2017), so
            each block starts as the identity; loaded weights replace it (docs/TRAINING.md, the demo).
        stage_blocks, stage_widths: bottlenecks per stage and their widths (output channels are 4× the
            width); ResNet-50's by default. Other values give smaller networks for tests and experiments;
            ImageNet and official weights exist only for ResNet-50's.
        dtype: the layers' dtype policy (None: the global policy).

    Example:
        >>> backbone = RGAResNetBackbone.from_preset("rga_sc_resnet50", input_shape=(256, 128, 3))
        >>> backbone.load_pretrained("imagenet")          # Keras' ResNet50 ImageNet weights
    """

    def __init__(
        self,
        attention: str | None = "sc",
        input_shape: Sequence[int] = (256, 128, 3),
        last_stride: int = 1,
        rga_stages: Sequence[int] = (1, 2, 3, 4),
        rga_options: RGAOptions | dict | None = None,
        synchronized_bn: bool = False,
        zero_init_residual: bool = True,
        stage_blocks: Sequence[int] = RESNET50_BLOCKS,
        stage_widths: Sequence[int] = RESNET50_WIDTHS,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        stage_blocks, stage_widths = tuple(int(b) for b in stage_blocks), tuple(int(w) for w in stage_widths)
        if len(stage_blocks) != 4 or len(stage_widths) != 4 or min(stage_blocks + stage_widths) < 1:
            raise ValueError(f"stage_blocks and stage_widths must be 4 positive numbers each, got {stage_blocks} "
                             f"and {stage_widths}")
        check_attention(attention)
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        stages = tuple(sorted(set(int(s) for s in rga_stages)))
        if any(s not in (1, 2, 3, 4) for s in stages):
            raise ValueError(f"rga_stages must be a subset of (1, 2, 3, 4), got {tuple(rga_stages)}")
        input_shape = tuple(int(d) for d in input_shape)
        if len(input_shape) != 3 or input_shape[2] != 3 or min(input_shape[:2]) < 32:
            raise ValueError(f"input_shape must be (height, width, 3) with height, width >= 32, got {input_shape}")
        options = RGAOptions.make(rga_options)
        spec = ATTENTIONS.get(attention)
        slug = attention_slug(attention) if attention else None

        # === Functional model ===
        images = keras.Input(input_shape, name="images")
        x = keras.layers.Normalization(
            mean=[255.0 * m for m in weights.IMAGENET_MEAN],
            variance=[(255.0 * s) ** 2 for s in weights.IMAGENET_STD],
            name="normalize", dtype=dtype,
        )(images)
        x = batch_norm("bn1", synchronized_bn, dtype=dtype)(_conv(x, 64, 7, 2, "conv1", dtype))
        x = keras.layers.ReLU(dtype=dtype)(x)
        x = keras.layers.ZeroPadding2D(1, name="maxpool_pad", dtype=dtype)(x)
        x = keras.layers.MaxPooling2D(3, strides=2, name="maxpool", dtype=dtype)(x)
        for stage, (blocks, width) in enumerate(zip(stage_blocks, stage_widths), start=1):
            stride = 1 if stage == 1 else (last_stride if stage == 4 else 2)
            chosen = spec is not None and stage in stages
            make = functools.partial(spec.make, dtype=dtype, synchronized_bn=synchronized_bn,
                                     rga_options=options) if chosen else None
            for block in range(blocks):
                block_name = f"layer{stage}_{block}"
                in_block = make(name=f"{block_name}_{slug}") if chosen and spec.in_blocks else None
                x = _bottleneck(x, width, stride if block == 0 else 1, block_name, synchronized_bn, zero_init_residual,
                                dtype, in_block)
            if chosen and not spec.in_blocks:  # RGA modules keep the official code's names: rga1 … rga4
                x = make(name=f"rga{stage}" if spec.layer_class is RGA else f"{slug}{stage}")(x)
        default_name = (f"rga_{slug}" if spec.layer_class is RGA else slug) + "_resnet50" if spec else "baseline_resnet50"
        kwargs.setdefault("name", default_name + "_backbone")
        super().__init__(inputs=images, outputs=x, **kwargs)
        if dtype is not None:  # Functional.__init__ does not take it; the saved config must hold the layers' policy
            self.dtype_policy = keras.dtype_policies.get(dtype)

        # === Config ===
        self.attention = attention
        self.image_shape = input_shape
        self.last_stride = int(last_stride)
        self.rga_stages = stages
        self.rga_options = options
        self.synchronized_bn = bool(synchronized_bn)
        self.zero_init_residual = bool(zero_init_residual)
        self.stage_blocks, self.stage_widths = stage_blocks, stage_widths

    @property
    def rga_layers(self) -> list[RGA]:
        """The RGA modules, in network order."""
        return [layer for layer in self.layers if isinstance(layer, RGA)]

    @property
    def attention_layers(self) -> list[keras.layers.Layer]:
        """The attention modules (`rga_keras.attention`: RGA or a Table 2 scheme), in network order."""
        return [layer for layer in self.layers if isinstance(layer, ATTENTION_LAYERS)]

    def resnet_layers(self) -> Iterator[tuple[str, keras.layers.Layer, str]]:
        """(torchvision key prefix, layer, "conv" | "bn") for every ResNet-50 weight layer.

        Our layer names are the torchvision keys with "." → "_" (``layer1.0.conv1`` → ``layer1_0_conv1``),
        the shortcut's ``downsample.0`` / ``.1`` → ``downsample_conv`` / ``downsample_bn``.
        """
        if (self.stage_blocks, self.stage_widths) != (RESNET50_BLOCKS, RESNET50_WIDTHS):
            raise ValueError(f"ResNet-50 weights need stage_blocks={RESNET50_BLOCKS} and stage_widths="
                             f"{RESNET50_WIDTHS}; this backbone has {self.stage_blocks} and {self.stage_widths}")
        yield "conv1", self.get_layer("conv1"), "conv"
        yield "bn1", self.get_layer("bn1"), "bn"
        for stage, blocks in enumerate(RESNET50_BLOCKS, start=1):
            for block in range(blocks):
                ours = f"layer{stage}_{block}"
                for i in (1, 2, 3):
                    yield f"layer{stage}.{block}.conv{i}", self.get_layer(f"{ours}_conv{i}"), "conv"
                    yield f"layer{stage}.{block}.bn{i}", self.get_layer(f"{ours}_bn{i}"), "bn"
                if block == 0:
                    yield f"layer{stage}.0.downsample.0", self.get_layer(f"{ours}_downsample_conv"), "conv"
                    yield f"layer{stage}.0.downsample.1", self.get_layer(f"{ours}_downsample_bn"), "bn"

    def load_pretrained(self, source: str | os.PathLike) -> None:
        """Load ImageNet weights into the ResNet-50 layers: ``"imagenet"`` (Keras' ResNet50, downloaded and
        cached as usual) or a local Keras ``*_notop.h5`` / torchvision ``resnet50`` ``.npz`` / ``.pth``."""
        weights.load_backbone_weights(self, source)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "RGAResNetBackbone":
        """A backbone of one of the paper's variants by name (`rga_keras.models.presets.PRESETS`).

        Architecture only: no pretrained RGA weights exist to download (use `load_pretrained` for
        ImageNet, `rga_keras.load_official_state_dict` for a model trained with the official code).
        """
        config = backbone_config(preset)
        options = overrides.get("rga_options")
        if isinstance(options, dict):  # option keys change the preset's options; an RGAOptions replaces them
            overrides["rga_options"] = RGAOptions.make(config.get("rga_options"), **options)
        return cls(**{**config, **overrides})

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "attention": self.attention,
            "input_shape": self.image_shape,
            "last_stride": self.last_stride,
            "rga_stages": self.rga_stages,
            "rga_options": self.rga_options.to_dict(),
            "synchronized_bn": self.synchronized_bn,
            "zero_init_residual": self.zero_init_residual,
            "stage_blocks": self.stage_blocks,
            "stage_widths": self.stage_widths,
        }
