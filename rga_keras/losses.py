"""Re-id training losses (docs/DESIGN.md §2): label-smoothed cross entropy and batch-hard triplet.

Both are ordinary `keras.losses.Loss` subclasses returning one value per sample, so Keras' default
"sum_over_batch_size" reduction averages them over the (per-replica) batch and divides by the
number of replicas under `tf.distribute`; the all-reduced gradient is then the global-batch mean.
They compute in float32 (Keras casts `y_pred` to the loss dtype, `floatx()`), also under mixed
precision. Labels arrive as integer identities of shape (B,) or (B, 1).
"""
from __future__ import annotations

import keras
from keras import ops


def _labels(y_true):
    """Integer identities as a flat (B,) int32 tensor (Keras hands them over as floats)."""
    return ops.reshape(ops.cast(y_true, "int32"), (-1,))


@keras.saving.register_keras_serializable(package="rga_keras")
class LabelSmoothingCrossEntropy(keras.losses.Loss):
    """Cross entropy on logits against smoothed one-hot targets (Szegedy et al. 2016).

    Target for true class y: 1 - ε + ε/K, every other class ε/K, so per sample
    ``loss = -(1 - ε) · log p_y - ε · mean_k log p_k``.
    """

    def __init__(self, epsilon: float = 0.1, name: str = "label_smoothing_ce", **kwargs):
        if not 0.0 <= float(epsilon) < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), found {epsilon!r}")
        super().__init__(name=name, **kwargs)
        self.epsilon = float(epsilon)

    def call(self, y_true, y_pred):
        log_p = ops.log_softmax(y_pred, axis=-1)
        labels = ops.expand_dims(_labels(y_true), -1)
        log_p_true = ops.squeeze(ops.take_along_axis(log_p, labels, axis=-1), -1)
        return -(1.0 - self.epsilon) * log_p_true - self.epsilon * ops.mean(log_p, axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="rga_keras")
class BatchHardTripletLoss(keras.losses.Loss):
    """Batch-hard triplet loss (Hermans et al. 2017) on euclidean distances of the features.

    For each anchor a of the batch: d_ap = distance to its farthest other image of the same
    identity, d_an = distance to its closest image of another identity;
    ``loss_a = max(0, d_ap - d_an + margin)`` or, with ``soft_margin``, ``softplus(d_ap - d_an)``.

    The batch is what this replica sees: under `tf.distribute` every replica mines within its own
    slice of the global batch, so a P×K sampler must keep each identity's K images inside one
    replica's slice (identity-contiguous batches, K ≥ 2). An anchor with no other image of its
    identity, or no image of another identity, in that slice has no triplet: it contributes 0 and
    still counts in the mean over the batch.

    Distances are ``sqrt(max(d², 1e-12))`` (zero gradient below the clamp, so identical features
    give finite gradients), with d² from the expanded form after centring the batch, which leaves
    distances unchanged but removes the common offset that ReLU-pooled features share.
    """

    def __init__(self, margin: float = 0.3, soft_margin: bool = False,
                 name: str = "batch_hard_triplet", **kwargs):
        if not soft_margin and float(margin) < 0:
            raise ValueError(f"margin must be >= 0, found {margin!r}")
        super().__init__(name=name, **kwargs)
        self.margin = float(margin)
        self.soft_margin = bool(soft_margin)

    def call(self, y_true, y_pred):
        if len(y_pred.shape) != 2:
            raise ValueError(
                f"BatchHardTripletLoss expects features of shape (batch, dim), found {y_pred.shape}"
            )
        labels = _labels(y_true)
        f = y_pred - ops.mean(y_pred, axis=0, keepdims=True)
        sq = ops.sum(ops.square(f), axis=1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * ops.matmul(f, ops.transpose(f))
        dist = ops.sqrt(ops.maximum(d2, 1e-12))

        same = ops.equal(labels[:, None], labels[None, :])
        not_self = ops.logical_not(ops.eye(ops.shape(labels)[0], dtype="bool"))
        pos = ops.logical_and(same, not_self)
        neg = ops.logical_not(same)
        d_ap = ops.max(ops.where(pos, dist, 0.0), axis=1)
        d_an = ops.min(ops.where(neg, dist, float("inf")), axis=1)
        valid = ops.logical_and(ops.any(pos, axis=1), ops.any(neg, axis=1))
        d_an = ops.where(valid, d_an, 0.0)  # keep the inf of triplet-less anchors out of the maths

        diff = d_ap - d_an
        loss = ops.softplus(diff) if self.soft_margin else ops.relu(diff + self.margin)
        return ops.where(valid, loss, 0.0)

    def get_config(self) -> dict:
        return {**super().get_config(), "margin": self.margin, "soft_margin": self.soft_margin}
