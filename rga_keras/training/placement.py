"""Where a training run goes, on the Keras backend in use: how many replicas split each global batch, how many
processes train, the scope to build the model in, and how the P×K stream reaches ``fit``.

TensorFlow: tf.distribute (`rga_keras.training.distribution`), fed by tf.data. JAX: keras.distribution
(`rga_keras.training.jax_distribution`), fed by Grain. The same config options (``training.strategy``,
``training.devices``, TF_CONFIG) choose both. Other backends are refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager

import keras

Stream = Callable[[tuple[int, int] | None], Any]  # (first, count) of the replica slices to read, or all → a stream


@dataclasses.dataclass(frozen=True)
class Placement:
    replicas: int  # devices each global batch is split over
    workers: int  # processes that train
    scope: Callable[[], ContextManager]  # where to build the model
    feed: Callable[[Stream], Any]  # the input for fit, from a builder of P×K streams


def place(training: dict) -> Placement:
    """The placement the config's training section asks for (``strategy``, ``devices``, ``join_timeout_s``);
    call it before anything else runs on the backend."""
    backend = keras.backend.backend()
    kind, devices, timeout = training["strategy"], training["devices"], training["join_timeout_s"]
    if backend == "tensorflow":
        from rga_keras.training.distribution import distribute_pk_dataset, get_strategy, num_workers

        strategy = get_strategy(kind, devices, timeout)
        replicas = strategy.num_replicas_in_sync
        return Placement(replicas, num_workers(strategy), strategy.scope,
                         lambda build: build(None) if replicas == 1 else distribute_pk_dataset(strategy, build))
    if backend == "jax":
        import jax

        from rga_keras.training.jax_distribution import get_distribution, process_replicas

        distribution = get_distribution(kind, devices, timeout)
        replicas = distribution.device_mesh.devices.size if distribution else 1
        slices = process_replicas(distribution)
        return Placement(replicas, jax.process_count(), contextlib.nullcontext, lambda build: build(slices))
    raise ValueError(f"rga-train trains on the TensorFlow and JAX backends, not on KERAS_BACKEND={backend} "
                     "(set KERAS_BACKEND=jax or tensorflow)")
