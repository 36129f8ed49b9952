"""The attention designs the paper compares RGA with (Table 2), re-implemented on the same baseline.

The paper names them and gives their parameter counts (Table 3), not their placement or ratios; the
choices here are the standard published designs, sized where possible to reproduce Table 3
(docs/SCHEMES.md lists the choices, our counts and the paper's):

    SE       X ⊙ σ(W_2 ReLU(W_1 avg(X)))                               Hu et al. 2018, in every bottleneck
    CBAM-C   X ⊙ σ(Σ_{avg,max} W_2 ReLU(W_1 pool(X)))                   Woo et al. 2018
    CBAM-S   X ⊙ σ(BN(conv7×7([mean_c X, max_c X])))                    Woo et al. 2018
    FC-S/-C  features embedded by a 1×1 conv before pooling, FC layers over the pooled positions/channels
    NL       X + BN(W_z softmax(θ(X) φ(X)ᵀ) g(X))                      Wang et al. 2018 (embedded Gaussian)
    SNL      X + W_v Σ_j softmax_j(W_k x_j) x_j                         Cao et al. 2019 (GCNet §3.3)

Each is one layer X (B, H, W, C) → X' of the same shape, built from Keras layers and keras.ops only, so it
runs on every backend and exports to TFLite builtin ops. `rga_keras.attention.ATTENTIONS` names them for the
model family (``RGAResNetBackbone(attention="se")``) and says where each sits.
"""
from __future__ import annotations

from typing import Any, Sequence

import keras
from keras import ops

from rga_keras.checks import check_choice
from rga_keras.layers import batch_norm

POOLINGS = ("avg", "max")
CBAM_MODES = ("c", "s", "cs")
FC_MODES = ("s", "c", "s/c")


def _map_size(layer: keras.layers.Layer, input_shape: tuple) -> tuple[int, int, int]:
    """(H, W, C) of a fixed-size input; a clear error where the layer's weights or reshapes need them."""
    dims = tuple(input_shape[1:4])
    if len(input_shape) != 4 or None in dims:
        raise ValueError(f"{layer.name}: {type(layer).__name__} needs (batch, height, width, channels) inputs with a "
                         f"fixed size, got input shape {tuple(input_shape)}")
    return tuple(int(d) for d in dims)


def _positions(x):
    """(B, H, W, D) → (B, H·W, D), raster order."""
    return ops.reshape(x, (-1, x.shape[1] * x.shape[2], x.shape[3]))


def _dense(units: int, name: str, layer: keras.layers.Layer, **kwargs: Any) -> keras.layers.Dense:
    """A Dense (a 1×1 convolution on a feature map) with the owner's dtype policy."""
    return keras.layers.Dense(units, name=name, dtype=layer.dtype_policy, **kwargs)


@keras.saving.register_keras_serializable(package="rga_keras")
class SqueezeExcitation(keras.layers.Layer):
    """Channel gate X ⊙ σ(Σ_p W_2 ReLU(W_1 p(X))) over spatial poolings p (FC layers with biases).

    ``pooling=("avg",)`` is SE (Hu et al. 2018); ``("avg", "max")`` with the MLP shared by both poolings is
    CBAM's channel attention (Woo et al. 2018). The hidden width is C / ``reduction``.
    """

    def __init__(self, reduction: int = 16, pooling: Sequence[str] = ("avg",), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reduction = int(reduction)
        self.pooling = tuple(pooling)
        if self.reduction < 1 or not self.pooling:
            raise ValueError(f"reduction must be >= 1 and pooling non-empty, got {reduction} and {pooling}")
        for p in self.pooling:
            check_choice("pooling", p, POOLINGS)

    def build(self, input_shape: tuple) -> None:
        channels = int(input_shape[-1])
        hidden = max(1, channels // self.reduction)
        self.squeeze = _dense(hidden, "squeeze", self, activation="relu")
        self.excite = _dense(channels, "excite", self)
        self.squeeze.build((None, channels))
        self.excite.build((None, hidden))

    def gate(self, inputs):
        """The channel weights, (B, 1, 1, C)."""
        pools = {"avg": ops.mean, "max": ops.max}
        score = sum(self.excite(self.squeeze(pools[p](inputs, axis=(1, 2), keepdims=True))) for p in self.pooling)
        return ops.sigmoid(score)

    def call(self, inputs):
        return inputs * self.gate(inputs)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "reduction": self.reduction, "pooling": list(self.pooling)}


@keras.saving.register_keras_serializable(package="rga_keras")
class CBAM(keras.layers.Layer):
    """CBAM (Woo et al. 2018): channel attention, then spatial attention on the channel-attended features.

    Channel ("c"): `SqueezeExcitation` with average and max pooling. Spatial ("s"): a_s = σ(BN(conv_k×k(
    [mean_c X, max_c X]))), one map (B, H, W, 1) from a k×k convolution (no bias) over the two channel
    poolings. ``mode`` "c" (CBAM-C), "s" (CBAM-S) or "cs" (both, CBAM's order).
    """

    def __init__(self, mode: str = "cs", reduction: int = 16, kernel_size: int = 7, synchronized_bn: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_choice("mode", mode, CBAM_MODES)
        self.mode, self.reduction, self.kernel_size = mode, int(reduction), int(kernel_size)
        self.synchronized_bn = bool(synchronized_bn)
        self.channel = self.spatial_conv = None
        if "c" in mode:
            self.channel = SqueezeExcitation(reduction, POOLINGS, name="channel", dtype=self.dtype_policy)
        if "s" in mode:
            self.spatial_conv = keras.layers.Conv2D(1, self.kernel_size, padding="same", use_bias=False,
                                                    name="spatial_conv", dtype=self.dtype_policy)
            self.spatial_bn = batch_norm("spatial_bn", self.synchronized_bn, dtype=self.dtype_policy)

    def build(self, input_shape: tuple) -> None:
        if self.channel is not None:
            self.channel.build(input_shape)
        if self.spatial_conv is not None:
            self.spatial_conv.build((*input_shape[:3], 2))
            self.spatial_bn.build((*input_shape[:3], 1))

    def spatial_gate(self, inputs, training=None):
        """The spatial weights, (B, H, W, 1)."""
        pooled = ops.concatenate([ops.mean(inputs, axis=-1, keepdims=True), ops.max(inputs, axis=-1, keepdims=True)],
                                 axis=-1)
        return ops.sigmoid(self.spatial_bn(self.spatial_conv(pooled), training=training))

    def call(self, inputs, training=None):
        x = inputs if self.channel is None else self.channel(inputs)
        return x if self.spatial_conv is None else x * self.spatial_gate(x, training)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode, "reduction": self.reduction,
                "kernel_size": self.kernel_size, "synchronized_bn": self.synchronized_bn}


class _FCGate(keras.layers.Layer):
    """One `FCAttention` branch: maps X to its weights, (B, H, W, 1) for "spatial", (B, 1, 1, C) for "channel"."""

    def __init__(self, axis: str, reduction: int, synchronized_bn: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.axis, self.reduction, self.synchronized_bn = axis, reduction, synchronized_bn

    def build(self, input_shape: tuple) -> None:
        height, width, channels = _map_size(self, input_shape)
        embed_dim, positions = max(1, channels // self.reduction), height * width
        self.embed = keras.layers.Conv2D(embed_dim, 1, use_bias=False, name="embed", dtype=self.dtype_policy)
        self.embed_bn = batch_norm("embed_bn", self.synchronized_bn, dtype=self.dtype_policy)
        self.embed.build(input_shape)
        self.embed_bn.build((*input_shape[:3], embed_dim))
        if self.axis == "spatial":
            self.fcs = [_dense(max(1, positions // self.reduction), "fc1", self, activation="relu"),
                        _dense(positions, "fc2", self)]
            self.fcs[0].build((None, positions))
            self.fcs[1].build((None, self.fcs[0].units))
        else:
            self.fcs = [_dense(channels, "fc", self)]
            self.fcs[0].build((None, embed_dim))

    def call(self, inputs, training=None):
        e = ops.relu(self.embed_bn(self.embed(inputs), training=training))
        height, width, channels = inputs.shape[1:4]
        spatial = self.axis == "spatial"
        score = ops.reshape(ops.mean(e, axis=-1), (-1, height * width)) if spatial else ops.mean(e, axis=(1, 2))
        for fc in self.fcs:
            score = fc(score)
        return ops.reshape(ops.sigmoid(score), (-1, height, width, 1) if spatial else (-1, 1, 1, channels))


@keras.saving.register_keras_serializable(package="rga_keras")
class FCAttention(keras.layers.Layer):
    """FC attention (after HydraPlus-Net, Liu et al. 2017, as the RGA paper re-implements it).

    As the paper says, the features are embedded by a 1×1 convolution before pooling: E = ReLU(BN(X W_e)),
    C → C/r, one embedding per branch. Spatial ("s"): the channel mean of E, (B, H·W), through FC layers
    H·W → H·W/r → H·W (ReLU between), sigmoid → (B, H, W, 1). Channel ("c"): the spatial mean of E, (B, C/r),
    through one FC layer to C, sigmoid → (B, 1, 1, C). "s/c": both computed from X and applied together,
    X ⊙ a_s ⊙ a_c. The FC layers have biases; the spatial ones tie the layer to its input size.
    """

    def __init__(self, mode: str = "s/c", reduction: int = 8, synchronized_bn: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_choice("mode", mode, FC_MODES)
        self.mode, self.reduction, self.synchronized_bn = mode, int(reduction), bool(synchronized_bn)
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        self.gates = [_FCGate(axis, self.reduction, self.synchronized_bn, name=axis, dtype=self.dtype_policy)
                      for axis in ("spatial", "channel") if axis[0] in mode]

    def build(self, input_shape: tuple) -> None:
        for gate in self.gates:
            gate.build(input_shape)

    def call(self, inputs, training=None):
        x = inputs
        for gate in self.gates:
            x = x * gate(inputs, training=training)
        return x

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode, "reduction": self.reduction,
                "synchronized_bn": self.synchronized_bn}


@keras.saving.register_keras_serializable(package="rga_keras")
class NonLocal(keras.layers.Layer):
    """Non-local block, embedded Gaussian (Wang et al. 2018, eq. 1-3 and Fig. 2):

        Z = X + BN(W_z y),  y_i = Σ_j softmax_j(θ(x_i) · φ(x_j)) g(x_j),

    θ, φ, g, W_z 1×1 convolutions with biases, inner width C / ``reduction``. BN's γ starts at 0 (as Wang et
    al. initialise it), so the block starts as the identity and a pretrained baseline is unchanged.
    """

    def __init__(self, reduction: int = 2, synchronized_bn: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reduction, self.synchronized_bn = int(reduction), bool(synchronized_bn)
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")

    def build(self, input_shape: tuple) -> None:
        channels = _map_size(self, input_shape)[2]
        inner = max(1, channels // self.reduction)
        self.theta, self.phi, self.g = (_dense(inner, n, self) for n in ("theta", "phi", "g"))
        self.out = _dense(channels, "out", self)
        self.out_bn = batch_norm("out_bn", self.synchronized_bn, gamma_initializer="zeros", dtype=self.dtype_policy)
        for layer in (self.theta, self.phi, self.g):
            layer.build(input_shape)
        self.out.build((*input_shape[:3], inner))
        self.out_bn.build(input_shape)

    def call(self, inputs, training=None):
        theta, phi, g = (_positions(f(inputs)) for f in (self.theta, self.phi, self.g))
        affinity = ops.softmax(ops.matmul(theta, ops.swapaxes(phi, -1, -2)), axis=-1)  # (B, N, N)
        y = ops.reshape(ops.matmul(affinity, g), (-1, *inputs.shape[1:3], g.shape[-1]))
        return inputs + self.out_bn(self.out(y), training=training)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "reduction": self.reduction, "synchronized_bn": self.synchronized_bn}


@keras.saving.register_keras_serializable(package="rga_keras")
class SimplifiedNonLocal(keras.layers.Layer):
    """Simplified non-local block (Cao et al. 2019, GCNet §3.3, Fig. 3b): one query-independent map

        Z = X + W_v c,  c = Σ_j softmax_j(W_k x_j) x_j,

    W_k a 1×1 convolution C → 1 and W_v one C → C, both with biases; W_v c is added at every position.
    W_v starts at zero (as GCNet initialises its last transform), so the block starts as the identity.
    """

    def build(self, input_shape: tuple) -> None:
        channels = _map_size(self, input_shape)[2]
        self.key = _dense(1, "key", self)
        self.value = _dense(channels, "value", self, kernel_initializer="zeros")
        self.key.build(input_shape)
        self.value.build((None, channels))

    def call(self, inputs):
        weights = ops.softmax(_positions(self.key(inputs)), axis=1)  # (B, N, 1)
        context = ops.matmul(ops.swapaxes(weights, -1, -2), _positions(inputs))  # (B, 1, C)
        return inputs + ops.expand_dims(self.value(context), 1)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)
