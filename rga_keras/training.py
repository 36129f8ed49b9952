"""Training helpers around `model.fit`: strategy, precision, compile, callbacks.

Typical use (the model maps images to {"features": f, "logits": z}, docs/DESIGN.md §2)::

    strategy = get_strategy()                      # before any other TensorFlow work
    set_precision("mixed_float16")                 # before building the model
    with strategy.scope():
        model = build_model(...)
        use_sync_batchnorm(model)                  # optional, before compile
        sched = WarmupMultiStepSchedule(steps_per_epoch=steps)
        compile_reid(model, optimizer=make_optimizer("adam", sched))
    model.fit(to_reid_targets(train_ds), epochs=600, callbacks=make_callbacks(run_dir))

Distribution. With MirroredStrategy each global batch (P×K images) is split into contiguous equal
slices, one per replica, and the batch-hard triplet loss mines inside each slice: order the batch
so every slice holds whole identities (K ≥ 2 images each), i.e. the global batch must divide into
replicas × identities-per-replica × K. Gradients are averaged over the global batch, so keep the
learning rate when only the replica count changes at a fixed global batch; scale it linearly if you
grow the global batch. Without `use_sync_batchnorm`, BatchNorm normalises each replica's slice
(global batch / replicas images) with its own statistics and the moving statistics that get saved
come from one replica's slices; with it, statistics are those of the whole global batch.

Several machines: run the same program on each with TF_CONFIG set, e.g. on the first machine
``TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker",
"index": 0}}'`` and ``"index": 1`` on the second; `get_strategy()` then checks TF_CONFIG, waits a bounded
time for every worker to answer, and returns a MultiWorkerMirroredStrategy. Feed fit through
`distribute_pk_dataset`: each worker then reads only its own replicas' slices of every global batch,
whole identities each. Only the chief (worker 0) writes checkpoints and logs; every worker keeps its own
BackupAndRestore state.
"""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import math
import os
import socket
import time
import warnings
from typing import Callable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from rga_keras.files import atomic_write, write_text_atomic
from rga_keras.layers import RGA, RelationAttention
from rga_keras.models import RGAResNetBackbone
from rga_keras.losses import BatchHardTripletLoss, LabelSmoothingCrossEntropy

_STRATEGIES = ("auto", "mirrored", "multi_worker", "default")
_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


# ---- strategy and precision --------------------------------------------------------------------

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


def set_precision(policy: str = "float32") -> str:
    """Set Keras' global dtype policy; call before building the model.

    "mixed_float16": float16 compute with dynamic loss scaling (Keras wraps the optimiser in a
    LossScaleOptimizer at compile); for GPUs with tensor cores. "mixed_bfloat16": no loss scaling
    needed (recent GPUs, TPUs, CPUs with AMX). The losses compute in float32 whatever the model
    outputs.
    """
    if policy not in _POLICIES:
        raise ValueError(f"precision policy must be one of {_POLICIES}, found {policy!r}")
    if policy == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
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


# ---- compile -------------------------------------------------------------------------------------

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


def to_reid_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Map a dataset of (images, labels) to (images, {"logits": labels, "features": labels})."""
    spec = dataset.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise ValueError(f"to_reid_targets expects a dataset of (images, labels) pairs, found {spec}")
    return dataset.map(lambda x, y: (x, {"logits": y, "features": y}),
                       num_parallel_calls=tf.data.AUTOTUNE)


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


@contextlib.contextmanager
def explain_oom(hint: str = "") -> Iterator[None]:
    """Turn an out-of-memory error (tf ResourceExhaustedError) inside the block into a short
    MemoryError saying what to change. Checkpoints are written atomically, so none is left half."""
    try:
        yield
    except tf.errors.ResourceExhaustedError as e:
        first = (e.message or "").strip().splitlines()[:1]
        raise MemoryError(
            "Out of device memory while training"
            + (f" ({first[0][:200]})" if first else "") + ". Reduce the batch (P×K), use "
            "set_precision('mixed_float16'), a smaller input size, or more replicas."
            + (f" {hint}" if hint else "")) from None


def save_model_atomic(model: keras.Model, path: str) -> None:
    """``model.save(path)`` (a .keras file) through a temp file and rename."""
    if not path.endswith(".keras"):
        raise ValueError(f"checkpoint path must end in .keras, found {path!r}")
    atomic_write(path, lambda tmp: model.save(tmp, overwrite=True))


# ---- callbacks -----------------------------------------------------------------------------------

class TrainingDiverged(RuntimeError):
    """Training stopped because its loss or its features stopped making sense (`DivergenceGuard`)."""


class DivergenceGuard(keras.callbacks.Callback):
    """Stop training when it diverges, before anything of the diverged epoch is kept.

    After every step: the loss must be finite and at most ``explode_factor`` × max(1, the first step's loss)
    (measured before any update, so it is sane). After every epoch: the model's ``features`` output on ``probe_images``
    must be finite and must not have collapsed (every image the same vector: retrieval is then at chance
    whatever the loss says). Raises `TrainingDiverged`; put it first among the callbacks, so the diverged
    epoch is neither evaluated nor checkpointed nor backed up.
    """

    def __init__(self, probe_images=None, explode_factor: float = 100.0,
                 hint: str = "lower optimizer.base_lr, or check the data") -> None:
        super().__init__()
        self.probe_images, self.explode_factor, self.hint = probe_images, float(explode_factor), hint
        self.first_loss: float | None = None
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def _stop(self, problem: str) -> None:
        raise TrainingDiverged(f"training diverged in epoch {self.epoch}: {problem}; {self.hint}. Nothing of this "
                               f"epoch was kept (last.keras, best.keras and the backup hold earlier epochs)")

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(loss)
        if not math.isfinite(loss):
            self._stop(f"the loss is {loss} at step {batch + 1}")
        if self.first_loss is None:
            self.first_loss = abs(loss)
        elif abs(loss) > self.explode_factor * max(self.first_loss, 1.0):  # floor: a loss near 0 may rise a little
            self._stop(f"the loss is {loss:.3g} at step {batch + 1}, over {self.explode_factor:g}× its first value "
                       f"{self.first_loss:.3g}")

    def on_epoch_end(self, epoch, logs=None):
        if self.probe_images is None:
            return
        features = keras.ops.convert_to_numpy(self.model(self.probe_images, training=False)["features"])
        if not np.isfinite(features).all():
            self._stop("the features hold NaN or infinite values")
        if np.ptp(features, axis=0).max() <= 1e-6 * max(1.0, float(np.abs(features).max())):
            self._stop(f"the features collapsed: all {len(features)} probe images give the same vector, so "
                       "retrieval would be at chance")


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore with each backup file (weights, epoch counter) replaced atomically,
    so a kill during a backup leaves the previous one loadable. A kill between the two renames
    makes the resumed run repeat one epoch."""

    def _save_model(self):
        atomic_write(self._weights_path,
                     lambda tmp: self.model.save_weights(tmp, overwrite=True))
        write_text_atomic(self._training_metadata_path,
                          json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen}))


class AtomicCheckpoint(keras.callbacks.Callback):
    """Save the model (.keras) every epoch, or only when ``monitor`` improves, atomically.

    With a monitor the best value is kept in ``<path>.json`` so it survives a resume; epochs
    whose logs lack the monitor (e.g. no evaluation that epoch) are skipped. ``mode`` "auto"
    maximises names containing acc/map/rank/cmc and minimises the rest.
    """

    def __init__(self, filepath: str, monitor: str | None = None, mode: str = "auto"):
        super().__init__()
        if not filepath.endswith(".keras"):
            raise ValueError(f"checkpoint path must end in .keras, found {filepath!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', found {mode!r}")
        if mode == "auto" and monitor is not None:
            mode = "max" if any(k in monitor.lower() for k in ("acc", "map", "rank", "cmc")) else "min"
        self.filepath, self.monitor, self.mode = filepath, monitor, mode
        self.best = None

    def on_train_begin(self, logs=None):
        if self.monitor and os.path.exists(self.filepath + ".json"):
            with open(self.filepath + ".json", encoding="utf-8") as f:
                state = json.load(f)
            if state.get("monitor") == self.monitor:
                self.best = state["value"]

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor is None:
            save_model_atomic(self.model, self.filepath)
            return
        value, loss = (logs or {}).get(self.monitor), (logs or {}).get("loss", 0.0)
        if value is None or not math.isfinite(float(value)) or not math.isfinite(float(loss)):
            return  # an epoch whose loss is NaN/inf is never the best, whatever its evaluation said
        value = float(value)
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            save_model_atomic(self.model, self.filepath)
            self.best = value
            write_text_atomic(self.filepath + ".json",
                              json.dumps({"monitor": self.monitor, "value": value, "epoch": epoch + 1}))


class HistoryLog(keras.callbacks.Callback):
    """Per-epoch logs to ``history.json`` and ``history.csv`` in ``run_dir`` (rewritten
    atomically each epoch; a resumed run continues the same files, one row per epoch)."""

    def __init__(self, run_dir: str):
        super().__init__()
        self.json_path = os.path.join(run_dir, "history.json")
        self.csv_path = os.path.join(run_dir, "history.csv")
        self.rows: dict[int, dict] = {}

    def on_train_begin(self, logs=None):
        if os.path.exists(self.json_path):
            with open(self.json_path, encoding="utf-8") as f:
                self.rows = {row["epoch"]: row for row in json.load(f)}

    def on_epoch_end(self, epoch, logs=None):
        self.rows[epoch + 1] = {"epoch": epoch + 1,
                                **{k: float(v) for k, v in (logs or {}).items()}}
        rows = [self.rows[e] for e in sorted(self.rows)]
        write_text_atomic(self.json_path, json.dumps(rows, indent=1))
        fields = list(dict.fromkeys(k for row in rows for k in row))

        def write_csv(tmp):
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
        atomic_write(self.csv_path, write_csv)


def make_callbacks(run_dir: str, *, backup: bool = True, tensorboard: bool = True,
                   checkpoint_best_monitor: str | None = None,
                   best_mode: str = "auto") -> list[keras.callbacks.Callback]:
    """Callbacks for a resumable run writing into ``run_dir``.

    - ``tensorboard/``: TensorBoard logs (skipped with a warning when tensorboard is missing);
    - ``history.json`` / ``history.csv``: per-epoch logs (``epoch`` counted from 1);
    - ``last.keras`` every epoch, ``best.keras`` (+ ``best.keras.json``) when
      ``checkpoint_best_monitor`` improves; both written atomically;
    - ``backup/``: BackupAndRestore state, so re-running the same fit after a kill resumes at the
      epoch after the last completed one (weights, optimiser state and step count restored);
      it is deleted when fit completes. It comes last, so an epoch only counts as done once the
      other callbacks have written its files.
    Under several workers only the chief writes logs and checkpoints; other workers keep only
    their own backup (``backup-worker<i>/``).
    """
    os.makedirs(run_dir, exist_ok=True)
    callbacks: list[keras.callbacks.Callback] = []
    chief = is_chief()
    if chief:
        if tensorboard and importlib.util.find_spec("tensorboard") is None:
            warnings.warn("tensorboard is not installed (pip install tensorboard): "
                          "training without TensorBoard logs", stacklevel=2)
        elif tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard")))
        callbacks.append(HistoryLog(run_dir))
        callbacks.append(AtomicCheckpoint(os.path.join(run_dir, "last.keras")))
        if checkpoint_best_monitor:
            callbacks.append(AtomicCheckpoint(os.path.join(run_dir, "best.keras"),
                                              monitor=checkpoint_best_monitor, mode=best_mode))
    if backup:
        callbacks.append(AtomicBackupAndRestore(_backup_dir(run_dir)))
    return callbacks


def _backup_dir(run_dir: str) -> str:
    """This worker's BackupAndRestore folder in ``run_dir``."""
    index = _tf_config().get("task", {}).get("index", 0)
    return os.path.join(run_dir, "backup" if is_chief() else f"backup-worker{index}")


def completed_epochs(run_dir: str) -> int:
    """Epochs the backup in ``run_dir`` has recorded (0 without one): where re-running the fit resumes.
    The caller starts its training stream after that many epochs' batches, so the resumed run sees what
    the uninterrupted one would have (`rga_keras.data.make_train_dataset`'s ``first_batch``)."""
    try:
        with open(os.path.join(_backup_dir(run_dir), "training_metadata.json"), encoding="utf-8") as f:
            return int(json.load(f)["epoch"])
    except (FileNotFoundError, NotADirectoryError):  # no backup; a run_dir that is a file is refused later
        return 0
