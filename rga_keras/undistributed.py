"""Leaving Keras' distribution for a while (JAX, several devices or processes: `rga_keras.training.jax_distribution`).

Under a distribution every variable Keras makes outside a compiled step is placed on all the run's devices, which
with several processes is a collective operation every process must take part in, and every batch is cut over
the devices. What one process does alone — evaluating on the chief, saving a checkpoint (Keras' saving code makes
an optimizer of its own), a probe of the features — runs here with no distribution set.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import keras


@contextlib.contextmanager
def undistributed() -> Iterator[None]:
    """While inside, no Keras distribution is set (the one set before comes back after)."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        yield
        return
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(distribution)
