"""The cluster of a run over several processes, as TF_CONFIG describes it: who the processes are, which one is the
chief, and a bounded wait until all of them are up. Shared by tf.distribute (`rga_keras.training.distribution`) and
keras.distribution on JAX (`rga_keras.training.jax_distribution`), so one TF_CONFIG starts a run on either.

``TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'`` on
the first machine and ``"index": 1`` on the second. Only the chief (worker 0, or the "chief" task) writes files.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Iterator


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


def cluster_size() -> int:
    """How many processes TF_CONFIG's cluster holds (0 without one)."""
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
    if cluster_size() <= 1:
        return True
    if "chief" in cluster:
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def cluster_addresses() -> list[str]:
    """Every process's ``host:port`` in rank order: the chief first (if named), then the workers."""
    cluster = _tf_config().get("cluster", {})
    return [a for kind in ("chief", "worker") for a in cluster.get(kind) or []]


def worker_index() -> int:
    """This process's index among its kind in TF_CONFIG (0 without one)."""
    return int(_tf_config().get("task", {}).get("index", 0))


@contextlib.contextmanager
def holding_port(own: str) -> Iterator[None]:
    """While inside, answer TCP connections at this process's ``host:port`` (so peers see it up)."""
    port = int(own.rpartition(":")[2])
    try:
        listener = socket.create_server(("", port))
    except OSError as e:
        raise OSError(f"TF_CONFIG gives this worker {own}, but port {port} cannot be opened here ({e})") from None
    stop = threading.Event()

    def accept() -> None:  # take connections off the backlog, so probes never wait on a full queue
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                listener.accept()[0].close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        listener.close()


def wait_for_peers(peers: list[str], timeout_s: float) -> None:
    """Wait until every peer answers at its ``host:port``, for at most ``timeout_s`` seconds.

    TensorFlow waits for a missing worker without a limit, in C++ that holds the GIL and ignores SIGTERM
    (measured with TF 2.21: still waiting after 11 minutes), and JAX's distributed service aborts the process
    when its own limit passes, so the wait is bounded here, before either starts, with a one-line error."""
    deadline = time.monotonic() + timeout_s
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
