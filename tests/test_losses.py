"""Losses against brute-force NumPy references (values, Keras reduction, gradients, serialisation)."""
import keras
import numpy as np
import pytest

from rga_keras.losses import BatchHardTripletLoss, LabelSmoothingCrossEntropy
from tests.backend import to_numpy, value_and_grads
from tests.numpy_reference import ref_batch_hard, ref_label_smoothing_ce


def pk_batch(p=4, k=3, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.choice(100, p, replace=False), k)
    feats = rng.normal(size=(p * k, dim)).astype(np.float32) + 3.0  # common offset, as ReLU features
    return labels, feats


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_reference(eps):
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(6, 5)) * 4).astype(np.float32)
    labels = rng.integers(0, 5, size=6)
    loss = LabelSmoothingCrossEntropy(epsilon=eps)
    per_sample = to_numpy(loss.call(keras.ops.convert_to_tensor(labels[:, None], "float32"),
                                    keras.ops.convert_to_tensor(logits)))
    want = ref_label_smoothing_ce(labels, logits, eps)
    np.testing.assert_allclose(per_sample, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss(labels, logits)), want.mean(), rtol=1e-5)


@pytest.mark.parametrize("soft", [False, True])
def test_batch_hard_matches_bruteforce(soft):
    labels, feats = pk_batch()
    loss = BatchHardTripletLoss(margin=0.3, soft_margin=soft)
    want = ref_batch_hard(labels, feats, 0.3, soft)
    got = to_numpy(loss.call(keras.ops.convert_to_tensor(labels, "float32"), keras.ops.convert_to_tensor(feats)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert want.max() > 0  # the batch really has active triplets
    np.testing.assert_allclose(float(loss(labels, feats)), want.mean(), rtol=1e-5)


def test_batch_hard_degenerate_anchors():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(5, 4)).astype(np.float32)
    loss = BatchHardTripletLoss(margin=0.5)
    # identity 9 has a single image (no positive): it contributes 0 but counts in the mean.
    labels = np.array([1, 1, 2, 2, 9])
    want = ref_batch_hard(labels, feats, 0.5)
    assert want[4] == 0.0
    np.testing.assert_allclose(float(loss(labels, feats)), want.sum() / 5, rtol=1e-5)
    # one identity only (no negatives): no triplet at all.
    assert float(loss(np.zeros(5), feats)) == 0.0


def triplet_grad(labels, feats, soft=False):
    x = keras.Variable(feats)
    value, (grad,) = value_and_grads(lambda: BatchHardTripletLoss(margin=0.3, soft_margin=soft)(labels, x), [x])
    return value, grad


@pytest.mark.parametrize("soft", [False, True])
def test_batch_hard_gradient_matches_finite_differences(soft):
    labels, feats = pk_batch(p=3, k=2, dim=4, seed=3)
    _, grad = triplet_grad(labels, feats, soft)
    f0, h = feats.astype(np.float64), 1e-5
    num = np.zeros_like(f0)
    for idx in np.ndindex(f0.shape):
        plus, minus = f0.copy(), f0.copy()
        plus[idx] += h
        minus[idx] -= h
        num[idx] = (ref_batch_hard(labels, plus, 0.3, soft).mean()
                    - ref_batch_hard(labels, minus, 0.3, soft).mean()) / (2 * h)
    np.testing.assert_allclose(grad, num, rtol=2e-3, atol=2e-4)
    assert np.abs(num).max() > 0


def test_batch_hard_gradient_finite_for_identical_features():
    feats = np.ones((6, 8), np.float32) * 2.5
    feats[3:] = feats[0]  # every image identical, positives and negatives alike
    labels = np.array([0, 0, 0, 1, 1, 1])
    value, grad = triplet_grad(labels, feats)
    np.testing.assert_allclose(value, 0.3, atol=1e-4)  # d_ap = d_an = 0 → margin
    assert np.all(np.isfinite(grad))
    # singleton and single-identity batches too
    for lab in ([0, 0, 1, 1, 2, 2], [0, 1, 2, 3, 4, 5], [7] * 6):
        assert np.all(np.isfinite(triplet_grad(np.array(lab), feats)[1]))


def test_losses_serialise_roundtrip():
    for loss in (LabelSmoothingCrossEntropy(epsilon=0.2),
                 BatchHardTripletLoss(margin=0.7, soft_margin=True)):
        back = keras.losses.deserialize(keras.losses.serialize(loss))
        assert type(back) is type(loss) and back.get_config() == loss.get_config()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="epsilon"):
        LabelSmoothingCrossEntropy(epsilon=1.0)
    with pytest.raises(ValueError, match="margin"):
        BatchHardTripletLoss(margin=-1)
    with pytest.raises(ValueError, match=r"\(batch, dim\)"):
        BatchHardTripletLoss()(np.zeros(4), np.zeros((4, 2, 2), np.float32))
