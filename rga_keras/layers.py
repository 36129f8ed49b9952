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
which costs O(nodes·r·e) instead of O(nodes²·r) (DESIGN.md §1). ``relation="explicit"`` builds R and
is kept for checking and for visualising relations (paper Fig. 4).
"""
from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

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


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@keras.saving.register_keras_serializable(package="rga_keras")
class RelationAttention(keras.layers.Layer):
    """One RGA branch: maps X (B, H, W, C) to its attention weights, broadcastable to X.

    Returns (B, H, W, 1) for ``axis="spatial"`` and (B, 1, 1, C) for ``axis="channel"``, in float32.
    With ``return_relation=True`` at call time it also returns R (B, nodes, nodes), float32.

    Args:
        axis: "spatial" (RGA-S) or "channel" (RGA-C).
        s1: embedding reduction ratio, used for the feature embedding (C' = C/s1 or N' = N/s1) and for
            the relation embedding (N' = N/s1 or C' = C/s1).
        s2: reduction ratio of the attention head's hidden layer.
        use_relation / use_original: Table 1 ablations "w/o Rel." / "w/o Ori.".
        embedding: "asymmetric" (θ, φ), "symmetric" (θ = φ) or "none" (raw features), paper Table 4.
        relation: "fused" (fast, exact) or "explicit" (builds R).
        synchronized_bn: synchronise BatchNorm statistics across replicas.
    """

    def __init__(
        self,
        axis: str = "spatial",
        s1: int = 8,
        s2: int = 8,
        use_relation: bool = True,
        use_original: bool = True,
        embedding: str = "asymmetric",
        relation: str = "fused",
        synchronized_bn: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(autocast=False, **kwargs)
        _check_choice("axis", axis, AXES)
        _check_choice("embedding", embedding, EMBEDDINGS)
        _check_choice("relation", relation, RELATIONS)
        if not (use_relation or use_original):
            raise ValueError("use_relation and use_original cannot both be False: the attention head has no input")
        if s1 < 1 or s2 < 1:
            raise ValueError(f"s1 and s2 must be >= 1, got s1={s1}, s2={s2}")
        self.axis = axis
        self.s1, self.s2 = int(s1), int(s2)
        self.use_relation, self.use_original = bool(use_relation), bool(use_original)
        self.embedding, self.relation = embedding, relation
        self.synchronized_bn = bool(synchronized_bn)

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def num_embeddings(self) -> int:
        """How many embeddings share the fused input matmul, in column order [θ | φ | g]."""
        rel = {"asymmetric": 2, "symmetric": 1, "none": 0}[self.embedding] if self.use_relation else 0
        return rel + int(self.use_original)

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
        self.embed_dim = max(1, self.num_features // self.s1)
        self.relation_dim = max(1, self.num_nodes // self.s1)
        head_in = int(self.use_original) + (self.relation_dim if self.use_relation else 0)
        self.hidden_dim = max(1, head_in // self.s2)

        def kernel(name: str, shape: tuple) -> keras.Variable:
            return self.add_weight(name=name, shape=shape, initializer="he_normal", trainable=True)

        self.embed_kernel = None
        if self.num_embeddings:
            self.embed_kernel = kernel("embed_kernel", (self.num_features, self.num_embeddings * self.embed_dim))
            self.embed_bn = batch_norm("embed_bn", self.synchronized_bn, dtype=self.dtype_policy)
            self.embed_bn.build((None, self.num_nodes, self.num_embeddings * self.embed_dim))
        if self.use_relation:
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
    def _project(a: tf.Tensor, kernel: keras.Variable) -> tf.Tensor:
        """Node-wise 1×1 convolution: a (B, n, k) times kernel (k, m) → (B, n, m).

        Done as one 2-D matmul over all B·n rows: a broadcast batch matmul is several times slower on CPU.
        """
        k, m = kernel.shape
        out = tf.linalg.matmul(tf.reshape(a, (-1, k)), tf.cast(kernel, a.dtype))
        return tf.reshape(out, (-1, a.shape[1], m))

    @staticmethod
    def _linear_bn(bn: keras.layers.BatchNormalization, training, kernel: keras.Variable, product) -> tf.Tensor:
        """BN(product(kernel)) for a product that is linear in the kernel's columns.

        Where BN uses its moving statistics (inference, or a frozen BN) it is an affine map per column,
        folded here into the kernel and a bias, product(kernel·s) + t: one pass over the result instead of
        three, and exported graphs get the folded kernel as a constant.
        """
        if training and bn.trainable:
            return bn(product(kernel), training=True)
        scale = bn.gamma * tf.math.rsqrt(bn.moving_variance + bn.epsilon)
        out = product(kernel * scale)
        return out + tf.cast(bn.beta - bn.moving_mean * scale, out.dtype)

    def _relation_features(self, theta: tf.Tensor, phi: tf.Tensor, kernel: tf.Tensor, relation) -> tf.Tensor:
        """W_rᵀ [R[i,:], R[:,i]] for every node i (eq. 3-4 before BN), with W_r = kernel.

        The explicit path projects R (given); the fused path never forms it: Θ (Φᵀ W_row) + Φ (Θᵀ W_col).
        """
        kernel = tf.cast(kernel, theta.dtype)
        if self.relation == "explicit":
            return self._project(tf.concat([relation, tf.linalg.matrix_transpose(relation)], axis=-1), kernel)
        w_row, w_col = kernel[: self.num_nodes], kernel[self.num_nodes :]
        phi_row = self._project(tf.linalg.matrix_transpose(phi), w_row)  # (B, e, r) = Φᵀ W_row
        theta_col = self._project(tf.linalg.matrix_transpose(theta), w_col)  # (B, e, r) = Θᵀ W_col
        return tf.linalg.matmul(theta, phi_row) + tf.linalg.matmul(phi, theta_col)

    def call(self, inputs: tf.Tensor, training: bool | None = None, return_relation: bool = False):
        self.check_input_shape(inputs.shape)
        dtype = self.compute_dtype
        h, w, c = self.map_shape
        flat = tf.reshape(tf.cast(inputs, dtype), (-1, h * w, c))  # (B, N, C), raster order
        spatial = self.axis == "spatial"
        nodes = flat if spatial else tf.linalg.matrix_transpose(flat)  # (B, nodes, features)

        # Every BN here follows a product linear in its kernel, so at inference each is folded into that
        # kernel (`_linear_bn`), the relation BN and the head's first BN included.
        relation = emb = None
        if self.embed_kernel is not None:  # θ, φ, g from one matmul: (B, nodes, k·e)
            emb = tf.nn.relu(self._linear_bn(self.embed_bn, training, self.embed_kernel,
                                             lambda kernel: self._project(nodes, kernel)))
        e = self.embed_dim
        if self.use_original:
            mean_g = tf.reduce_mean(emb[..., -e:], axis=-1, keepdims=True)  # (B, nodes, 1)
        if self.use_relation:
            if self.embedding == "asymmetric":
                theta, phi = emb[..., :e], emb[..., e : 2 * e]
            elif self.embedding == "symmetric":
                theta = phi = emb[..., :e]
            else:  # raw node features
                theta = phi = nodes
            # Half precision is promoted to float32 here: the relation terms are sums of thousands of products.
            if theta.dtype in (tf.float16, tf.bfloat16):
                symmetric = theta is phi
                theta = tf.cast(theta, tf.float32)
                phi = theta if symmetric else tf.cast(phi, tf.float32)
            if self.relation == "explicit" or return_relation:
                relation = tf.linalg.matmul(theta, phi, transpose_b=True)  # R[i, j] = θ_i · φ_j
            rel = self._linear_bn(self.relation_bn, training, self.relation_kernel,
                                  lambda kernel: self._relation_features(theta, phi, kernel, relation))
            rel = tf.nn.relu(tf.cast(rel, dtype))

        def head_projection(kernel):  # W_1 y = W_1[0] ori + W_1[1:] rel: summed, not concatenated (no copy of rel)
            out = mean_g * tf.cast(kernel[0], dtype) if self.use_original else 0.0
            if self.use_relation:
                out = out + self._project(rel, kernel[int(self.use_original) :])  # _project casts the kernel
            return out

        hidden = tf.nn.relu(self._linear_bn(self.head_bn1, training, self.head_kernel1, head_projection))
        score = self._linear_bn(self.head_bn2, training, self.head_kernel2,
                                lambda kernel: self._project(hidden, kernel))
        attention = tf.sigmoid(tf.cast(score, tf.float32))  # (B, nodes, 1)
        attention = tf.reshape(attention, (-1, h, w, 1) if spatial else (-1, 1, 1, c))
        return (attention, relation) if return_relation else attention

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            axis=self.axis,
            s1=self.s1,
            s2=self.s2,
            use_relation=self.use_relation,
            use_original=self.use_original,
            embedding=self.embedding,
            relation=self.relation,
            synchronized_bn=self.synchronized_bn,
        )
        return config


@keras.saving.register_keras_serializable(package="rga_keras")
class RGA(keras.layers.Layer):
    """Relation-aware global attention module: X (B, H, W, C) → attended X, same shape.

    ``mode`` (paper Table 1): "s" RGA-S, "c" RGA-C, "sc" S then C on the S-attended features (the paper's
    model), "cs" C then S, "s//c" both computed from the same X and applied together (X ⊙ a_s ⊙ a_c).
    The remaining arguments are those of `RelationAttention`, shared by both branches.

    ``layer(x, return_maps=True)`` returns ``(output, maps)`` where maps holds "spatial_attention"
    (B, H, W, 1) and/or "channel_attention" (B, 1, 1, C), and the relation matrices "spatial_relation"
    (B, N, N) / "channel_relation" (B, C, C), each taken from the features its branch actually saw.
    """

    def __init__(
        self,
        mode: str = "sc",
        s1: int = 8,
        s2: int = 8,
        use_relation: bool = True,
        use_original: bool = True,
        embedding: str = "asymmetric",
        relation: str = "fused",
        synchronized_bn: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_choice("mode", mode, MODES)
        self.mode = mode
        self.branch_config = dict(
            s1=s1,
            s2=s2,
            use_relation=use_relation,
            use_original=use_original,
            embedding=embedding,
            relation=relation,
            synchronized_bn=synchronized_bn,
        )
        self.spatial = self.channel = None
        if "s" in mode:
            self.spatial = RelationAttention("spatial", name="spatial", dtype=self.dtype_policy, **self.branch_config)
        if "c" in mode:
            self.channel = RelationAttention("channel", name="channel", dtype=self.dtype_policy, **self.branch_config)

    @property
    def branches(self) -> list:
        """The branches in the order they run."""
        if self.mode == "cs":
            return [self.channel, self.spatial]
        return [b for b in (self.spatial, self.channel) if b is not None]

    def build(self, input_shape: tuple) -> None:
        for branch in self.branches:
            branch.build(input_shape)

    def call(self, inputs: tf.Tensor, training: bool | None = None, return_maps: bool = False):
        self.branches[0].check_input_shape(inputs.shape, owner=f"RGA layer '{self.name}'")
        maps = {}

        def attend(branch: RelationAttention, x: tf.Tensor) -> tf.Tensor:
            if return_maps:
                a, relation = branch(x, training=training, return_relation=True)
                if relation is not None:  # "w/o Rel." (use_relation=False) has no relation matrix
                    maps[branch.axis + "_relation"] = relation
            else:
                a = branch(x, training=training)
            maps[branch.axis + "_attention"] = a
            return tf.cast(a, x.dtype)

        if self.mode == "s//c":
            x = inputs * attend(self.spatial, inputs) * attend(self.channel, inputs)
        else:
            x = inputs
            for branch in self.branches:
                x = x * attend(branch, x)
        return (x, maps) if return_maps else x

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(mode=self.mode, **self.branch_config)
        return config
