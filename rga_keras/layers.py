"""Relation-Aware Global Attention layers (Zhang et al., CVPR 2020), Keras 3, channels-last.

`RelationAttention` is one branch of the paper's module: RGA-S when ``axis="spatial"`` (the H·W positions
are the graph nodes, their C-dim vectors the node features) or RGA-C when ``axis="channel"`` (the C channels
are the nodes, their H·W maps the features). Both run the same recipe on a node matrix F (nodes × features):

    θ, φ, g = ReLU(BN(F W_θ)), ReLU(BN(F W_φ)), ReLU(BN(F W_g))        (paper eq. 1-2; one fused matmul)
    R = θ φᵀ,  r_i = [R[i, :], R[:, i]]                                 (eq. 3, row first, then column)
    y_i = [mean_k g_ik,  ReLU(BN(W_r r_i))]                             (eq. 4, "ori" then "rel")
    a_i = sigmoid(BN(W_2 ReLU(BN(W_1 y_i))))                            (eq. 5)

`RGA` combines the branches as the paper's Table 1 does ("s", "c", "sc", "cs", "s//c") and applies
a ⊙ X. Every projection is a 1×1 convolution without bias, i.e. a matmul over the last axis here.

The default ``relation="fused"`` never forms the nodes×nodes matrix R: W_r is linear, so with
W_r = [W_row; W_col],  W_rowᵀ R[i, :] = (W_rowᵀ Φ) θ_i  and  W_colᵀ R[:, i] = (W_colᵀ Θ) φ_i,
which costs O(nodes·r·e) instead of O(nodes²·r) (docs/DESIGN.md §1). ``relation="explicit"`` builds R and
is kept for checking and for visualising relations (paper Fig. 4).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import keras
from keras import ops

from rga_keras.checks import check_choice

# PyTorch BatchNorm defaults (momentum 0.1 there is 0.9 here), so official weights load exactly.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

MODES = ("s", "c", "sc", "cs", "s//c")
EMBEDDINGS = ("asymmetric", "symmetric", "none")
RELATIONS = ("fused", "explicit")
AXES = ("spatial", "channel")


def batch_norm(name: str, synchronized: bool = False, **kwargs: Any) -> keras.layers.BatchNormalization:
    """A BatchNormalization with PyTorch's momentum/epsilon, as every BN of the paper's network."""
    return keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=synchronized, name=name, **kwargs
    )


@dataclasses.dataclass(frozen=True)
class RGAOptions:
    """The options of an RGA module, shared by its branches (the one place they are spelled out).

    s1: embedding reduction ratio, for the feature embedding (C' = C/s1 or N' = N/s1) and the relation
        embedding (N' = N/s1 or C' = C/s1). s2: reduction ratio of the attention head's hidden layer.
    use_relation / use_original: Table 1 ablations "w/o Rel." / "w/o Ori.".
    embedding: "asymmetric" (θ, φ), "symmetric" (θ = φ) or "none" (raw features), paper Table 4.
    relation: "fused" (fast, exact) or "explicit" (builds R); both compute the same function.
    """

    s1: int = 8
    s2: int = 8
    use_relation: bool = True
    use_original: bool = True
    embedding: str = "asymmetric"
    relation: str = "fused"

    def __post_init__(self) -> None:
        for ratio in ("s1", "s2"):  # 8.0 from a YAML or JSON file is 8
            object.__setattr__(self, ratio, int(getattr(self, ratio)))
        check_choice("embedding", self.embedding, EMBEDDINGS)
        check_choice("relation", self.relation, RELATIONS)
        if not (self.use_relation or self.use_original):
            raise ValueError("use_relation and use_original cannot both be False: the attention head has no input")
        if int(self.s1) < 1 or int(self.s2) < 1:
            raise ValueError(f"s1 and s2 must be >= 1, got s1={self.s1}, s2={self.s2}")

    @classmethod
    def make(cls, options: "RGAOptions | dict | None" = None, **changes: Any) -> "RGAOptions":
        """Options from an `RGAOptions`, a dict (a saved config) or None (defaults), with ``changes`` applied."""
        base = options if isinstance(options, RGAOptions) else cls(**(options or {}))
        return dataclasses.replace(base, **changes) if changes else base

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _split_options(options: "RGAOptions | dict | None", kwargs: dict) -> RGAOptions:
    """Take the option keywords (``s1=``, ``use_relation=``, ...) out of a layer's ``kwargs``."""
    names = [field.name for field in dataclasses.fields(RGAOptions)]
    return RGAOptions.make(options, **{name: kwargs.pop(name) for name in names if name in kwargs})


def _float32_or_wider(dtype: Any) -> str:
    """float16 / bfloat16 → float32; float32 and float64 stay."""
    dtype = keras.backend.standardize_dtype(dtype)
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def _transpose(x):
    """Swap the last two axes of a batch of matrices."""
    return ops.swapaxes(x, -1, -2)


def _product(a, b):
    """a (B, n, e) times b (B, e, r). For e = 1 (RGA-C on maps of fewer than 2·s1 positions, e.g. stages 3-4
    of a 64×32 input) it is an outer product, written as a broadcast multiply: an int8 TFLite model then runs it
    in XNNPACK's int8 multiply instead of LiteRT's int8 batch matmul, 19× slower there (docs/BENCHMARKS.md)."""
    return ops.multiply(a, b) if a.shape[-1] == 1 else ops.matmul(a, b)


@keras.saving.register_keras_serializable(package="rga_keras")
class RelationAttention(keras.layers.Layer):
    """One RGA branch: maps X (B, H, W, C) to its attention weights, broadcastable to X.

    Returns (B, H, W, 1) for ``axis="spatial"`` and (B, 1, 1, C) for ``axis="channel"``, in float32 (float64
    for a float64 layer). With ``return_relation=True`` at call time it also returns R (B, nodes, nodes), same dtype.

    Args:
        axis: "spatial" (RGA-S) or "channel" (RGA-C).
        options: an `RGAOptions` (or its dict); its fields may also be given as keywords
            (``RelationAttention("spatial", use_relation=False)``).
        synchronized_bn: synchronise BatchNorm statistics across replicas.
    """

    def __init__(
        self,
        axis: str = "spatial",
        options: RGAOptions | dict | None = None,
        synchronized_bn: bool = False,
        **kwargs: Any,
    ) -> None:
        options = _split_options(options, kwargs)
        super().__init__(autocast=False, **kwargs)
        check_choice("axis", axis, AXES)
        self.axis = axis
        self.options = options
        self.synchronized_bn = bool(synchronized_bn)

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def num_embeddings(self) -> int:
        """How many embeddings share the fused input matmul, in column order [θ | φ | g]."""
        rel = {"asymmetric": 2, "symmetric": 1, "none": 0}[self.options.embedding] if self.options.use_relation else 0
        return rel + int(self.options.use_original)

    def build(self, input_shape: tuple) -> None:
        _, height, width, channels = input_shape
        if None in (height, width, channels):
            raise ValueError(
                f"{self.name}: RGA needs a fixed spatial size and channel count at build time "
                f"(its relation weights depend on them), got input shape {tuple(input_shape)}"
            )
        self.map_shape = (int(height), int(width), int(channels))
        positions = int(height) * int(width)
        self.num_nodes, self.num_features = (
            (positions, int(channels)) if self.axis == "spatial" else (int(channels), positions)
        )
        self.embed_dim = max(1, self.num_features // self.options.s1)
        self.relation_dim = max(1, self.num_nodes // self.options.s1)
        head_in = int(self.options.use_original) + (self.relation_dim if self.options.use_relation else 0)
        self.hidden_dim = max(1, head_in // self.options.s2)

        def kernel(name: str, shape: tuple) -> keras.Variable:
            return self.add_weight(name=name, shape=shape, initializer="he_normal", trainable=True)

        self.embed_kernel = None
        if self.num_embeddings:
            self.embed_kernel = kernel("embed_kernel", (self.num_features, self.num_embeddings * self.embed_dim))
            self.embed_bn = batch_norm("embed_bn", self.synchronized_bn, dtype=self.dtype_policy)
            self.embed_bn.build((None, self.num_nodes, self.num_embeddings * self.embed_dim))
        if self.options.use_relation:
            self.relation_kernel = kernel("relation_kernel", (2 * self.num_nodes, self.relation_dim))
            self.relation_bn = batch_norm("relation_bn", self.synchronized_bn, dtype=self.dtype_policy)
            self.relation_bn.build((None, self.num_nodes, self.relation_dim))
        self.head_kernel1 = kernel("head_kernel1", (head_in, self.hidden_dim))
        self.head_bn1 = batch_norm("head_bn1", self.synchronized_bn, dtype=self.dtype_policy)
        self.head_bn1.build((None, self.num_nodes, self.hidden_dim))
        self.head_kernel2 = kernel("head_kernel2", (self.hidden_dim, 1))
        self.head_bn2 = batch_norm("head_bn2", self.synchronized_bn, dtype=self.dtype_policy)
        self.head_bn2.build((None, self.num_nodes, 1))

    # -- computation -------------------------------------------------------------------------------
    def check_input_shape(self, shape: tuple, owner: str | None = None) -> None:
        """Raise a clear error when X does not have the spatial size the layer was built for."""
        got = tuple(shape[1:4])
        if all(d is not None for d in got) and tuple(int(d) for d in got) != self.map_shape:
            h, w, c = self.map_shape
            raise ValueError(
                f"{owner or self.name} was built for feature maps of {h}x{w}x{c} (its relation weights depend on "
                f"the number of positions, {h * w}), but got {got[0]}x{got[1]}x{got[2]}. "
                f"A built RGA model is tied to its input size: build a new model for this size."
            )

    @staticmethod
    def _project(a, kernel):
        """Node-wise 1×1 convolution: a (B, n, k) times kernel (k, m) → (B, n, m).

        Done as one 2-D matmul over all B·n rows: a broadcast batch matmul is several times slower on CPU.
        """
        k, m = kernel.shape
        out = ops.matmul(ops.reshape(a, (-1, k)), ops.cast(kernel, a.dtype))
        return ops.reshape(out, (-1, a.shape[1], m))

    @staticmethod
    def _linear_bn(bn: keras.layers.BatchNormalization, training, kernel: keras.Variable, product):
        """BN(product(kernel)) for a product that is linear in the kernel's columns.

        Where BN uses its moving statistics (inference, or a frozen BN) it is an affine map per column,
        folded here into the kernel and a bias, product(kernel·s) + t: one pass over the result instead of
        three, and exported graphs get the folded kernel as a constant.
        """
        if training and bn.trainable:
            return bn(product(kernel), training=True)
        scale = bn.gamma * ops.rsqrt(bn.moving_variance + bn.epsilon)
        out = product(kernel * scale)
        return out + ops.cast(bn.beta - bn.moving_mean * scale, out.dtype)

    def _relation_features(self, theta, phi, kernel, relation, training):
        """W_rᵀ [R[i,:], R[:,i]] for every node i (eq. 3-4 before BN), with W_r = kernel.

        The explicit path projects R (given); the fused path never forms it: Θ (Φᵀ W_row) + Φ (Θᵀ W_col)
        (Θ (Θᵀ (W_row + W_col)) when θ = φ). In training the two terms are one product,
        [Θ | Φ] [Φᵀ W_row; Θᵀ W_col], so the nodes × r result is written once (a GPU step's memory traffic,
        docs/DESIGN.md §1); at inference they stay two products, so a quantised export keeps θ and φ at
        their own scales instead of one shared by their concatenation, and an outer product (e = 1) is a
        broadcast multiply (`_product`).
        """
        kernel = ops.cast(kernel, theta.dtype)
        if self.options.relation == "explicit":
            return self._project(ops.concatenate([relation, _transpose(relation)], axis=-1), kernel)
        w_row, w_col = kernel[: self.num_nodes], kernel[self.num_nodes :]
        if theta is phi:  # symmetric embedding, or raw features
            return _product(theta, self._project(_transpose(theta), w_row + w_col))
        phi_row = self._project(_transpose(phi), w_row)  # (B, e, r) = Φᵀ W_row
        theta_col = self._project(_transpose(theta), w_col)  # (B, e, r) = Θᵀ W_col
        if training:
            return ops.matmul(ops.concatenate([theta, phi], axis=-1), ops.concatenate([phi_row, theta_col], axis=1))
        return _product(theta, phi_row) + _product(phi, theta_col)

    def call(self, inputs, training: bool | None = None, return_relation: bool = False):
        self.check_input_shape(inputs.shape)
        dtype = self.compute_dtype
        h, w, c = self.map_shape
        flat = ops.reshape(ops.cast(inputs, dtype), (-1, h * w, c))  # (B, N, C), raster order
        spatial = self.axis == "spatial"
        nodes = flat if spatial else _transpose(flat)  # (B, nodes, features)

        # Every BN here follows a product linear in its kernel, so at inference each is folded into that
        # kernel (`_linear_bn`), the relation BN and the head's first BN included.
        relation = emb = None
        if self.embed_kernel is not None:  # θ, φ, g from one matmul: (B, nodes, k·e)
            emb = ops.relu(self._linear_bn(self.embed_bn, training, self.embed_kernel,
                                           lambda kernel: self._project(nodes, kernel)))
        e = self.embed_dim
        if self.options.use_original:
            mean_g = ops.mean(emb[..., -e:], axis=-1, keepdims=True)  # (B, nodes, 1)
        if self.options.use_relation:
            if self.options.embedding == "asymmetric":
                theta, phi = emb[..., :e], emb[..., e : 2 * e]
            elif self.options.embedding == "symmetric":
                theta = phi = emb[..., :e]
            else:  # raw node features
                theta = phi = nodes
            # Half precision is promoted to float32 here: the relation terms are sums of thousands of products.
            if keras.backend.standardize_dtype(theta.dtype) in ("float16", "bfloat16"):
                symmetric = theta is phi
                theta = ops.cast(theta, "float32")
                phi = theta if symmetric else ops.cast(phi, "float32")
            if self.options.relation == "explicit" or return_relation:
                relation = _product(theta, _transpose(phi))  # R[i, j] = θ_i · φ_j
            rel = self._linear_bn(self.relation_bn, training, self.relation_kernel,
                                  lambda kernel: self._relation_features(theta, phi, kernel, relation, training))
            rel = ops.relu(ops.cast(rel, dtype))

        def head_projection(kernel):  # W_1 y = W_1[0] ori + W_1[1:] rel: summed, not concatenated (no copy of rel)
            out = mean_g * ops.cast(kernel[0], dtype) if self.options.use_original else 0.0
            if self.options.use_relation:
                out = out + self._project(rel, kernel[int(self.options.use_original) :])  # _project casts the kernel
            return out

        hidden = ops.relu(self._linear_bn(self.head_bn1, training, self.head_kernel1, head_projection))
        score = self._linear_bn(self.head_bn2, training, self.head_kernel2,
                                lambda kernel: self._project(hidden, kernel))
        attention = ops.sigmoid(ops.cast(score, _float32_or_wider(score.dtype)))  # (B, nodes, 1)
        attention = ops.reshape(attention, (-1, h, w, 1) if spatial else (-1, 1, 1, c))
        return (attention, relation) if return_relation else attention

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        batch, height, width, channels = input_shape
        return (batch, height, width, 1) if self.axis == "spatial" else (batch, 1, 1, channels)

    def compute_output_spec(self, inputs, training=None, return_relation: bool = False):
        """The attention is float32 under any half-precision policy (sigmoid of a float32 score), R too."""
        dtype = _float32_or_wider(self.compute_dtype)
        attention = keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype=dtype)
        if not return_relation:
            return attention
        batch, height, width, channels = inputs.shape
        nodes = height * width if self.axis == "spatial" else channels
        relation = keras.KerasTensor((batch, nodes, nodes), dtype=dtype) if self.options.use_relation else None
        return attention, relation

    def get_config(self) -> dict:
        config = super().get_config()
        return {**config, "axis": self.axis, "options": self.options.to_dict(), "synchronized_bn": self.synchronized_bn}


@keras.saving.register_keras_serializable(package="rga_keras")
class RGA(keras.layers.Layer):
    """Relation-aware global attention module: X (B, H, W, C) → attended X, same shape.

    ``mode`` (paper Table 1): "s" RGA-S, "c" RGA-C, "sc" S then C on the S-attended features (the paper's
    model), "cs" C then S, "s//c" both computed from the same X and applied together (X ⊙ a_s ⊙ a_c).
    ``options`` (an `RGAOptions`, or its fields as keywords) and ``synchronized_bn`` are shared by both
    branches (see `RelationAttention`).

    ``layer(x, return_maps=True)`` returns ``(output, maps)`` where maps holds "spatial_attention"
    (B, H, W, 1) and/or "channel_attention" (B, 1, 1, C), and the relation matrices "spatial_relation"
    (B, N, N) / "channel_relation" (B, C, C), each taken from the features its branch actually saw.
    """

    def __init__(
        self,
        mode: str = "sc",
        options: RGAOptions | dict | None = None,
        synchronized_bn: bool = False,
        **kwargs: Any,
    ) -> None:
        options = _split_options(options, kwargs)
        super().__init__(**kwargs)
        check_choice("mode", mode, MODES)
        self.mode = mode
        self.options = options
        self.synchronized_bn = bool(synchronized_bn)
        self.spatial = self.channel = None
        for axis in ("spatial", "channel"):
            if axis[0] in mode:
                branch = RelationAttention(axis, options, synchronized_bn, name=axis, dtype=self.dtype_policy)
                setattr(self, axis, branch)

    @property
    def branches(self) -> list:
        """The branches in the order they run."""
        if self.mode == "cs":
            return [self.channel, self.spatial]
        return [b for b in (self.spatial, self.channel) if b is not None]

    def build(self, input_shape: tuple) -> None:
        for branch in self.branches:
            branch.build(input_shape)

    def call(self, inputs, training: bool | None = None, return_maps: bool = False):
        self.branches[0].check_input_shape(inputs.shape, owner=f"RGA layer '{self.name}'")
        maps = {}

        def attend(branch: RelationAttention, x):
            if return_maps:
                a, relation = branch(x, training=training, return_relation=True)
                if relation is not None:  # "w/o Rel." (use_relation=False) has no relation matrix
                    maps[branch.axis + "_relation"] = relation
            else:
                a = branch(x, training=training)
            maps[branch.axis + "_attention"] = a
            return ops.cast(a, x.dtype)

        if self.mode == "s//c":
            x = inputs * attend(self.spatial, inputs) * attend(self.channel, inputs)
        else:
            x = inputs
            for branch in self.branches:
                x = x * attend(branch, x)
        return (x, maps) if return_maps else x

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def compute_output_spec(self, inputs, training=None, return_maps: bool = False):
        output = keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)
        if not return_maps:
            return output
        maps = {}
        for branch in self.branches:
            attention, relation = branch.compute_output_spec(inputs, return_relation=True)
            maps[branch.axis + "_attention"] = attention
            if relation is not None:
                maps[branch.axis + "_relation"] = relation
        return output, maps

    def get_config(self) -> dict:
        config = super().get_config()
        return {**config, "mode": self.mode, "options": self.options.to_dict(), "synchronized_bn": self.synchronized_bn}
