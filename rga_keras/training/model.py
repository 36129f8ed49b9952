"""The model to train from a config: built, at the config's precision (with synchronised BatchNorm where
asked), compiled with the paper's losses and optimiser (docs/DESIGN.md §2–3). Backend-neutral: TensorFlow is
imported only to map a tf.data stream.

Typical use on TensorFlow (the model maps images to {"features": f, "logits": z})::

    strategy = get_strategy()                      # before any other TensorFlow work
    set_precision("mixed_float16")                 # before building the model
    with strategy.scope():
        model = build_rga_resnet50(...)
        use_sync_batchnorm(model)                  # optional, before compile
        sched = WarmupMultiStepSchedule(steps_per_epoch=steps)
        compile_reid(model, optimizer=make_optimizer("adam", sched))
    model.fit(to_reid_targets(train_ds), epochs=600, callbacks=make_callbacks(run_dir))
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import keras

from rga_keras.layers import RGA, RelationAttention, RGAOptions
from rga_keras.losses import BatchHardTripletLoss, LabelSmoothingCrossEntropy
from rga_keras.models import RGAReID, RGAResNetBackbone
from rga_keras.optimizers import WarmupCosineSchedule, WarmupMultiStepSchedule, make_optimizer

_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def set_precision(policy: str = "float32") -> str:
    """Set Keras' global dtype policy; call before building the model.

    "mixed_float16": float16 compute with dynamic loss scaling (Keras wraps the optimiser in a
    LossScaleOptimizer at compile); for GPUs with tensor cores. "mixed_bfloat16": no loss scaling
    needed (recent GPUs, TPUs, CPUs with AMX). The losses compute in float32 whatever the model
    outputs.
    """
    if policy not in _POLICIES:
        raise ValueError(f"precision policy must be one of {_POLICIES}, found {policy!r}")
    if policy == "mixed_float16" and not any(d.lower().startswith("gpu") for d in keras.distribution.list_devices()):
        warnings.warn("mixed_float16 without a GPU is emulated and much slower than float32 on CPU; "
                      "use float32 (or mixed_bfloat16 on CPUs with bfloat16 support)", stacklevel=2)
    keras.mixed_precision.set_global_policy(policy)
    return policy


def use_sync_batchnorm(model: keras.Model) -> int:
    """Make every BatchNormalization in ``model`` (nested layers included) synchronise its batch
    statistics over the replicas; returns how many were switched. Call before compile/fit. The flag
    is saved with the model (the RGA layers and the backbone, which build their BatchNorms from their own
    config, get ``synchronized_bn`` too) and is harmless on one device."""
    count = 0
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True
            count += 1
        elif isinstance(layer, (RelationAttention, RGA, RGAResNetBackbone)):
            layer.synchronized_bn = True  # their config: what they build their BatchNorms with when loaded
    return count


def compile_reid(model: keras.Model, *, optimizer: keras.optimizers.Optimizer,
                 triplet_weight: float = 1.0, ce_weight: float = 1.0, margin: float = 0.3,
                 epsilon: float = 0.1, soft_margin: bool = False, jit_compile: bool = False,
                 steps_per_execution: int = 1) -> keras.Model:
    """Compile with the paper's losses (docs/DESIGN.md §2): ce_weight · label-smoothed CE on "logits" +
    triplet_weight · batch-hard triplet on "features"; accuracy on the logits.

    Train with targets {"logits": y, "features": y} (see `to_reid_targets`). Call inside the
    strategy scope. Returns the model.
    """
    outputs = getattr(model, "output", None)
    if not (isinstance(outputs, dict) and {"features", "logits"} <= set(outputs)):
        found = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        raise ValueError("compile_reid needs a functional model whose output is a dict with keys "
                         f"'features' and 'logits'; found {found}")
    model.compile(
        optimizer=optimizer,
        loss={"logits": LabelSmoothingCrossEntropy(epsilon=epsilon),
              "features": BatchHardTripletLoss(margin=margin, soft_margin=soft_margin)},
        loss_weights={"logits": ce_weight, "features": triplet_weight},
        metrics={"logits": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]},
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model


def to_reid_targets(dataset: Any) -> Any:
    """Map a tf.data or Grain dataset of (images, labels) to (images, {"logits": labels, "features": labels})."""
    spec = getattr(dataset, "element_spec", None)
    if spec is None:  # Grain: its map takes one element at a time
        return dataset.map(_reid_targets)
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise ValueError(f"to_reid_targets expects a dataset of (images, labels) pairs, found {spec}")
    import tensorflow as tf

    return dataset.map(lambda x, y: _reid_targets((x, y)), num_parallel_calls=tf.data.AUTOTUNE)


def _reid_targets(element: tuple) -> tuple:
    images, labels = element
    return images, {"logits": labels, "features": labels}


def build_model(config: dict, num_classes: int) -> keras.Model:
    """The `RGAReID` network of the config's model section (`build_rga_resnet50` where the stages are ResNet-50's)."""
    m = config["model"]
    options = RGAOptions(**{field.name: m[field.name] for field in dataclasses.fields(RGAOptions)})
    backbone = RGAResNetBackbone(m["attention"], (*m["input_size"], 3), m["last_stride"], m["rga_stages"], options,
                                 zero_init_residual=m["zero_init_residual"], stage_blocks=m["stage_blocks"],
                                 stage_widths=m["stage_widths"])
    if m["backbone_weights"] is not None:
        backbone.load_pretrained(m["backbone_weights"])
    return RGAReID(backbone, num_classes)


def compiled_model(config: dict, num_classes: int, steps: int, lr_factor: float) -> keras.Model:
    """The config's model, compiled with its losses and optimiser, the learning rates multiplied by ``lr_factor``
    (`rga_keras.training.config.lr_factor`: the scaling for the global batch). Call inside the strategy scope."""
    opt, loss, training = config["optimizer"], config["loss"], config["training"]
    model = build_model(config, num_classes)
    tensorflow = keras.backend.backend() == "tensorflow"
    if training["sync_bn"] and tensorflow:  # on JAX every BatchNorm sees the whole global batch anyway
        use_sync_batchnorm(model)
    factor = lr_factor
    schedule_args = dict(base_lr=opt["base_lr"] * factor, warmup_start_lr=opt["warmup_start_lr"] * factor,
                         warmup_epochs=opt["warmup_epochs"], steps_per_epoch=steps)
    schedule = (WarmupMultiStepSchedule(milestones=opt["milestones"], gamma=opt["gamma"], **schedule_args)
                if opt["schedule"] == "multistep" else
                WarmupCosineSchedule(total_epochs=max(int(training["epochs"]), opt["warmup_epochs"] + 1),
                                     **schedule_args))
    return compile_reid(model, optimizer=make_optimizer(opt["name"], schedule, opt["weight_decay"], opt["decoupled"]),
                        triplet_weight=loss["triplet_weight"], ce_weight=loss["ce_weight"], margin=loss["margin"],
                        epsilon=loss["epsilon"], soft_margin=loss["soft_margin"],
                        jit_compile=training["xla"] or not tensorflow)  # JAX runs its steps compiled, always
