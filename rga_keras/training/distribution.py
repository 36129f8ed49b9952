"""How training is spread over devices and machines with ``tf.distribute`` (TensorFlow).

Distribution. With MirroredStrategy each global batch (P×K images) is split into contiguous equal
slices, one per replica, and the batch-hard triplet loss mines inside each slice: order the batch
so every slice holds whole identities (K ≥ 2 images each), i.e. the global batch must divide into
replicas × identities-per-replica × K. Gradients are averaged over the global batch, so keep the
learning rate when only the replica count changes at a fixed global batch; scale it linearly if you
grow the global batch. Without `rga_keras.training.model.use_sync_batchnorm`, BatchNorm normalises each
replica's slice (global batch / replicas images) with its own statistics and the moving statistics that get
saved come from one replica's slices; with it, statistics are those of the whole global batch.

Several machines: run the same program on each with TF_CONFIG set, e.g. on the first machine
``TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker",
"index": 0}}'`` and ``"index": 1`` on the second; `get_strategy()` then checks TF_CONFIG, waits a bounded
time for every worker to answer, and returns a MultiWorkerMirroredStrategy. Feed fit through
`distribute_pk_dataset`: each worker then reads only its own replicas' slices of every global batch,
whole identities each. Only the chief (worker 0) writes checkpoints and logs; every worker keeps its own
BackupAndRestore state.
"""
from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf

from rga_keras.training.cluster import check_tf_config, cluster_size, holding_port, wait_for_peers

_STRATEGIES = ("auto", "mirrored", "multi_worker", "default")


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """How many worker processes ``strategy`` spans (the TF_CONFIG cluster under a multi-worker strategy)."""
    return cluster_size() if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else 1


class _MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy patched for Keras 3's fit (keras-team/keras#20585).


    Keras 3.x hands ``reduce`` a whole nested data batch (to build the model) and reduces scalar
    metric values with ``axis=0``; the stock multi-worker strategy rejects both. Here ``reduce``
    maps over nests and reduces scalars across replicas only.
    """


    def reduce(self, reduce_op, value, axis):
        parent = super()


        def one(v):
            first = v.values[0] if isinstance(v, tf.distribute.DistributedValues) else v
            return parent.reduce(reduce_op, v, axis if len(getattr(first, "shape", ())) else None)


        return tf.nest.map_structure(one, value)


def get_strategy(kind: str = "auto", devices: Sequence[str] | None = None,
                 join_timeout_s: float = 300) -> tf.distribute.Strategy:
    """The distribution strategy to build and train the model under.


    kind "auto": MultiWorkerMirroredStrategy when TF_CONFIG names several workers, else
    MirroredStrategy over all GPUs when there is one, else the default one-device strategy.
    "mirrored", "multi_worker", "default" force a kind. ``devices`` (e.g. ["/cpu:0", "/cpu:1"])
    builds a MirroredStrategy over exactly those devices. Call it first: MultiWorkerMirroredStrategy
    must be created before any other TensorFlow operation. TF_CONFIG is checked first (structure,
    addresses resolve); ``join_timeout_s`` bounds the wait for the other workers (`rga_keras.training.cluster`).
    """
    if kind not in _STRATEGIES:
        raise ValueError(f"strategy kind must be one of {_STRATEGIES}, found {kind!r}")
    if devices is not None:
        if kind not in ("auto", "mirrored"):
            raise ValueError(f"devices= only applies to a mirrored strategy, found kind={kind!r}")
        return tf.distribute.MirroredStrategy(list(devices))
    if kind == "auto":
        if cluster_size() > 1:
            kind = "multi_worker"
        elif tf.config.list_physical_devices("GPU"):
            kind = "mirrored"
        else:
            kind = "default"
    if kind == "multi_worker":
        own, peers = check_tf_config()
        with holding_port(own):  # until TensorFlow's server takes the port over and answers for it
            wait_for_peers(peers, join_timeout_s)
        return _MultiWorkerStrategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def distribute_pk_dataset(strategy: tf.distribute.Strategy,
                          build: Callable[[tuple[int, int]], tf.data.Dataset]) -> tf.distribute.DistributedDataset:
    """Feed a P×K stream to ``strategy`` with every replica's share of the global batch holding whole identities.


    ``build((first, count))`` must return the per-replica slices first … first + count − 1 of each global batch,
    in turn (`rga_keras.data.make_train_dataset`'s ``replicas``). Each worker builds only its own replicas'
    slices (no auto-sharding: it would decode the whole global batch on every worker), and
    ``distribute_datasets_from_function`` hands consecutive elements to the worker's replicas in order.
    """
    def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = context.num_replicas_in_sync // context.num_input_pipelines
        return build((context.input_pipeline_id * local, local))


    return strategy.distribute_datasets_from_function(per_worker)
