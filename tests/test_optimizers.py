"""Schedules against plain-Python references; optimiser steps against NumPy copies of PyTorch's updates."""
import math

import numpy as np
import pytest
import tensorflow as tf
import keras

from rga_keras.optimizers import (AdamL2, SGDL2, WarmupCosineSchedule, WarmupMultiStepSchedule,
                                  make_optimizer)

SPE = 7  # steps per epoch


def ref_multistep(step, spe=SPE, base=8e-4, start=8e-6, warm=20,
                  milestones=tuple(range(80, 361, 40)), gamma=0.5):
    epoch = step / spe
    if epoch < warm:
        return start + (base - start) * epoch / warm
    return base * gamma ** sum(epoch >= m for m in milestones)


def ref_cosine(step, spe=SPE, base=8e-4, start=8e-6, warm=20, total=600, lo=0.0):
    epoch = step / spe
    if epoch < warm:
        return start + (base - start) * epoch / warm
    t = min((epoch - warm) / (total - warm), 1.0)
    return lo + 0.5 * (base - lo) * (1 + math.cos(math.pi * t))


def test_multistep_every_step_and_boundaries():
    sched = WarmupMultiStepSchedule(steps_per_epoch=SPE)
    steps = np.arange(0, 420 * SPE)
    got = np.asarray(sched(tf.constant(steps)))
    want = np.array([ref_multistep(s) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # spot values that pin down the boundary convention (first step of epoch m is decayed)
    assert got[0] == pytest.approx(8e-6, rel=1e-6)
    assert got[20 * SPE - 1] < 8e-4 and got[20 * SPE] == pytest.approx(8e-4, rel=1e-6)
    assert got[80 * SPE - 1] == pytest.approx(8e-4, rel=1e-6)
    assert got[80 * SPE] == pytest.approx(4e-4, rel=1e-6)
    assert got[360 * SPE] == pytest.approx(8e-4 / 2 ** 8, rel=1e-6)


def test_multistep_without_warmup_and_custom_milestones():
    sched = WarmupMultiStepSchedule(0.1, 0.0, 0, (2, 5), 0.1, steps_per_epoch=3)
    steps = np.arange(0, 30)
    want = [ref_multistep(s, 3, 0.1, 0.0, 0, (2, 5), 0.1) for s in steps]
    np.testing.assert_allclose(np.asarray(sched(tf.constant(steps))), want, rtol=1e-6)


def test_cosine_every_step():
    sched = WarmupCosineSchedule(warmup_epochs=5, total_epochs=50, min_lr=1e-6, steps_per_epoch=SPE)
    steps = np.arange(0, 60 * SPE)
    want = [ref_cosine(s, warm=5, total=50, lo=1e-6) for s in steps]
    np.testing.assert_allclose(np.asarray(sched(tf.constant(steps))), want, rtol=1e-5, atol=1e-12)


def test_schedule_serialisation_and_errors():
    for sched in (WarmupMultiStepSchedule(milestones=(30, 50), warmup_epochs=10, steps_per_epoch=4),
                  WarmupCosineSchedule(total_epochs=90, steps_per_epoch=4)):
        back = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(sched))
        assert type(back) is type(sched) and back.get_config() == sched.get_config()
        np.testing.assert_allclose(back(tf.range(400)), sched(tf.range(400)))
    with pytest.raises(ValueError, match="steps_per_epoch"):
        WarmupMultiStepSchedule(steps_per_epoch=0)
    with pytest.raises(ValueError, match="milestones"):
        WarmupMultiStepSchedule(milestones=(120, 80), steps_per_epoch=1)
    with pytest.raises(ValueError, match="milestones"):
        WarmupMultiStepSchedule(milestones=(10,), warmup_epochs=20, steps_per_epoch=1)
    with pytest.raises(ValueError, match="total_epochs"):
        WarmupCosineSchedule(warmup_epochs=20, total_epochs=10, steps_per_epoch=1)


# ---- optimiser steps -------------------------------------------------------------------------

def torch_adam(w, grads, lr, wd, decoupled=False, b1=0.9, b2=0.999, eps=1e-8, keras_eps=False):
    """NumPy copy of torch.optim.Adam(weight_decay=wd) (or AdamW when decoupled).

    keras_eps: add eps to sqrt(v) before the bias correction, as Keras does (the only difference).
    """
    w = w.astype(np.float64).copy()
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        if decoupled:
            w = w - lr * wd * w
        else:
            g = g + wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        e = eps / np.sqrt(1 - b2 ** t) if keras_eps else eps
        w = w - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + e)
    return w


def torch_sgd(w, grads, lr, wd, mu=0.9):
    """NumPy copy of torch.optim.SGD(momentum=mu, weight_decay=wd)."""
    w = w.astype(np.float64).copy()
    buf = None
    for g in grads:
        g = g + wd * w
        buf = g if buf is None else mu * buf + g
        w = w - lr * buf
    return w


def run_steps(opt, w0, grads):
    var = tf.Variable(w0)
    for g in grads:
        opt.apply_gradients([(tf.constant(g), var)])
    return var.numpy()


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(6,)).astype(np.float32)
    grads = [rng.normal(size=(6,)).astype(np.float32) for _ in range(3)]
    for g in grads:
        g[:2] = 0.0  # only the L2 term moves these entries: makes the decay visible in Adam
    return w0, grads


@pytest.mark.parametrize("name,decoupled", [("adam", False), ("adamw", True), ("adam", True)])
def test_adam_matches_torch(problem, name, decoupled):
    w0, grads = problem
    opt = make_optimizer(name, learning_rate=1e-2, weight_decay=0.05, decoupled=decoupled)
    assert isinstance(opt, keras.optimizers.AdamW if decoupled else AdamL2)
    got = run_steps(opt, w0, grads)
    # exact up to float32 once the epsilon placement is Keras'; within 1e-4 of PyTorch's own
    # (tiny gradients here: the zero-gradient entries only see the decay term)
    np.testing.assert_allclose(got, torch_adam(w0, grads, 1e-2, 0.05, decoupled, keras_eps=True),
                               rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(got, torch_adam(w0, grads, 1e-2, 0.05, decoupled), rtol=1e-4)
    # the decay really acted
    assert not np.allclose(got, torch_adam(w0, grads, 1e-2, 0.0), rtol=1e-4, atol=1e-6)


def test_sgd_matches_torch(problem):
    w0, grads = problem
    opt = make_optimizer("sgd", learning_rate=0.1, weight_decay=0.05)
    assert isinstance(opt, SGDL2)
    np.testing.assert_allclose(run_steps(opt, w0, grads), torch_sgd(w0, grads, 0.1, 0.05),
                               rtol=1e-5, atol=1e-7)


def tiny_model():
    inp = keras.Input((3,))
    x = keras.layers.Dense(4, name="fc")(inp)
    return keras.Model(inp, keras.layers.BatchNormalization(name="bn")(x))


@pytest.mark.parametrize("no_decay", [(), ("gamma", "beta")])
def test_which_weights_are_decayed(no_decay):
    """Default: every trainable variable (kernel, bias, BN gamma/beta); moving stats never."""
    model = tiny_model()
    for v in model.variables:
        v.assign(np.full(v.shape, 0.5, np.float32))
    opt = make_optimizer("adam", learning_rate=1e-2, no_decay=no_decay)
    opt.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
    for v in model.variables:
        moved = not np.allclose(v.numpy(), 0.5)
        expected = v.trainable and v.name not in no_decay
        assert moved == expected, (v.path, moved)
    if not no_decay:
        assert len(model.trainable_variables) == 4  # fc kernel+bias, bn gamma+beta


def test_optimizer_serialisation_keeps_schedule_and_decay():
    sched = WarmupMultiStepSchedule(steps_per_epoch=5)
    opt = make_optimizer("adam", learning_rate=sched, weight_decay=1e-3, no_decay=("bias",))
    back = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(back, AdamL2) and back.l2 == 1e-3 and back.no_decay == ["bias"]
    assert back.epsilon == 1e-8
    lr_config = back.get_config()["learning_rate"]
    assert lr_config == opt.get_config()["learning_rate"]
    assert lr_config["class_name"] == "WarmupMultiStepSchedule"
    assert lr_config["config"] == sched.get_config()


def test_make_optimizer_errors():
    with pytest.raises(ValueError, match="'adam', 'adamw' or 'sgd'"):
        make_optimizer("rmsprop")
    with pytest.raises(ValueError, match="weight_decay"):
        make_optimizer(weight_decay=-1)
    with pytest.raises(ValueError, match="l2"):
        AdamL2(weight_decay=0.1)
