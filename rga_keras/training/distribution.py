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

import json
import os
import socket
import time
from typing import Callable, Sequence

import tensorflow as tf

_STRATEGIES = ("auto", "mirrored", "multi_worker", "default")


def _tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}): {raw[:200]!r}") from None
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object, found {raw[:200]!r}")
    return config


def _cluster_size() -> int:
    cluster = _tf_config().get("cluster", {})
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def check_tf_config() -> tuple[str, list[str]]:
    """Validate TF_CONFIG for a multi-worker run; returns this worker's and the peers' ``host:port`` addresses.


    Expected: ``{"cluster": {"worker": ["host:port", ...]} (and optionally "chief": [one]), "task": {"type":
    "worker"|"chief", "index": i}}``, every host resolvable. Raises ValueError naming what was found."""
    config = _tf_config()
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not any(cluster.get(kind) for kind in ("chief", "worker")):
        raise ValueError(f"TF_CONFIG needs \"cluster\": {{\"worker\": [\"host:port\", ...]}}, found {cluster!r}")
    if not isinstance(task, dict) or task.get("type") not in ("chief", "worker"):
        raise ValueError(f"TF_CONFIG needs \"task\": {{\"type\": \"worker\", \"index\": i}}, found {task!r}")
    members = cluster.get(task["type"]) or []
    index = task.get("index", 0)
    if not (isinstance(index, int) and 0 <= index < len(members)):
        raise ValueError(f"TF_CONFIG task index {index!r} is not in the {len(members)} "
                         f"{task['type']} address(es) of the cluster")
    addresses = [a for kind in ("chief", "worker") for a in cluster.get(kind) or []]
    for address in addresses:
        _check_address(address)
    return members[index], [a for a in addresses if a != members[index]]


def _check_address(address) -> None:
    """A cluster address must be ``host:port`` with a host that resolves."""
    host, _, port = str(address).rpartition(":")
    if not (isinstance(address, str) and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"TF_CONFIG cluster address must be \"host:port\", found {address!r}")
    try:
        socket.getaddrinfo(host.strip("[]"), int(port))
    except OSError as e:
        raise ValueError(f"TF_CONFIG cluster address {address!r}: host {host!r} does not resolve ({e})") from None


def _answers(address: str, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def is_chief() -> bool:
    """True unless TF_CONFIG names this process a non-chief worker (only the chief writes files)."""
    config = _tf_config()
    cluster, task = config.get("cluster", {}), config.get("task", {})
    if _cluster_size() <= 1:
        return True
    if "chief" in cluster:
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """How many worker processes ``strategy`` spans (the TF_CONFIG cluster under a multi-worker strategy)."""
    return _cluster_size() if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else 1


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


def _wait_for_peers(own: str, peers: list[str], timeout_s: float) -> None:
    """Hold this worker's port open and wait until every peer answers, for at most ``timeout_s`` seconds.


    TensorFlow waits for a missing worker without a limit, in C++ that holds the GIL and ignores SIGTERM
    (measured with TF 2.21: still waiting after 11 minutes), so the wait is bounded here, before it starts.
    The listener answers the peers' probes until this worker hands its port to TensorFlow, whose server
    answers them from then on."""
    port = int(own.rpartition(":")[2])
    try:
        listener = socket.create_server(("", port))
    except OSError as e:
        raise OSError(f"TF_CONFIG gives this worker {own}, but port {port} cannot be opened here ({e})") from None
    deadline = time.monotonic() + timeout_s
    with listener:
        waiting = list(peers)
        while True:
            waiting = [address for address in waiting if not _answers(address)]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster in TF_CONFIG did not form within {timeout_s:g} s: no worker answers "
                                   f"at {', '.join(waiting)} (start every worker, check the addresses and firewalls, "
                                   "or raise training.join_timeout_s)")
            time.sleep(0.5)


def get_strategy(kind: str = "auto", devices: Sequence[str] | None = None,
                 join_timeout_s: float = 300) -> tf.distribute.Strategy:
    """The distribution strategy to build and train the model under.


    kind "auto": MultiWorkerMirroredStrategy when TF_CONFIG names several workers, else
    MirroredStrategy over all GPUs when there is one, else the default one-device strategy.
    "mirrored", "multi_worker", "default" force a kind. ``devices`` (e.g. ["/cpu:0", "/cpu:1"])
    builds a MirroredStrategy over exactly those devices. Call it first: MultiWorkerMirroredStrategy
    must be created before any other TensorFlow operation. TF_CONFIG is checked first (structure,
    addresses resolve); ``join_timeout_s`` bounds the wait for the other workers (`_wait_for_peers`).
    """
    if kind not in _STRATEGIES:
        raise ValueError(f"strategy kind must be one of {_STRATEGIES}, found {kind!r}")
    if devices is not None:
        if kind not in ("auto", "mirrored"):
            raise ValueError(f"devices= only applies to a mirrored strategy, found kind={kind!r}")
        return tf.distribute.MirroredStrategy(list(devices))
    if kind == "auto":
        if _cluster_size() > 1:
            kind = "multi_worker"
        elif tf.config.list_physical_devices("GPU"):
            kind = "mirrored"
        else:
            kind = "default"
    if kind == "multi_worker":
        _wait_for_peers(*check_tf_config(), join_timeout_s)
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
