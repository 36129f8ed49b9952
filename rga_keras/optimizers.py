"""The paper's optimiser and learning-rate schedules (docs/DESIGN.md §3).

Schedules are per optimiser step (``steps_per_epoch`` converts the paper's epochs), so they follow
``optimizer.iterations`` and resume exactly with `BackupAndRestore`.

Weight decay. The paper's code uses ``torch.optim.Adam(weight_decay=5e-4)``, an L2 term added to
the gradient before the Adam moments (``g += wd · w``), on every trainable parameter including
BatchNorm scales/offsets and the classifier. `AdamL2` / `SGDL2` do the same, after the replica
all-reduce (so the term is added once, not once per replica); the BNNeck's frozen offset is not
trainable and gets no decay, as in PyTorch. We decay every trainable variable by default (to
reproduce the paper); pass ``no_decay=("gamma", "beta", "bias")`` to exclude by variable name.
``decoupled=True`` gives Keras' AdamW / SGD decay instead (``w -= lr · wd · w``).
"""
from __future__ import annotations

import math
from typing import Sequence

import keras
from keras import ops

_DEFAULT_MILESTONES = tuple(range(80, 361, 40))


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, found {value!r}")
    return value


class _WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from ``warmup_start_lr`` to ``base_lr`` over ``warmup_epochs``, per step."""

    def __init__(self, base_lr: float, warmup_start_lr: float, warmup_epochs: float,
                 steps_per_epoch: int):
        if base_lr <= 0 or warmup_start_lr < 0 or warmup_epochs < 0:
            raise ValueError(
                "need base_lr > 0, warmup_start_lr >= 0, warmup_epochs >= 0, found "
                f"{base_lr!r}, {warmup_start_lr!r}, {warmup_epochs!r}")
        self.base_lr = float(base_lr)
        self.warmup_start_lr = float(warmup_start_lr)
        self.warmup_epochs = warmup_epochs
        self.steps_per_epoch = _check_positive_int("steps_per_epoch", steps_per_epoch)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm_steps = float(self.warmup_epochs * self.steps_per_epoch)
        if warm_steps == 0:
            return self._after_warmup(step)
        frac = ops.minimum(step / warm_steps, 1.0)
        warm = self.warmup_start_lr + (self.base_lr - self.warmup_start_lr) * frac
        return ops.where(step < warm_steps, warm, self._after_warmup(step))

    def _after_warmup(self, step):
        raise NotImplementedError

    def get_config(self) -> dict:
        return {"base_lr": self.base_lr, "warmup_start_lr": self.warmup_start_lr,
                "warmup_epochs": self.warmup_epochs, "steps_per_epoch": self.steps_per_epoch}


@keras.saving.register_keras_serializable(package="rga_keras")
class WarmupMultiStepSchedule(_WarmupSchedule):
    """The paper's schedule: warm-up, then ``base_lr · gamma^n``, n = milestones passed.

    A milestone ``m`` (in epochs) takes effect at step ``m · steps_per_epoch``, i.e. for the
    first step of epoch m (0-based). Default: 8e-6 → 8e-4 over 20 epochs, ×0.5 at 80, 120, …, 360.
    """

    def __init__(self, base_lr: float = 8e-4, warmup_start_lr: float = 8e-6,
                 warmup_epochs: float = 20, milestones: Sequence[float] = _DEFAULT_MILESTONES,
                 gamma: float = 0.5, *, steps_per_epoch: int):
        super().__init__(base_lr, warmup_start_lr, warmup_epochs, steps_per_epoch)
        milestones = tuple(milestones)
        if list(milestones) != sorted(set(milestones)) or (milestones and milestones[0] < warmup_epochs):
            raise ValueError("milestones must be strictly increasing epochs >= warmup_epochs, "
                             f"found {milestones!r} with warmup_epochs={warmup_epochs!r}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, found {gamma!r}")
        self.milestones = milestones
        self.gamma = float(gamma)

    def _after_warmup(self, step):
        passed = ops.zeros((), "float32")
        for m in self.milestones:
            passed = passed + ops.cast(step >= float(m * self.steps_per_epoch), "float32")
        return self.base_lr * ops.power(self.gamma, passed)

    def get_config(self) -> dict:
        return {**super().get_config(), "milestones": list(self.milestones), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="rga_keras")
class WarmupCosineSchedule(_WarmupSchedule):
    """Warm-up, then cosine decay from ``base_lr`` to ``min_lr`` at ``total_epochs`` (held after)."""

    def __init__(self, base_lr: float = 8e-4, warmup_start_lr: float = 8e-6,
                 warmup_epochs: float = 20, total_epochs: float = 600, min_lr: float = 0.0, *,
                 steps_per_epoch: int):
        super().__init__(base_lr, warmup_start_lr, warmup_epochs, steps_per_epoch)
        if total_epochs <= warmup_epochs or min_lr < 0:
            raise ValueError("need total_epochs > warmup_epochs and min_lr >= 0, found "
                             f"total_epochs={total_epochs!r}, warmup_epochs={warmup_epochs!r}, "
                             f"min_lr={min_lr!r}")
        self.total_epochs = total_epochs
        self.min_lr = float(min_lr)

    def _after_warmup(self, step):
        start = float(self.warmup_epochs * self.steps_per_epoch)
        length = float(self.total_epochs * self.steps_per_epoch) - start
        t = ops.clip((step - start) / length, 0.0, 1.0)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + ops.cos(math.pi * t))

    def get_config(self) -> dict:
        return {**super().get_config(), "total_epochs": self.total_epochs, "min_lr": self.min_lr}


class _CoupledL2:
    """Mixin: add ``l2 · w`` to each (already all-reduced) gradient, as PyTorch's weight_decay.

    ``no_decay``: variable-name substrings (regex) whose variables get no L2 term.
    """

    def __init__(self, *args, l2: float = 5e-4, no_decay: Sequence[str] = (), **kwargs):
        if kwargs.get("weight_decay"):
            raise ValueError("coupled-L2 optimisers take `l2`, not `weight_decay` (decoupled)")
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, found {l2!r}")
        super().__init__(*args, **kwargs)
        self.l2 = float(l2)
        self.no_decay = list(no_decay)
        if self.no_decay:
            self.exclude_from_weight_decay(var_names=self.no_decay)

    def update_step(self, gradient, variable, learning_rate):
        if self.l2 and self._use_weight_decay(variable):
            gradient = ops.add(ops.cast(gradient, variable.dtype),
                               ops.multiply(ops.cast(self.l2, variable.dtype), variable))
        super().update_step(gradient, variable, learning_rate)

    def get_config(self) -> dict:
        return {**super().get_config(), "l2": self.l2, "no_decay": self.no_decay}


@keras.saving.register_keras_serializable(package="rga_keras")
class AdamL2(_CoupledL2, keras.optimizers.Adam):
    """Adam with coupled L2 weight decay (PyTorch ``Adam(weight_decay=l2)``; paper's optimiser).

    Keras adds ε to √v before the bias correction, PyTorch after: Keras' step equals PyTorch's
    with ε/√(1 − β₂ᵗ) in place of ε, a relative difference of about 3e-7/|g| at ε = 1e-8 in the
    first steps, fading as t grows.
    """


@keras.saving.register_keras_serializable(package="rga_keras")
class SGDL2(_CoupledL2, keras.optimizers.SGD):
    """SGD (momentum) with coupled L2 weight decay (PyTorch ``SGD(weight_decay=l2)``)."""


def make_optimizer(name: str = "adam", learning_rate=8e-4, weight_decay: float = 5e-4,
                   decoupled: bool = False, *, no_decay: Sequence[str] = (),
                   **kwargs) -> keras.optimizers.Optimizer:
    """Build the training optimiser.

    name: "adam" (coupled L2 unless ``decoupled``), "adamw" (always decoupled: Keras AdamW) or
    "sgd" (momentum 0.9 unless given; coupled L2 unless ``decoupled``). learning_rate: a float or
    a schedule. no_decay: variable-name substrings excluded from decay (default none: every
    trainable variable is decayed, as in the paper's code; for decoupled optimisers Keras does not
    save this exclusion with the optimiser). Adam uses PyTorch's defaults (β = 0.9, 0.999;
    ε = 1e-8); further keyword arguments go to the Keras optimiser.
    """
    key = name.lower()
    if key not in ("adam", "adamw", "sgd"):
        raise ValueError(f"optimizer name must be 'adam', 'adamw' or 'sgd', found {name!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, found {weight_decay!r}")
    decoupled = decoupled or key == "adamw"
    if key == "sgd":
        kwargs.setdefault("momentum", 0.9)
    else:
        kwargs.setdefault("epsilon", 1e-8)
    if not decoupled:
        cls = SGDL2 if key == "sgd" else AdamL2
        return cls(learning_rate=learning_rate, l2=weight_decay, no_decay=no_decay, **kwargs)
    cls = keras.optimizers.SGD if key == "sgd" else keras.optimizers.AdamW
    opt = cls(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
    if no_decay:
        opt.exclude_from_weight_decay(var_names=list(no_decay))
    return opt
