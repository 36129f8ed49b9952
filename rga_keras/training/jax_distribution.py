"""How training is spread over devices and processes on JAX, with Keras' own distribution API.

The same config options as tf.distribute (`rga_keras.training.distribution`) choose it: ``training.strategy``
"auto" (several processes when TF_CONFIG names several, else every local device when there are several GPUs,
else one device), "mirrored" (every local device), "multi_worker", "default" (one device), and
``training.devices`` (e.g. ``["/cpu:0", "/cpu:1"]``: exactly those). Several devices train with
``keras.distribution.DataParallel``: the model is replicated, each global batch is cut into contiguous slices,
one per device, and XLA computes the losses and the BatchNorm statistics over the whole global batch (so the
batch-hard triplet loss mines all P identities, and BatchNorm is synchronised without being asked). Several
processes join through ``jax.distributed.initialize`` (what ``keras.distribution.initialize`` calls; here with
``training.join_timeout_s`` as its limit, after the same bounded wait for every process as on TensorFlow,
`rga_keras.training.cluster`): process i is TF_CONFIG's i-th address, the first one coordinates, and each
process feeds its own devices' slices of every global batch.
"""
from __future__ import annotations

from typing import Sequence

import keras

from rga_keras.training.cluster import check_tf_config, cluster_addresses, cluster_size, holding_port, wait_for_peers

STRATEGIES = ("auto", "mirrored", "multi_worker", "default")


def get_distribution(kind: str = "auto", devices: Sequence[str] | None = None,
                     join_timeout_s: float = 300) -> keras.distribution.DataParallel | None:
    """Set and return the Keras distribution the config asks for (None: one device, no distribution). Call it
    before building the model, and before anything runs on JAX when several processes join."""
    import jax

    if kind not in STRATEGIES:
        raise ValueError(f"strategy kind must be one of {STRATEGIES}, found {kind!r}")
    if devices is not None and kind not in ("auto", "mirrored"):
        raise ValueError(f"devices= only applies to a mirrored strategy, found kind={kind!r}")
    if kind == "auto":
        kind = ("multi_worker" if cluster_size() > 1 else
                "mirrored" if devices is not None or len(jax.devices()) > 1 and jax.default_backend() != "cpu" else
                "default")
    if kind == "default":
        return None
    if kind == "multi_worker":
        _join_processes(join_timeout_s)
    chosen = keras.distribution.list_devices() if devices is None else [_device_name(d) for d in devices]
    distribution = keras.distribution.DataParallel(devices=chosen, auto_shard_dataset=False)
    keras.distribution.set_distribution(distribution)
    return distribution


def process_replicas(distribution: keras.distribution.DataParallel | None) -> tuple[int, int] | None:
    """``(first, count)``: the slices of each global batch this process feeds (its own devices'), or None
    when one process feeds them all."""
    import jax

    if distribution is None or jax.process_count() == 1:
        return None
    local = jax.local_device_count()
    return jax.process_index() * local, local


def _join_processes(join_timeout_s: float) -> None:
    """Start JAX's distributed runtime for the TF_CONFIG cluster, once every process answers. Every process but
    the first keeps answering at its own address until it has joined, so the first one's wait sees it; the first
    one's address becomes the coordinator's."""
    import jax

    own, peers = check_tf_config()
    addresses = cluster_addresses()
    rank = addresses.index(own)
    if "jax_cpu_collectives_implementation" in jax.config.values:  # collectives between processes on CPU
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    def initialize() -> None:  # the run seeded Keras before, so keras.distribution's seed exchange is not needed
        jax.distributed.initialize(coordinator_address=addresses[0], num_processes=len(addresses), process_id=rank,
                                   initialization_timeout=max(1, int(join_timeout_s)))

    with holding_port(own):
        wait_for_peers(peers, join_timeout_s)
        if rank:
            initialize()
    if not rank:
        initialize()


def _device_name(device: str) -> str:
    """A device as Keras names it on JAX ("cpu:0") from tf.distribute's spelling ("/cpu:0", "/device:GPU:1")."""
    name = str(device).lower().removeprefix("/").removeprefix("device:")
    try:
        known = keras.distribution.list_devices(name.partition(":")[0])
    except (RuntimeError, ValueError):  # a kind of device JAX does not have here
        known = []
    if name not in known:
        raise ValueError(f"training.devices: no device {device!r} here; found {keras.distribution.list_devices()}")
    return name
