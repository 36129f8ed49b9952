"""The callbacks of a training run: a divergence guard, periodic evaluation, atomic checkpoints, history,
backup and resume (`make_callbacks` assembles them for a run folder)."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import warnings
from typing import Callable

import keras

from rga_keras.evaluation import features
from rga_keras.evaluation.feature_check import check_features
from rga_keras.files import atomic_write, write_text_atomic
from rga_keras.reading import naming, read_json
from rga_keras.training.cluster import is_chief, worker_index
from rga_keras.undistributed import undistributed


def save_model_atomic(model: keras.Model, path: str) -> None:
    """``model.save(path)`` (a .keras file) through a temp file and rename."""
    if not path.endswith(".keras"):
        raise ValueError(f"checkpoint path must end in .keras, found {path!r}")
    with undistributed():  # Keras' saving makes variables: on one process of several, they must be its own
        atomic_write(path, lambda tmp: model.save(tmp, overwrite=True))


def link_atomic(source: str, path: str) -> None:
    """``path`` becomes the file ``source`` is (a hard link; a copy where the filesystem has none), atomically.
    A checkpoint is only ever replaced by renaming a new file over it, never changed in place, so files linked
    this way stay what they were when linked."""
    def link(tmp: str) -> None:
        os.remove(tmp)  # atomic_write made it; the link takes its name
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    atomic_write(path, link)


def save_or_link(model: keras.Model, path: str, epochs_done: int, source: AtomicCheckpoint | None) -> None:
    """The model's whole state into ``path`` (.keras) after ``epochs_done`` epochs, once per epoch: linked from
    ``source``'s file when that checkpoint holds the same epoch, else serialised. model.save of the demo's 311 MiB
    state (weights and Adam's moments) costs ~5 s of CPU on a 2-core machine; last.keras, best.keras and the backup
    each wrote it."""
    if source is not None and source.saved_after == epochs_done:
        link_atomic(source.filepath, path)
    else:
        save_model_atomic(model, path)


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
        with features.on_one_device(self.model) as model:  # under a Keras distribution: a copy outside it
            probe_features = keras.ops.convert_to_numpy(model(self.probe_images, training=False)["features"])
        found = check_features(probe_features)
        if len(found.nonfinite):
            self._stop("the features hold NaN or infinite values")
        if found.collapsed or len(found.zero) == found.rows:
            self._stop(f"the features collapsed: all {len(probe_features)} probe images give the same vector, so "
                       "retrieval would be at chance")


def results_line(results: dict[str, dict]) -> str:
    """``{feature: metrics}`` on one line: ``after_bn Rank-1 5.7  mAP 5.9  mINP 2.2 | before_bn ...``."""
    return " | ".join(f"{name} Rank-1 {100 * m['rank1']:.1f}  mAP {100 * m['mAP']:.1f}  mINP {100 * m['mINP']:.1f}"
                      for name, m in results.items())


class PeriodicEvaluation(keras.callbacks.Callback):
    """Evaluates on query/gallery every ``every`` epochs (and at the last) and adds ``val_rank1`` /
    ``val_mAP`` of ``eval.feature`` to the epoch logs, so checkpoints can monitor them and TensorBoard/history
    record them; the other feature, from the same forward pass, is logged as ``val_rank1_<feature>`` /
    ``val_mAP_<feature>``."""

    def __init__(self, dataset, config: dict, every: int, epochs: int, log: Callable[[str], None] = print) -> None:
        super().__init__()
        self.dataset, self.config, self.every, self.epochs = dataset, config, max(1, int(every)), epochs
        self.log = log
        self.results: dict[int, dict[str, dict]] = {}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if (epoch + 1) % self.every and epoch + 1 != self.epochs:
            return
        results = features.evaluate_model(self.model, self.dataset, self.config)
        self.results[epoch + 1] = results
        if logs is not None:
            for i, (name, m) in enumerate(results.items()):  # eval.feature first: the monitored val_mAP
                suffix = f"_{name}" if i else ""
                logs.update({f"val_rank1{suffix}": m["rank1"], f"val_mAP{suffix}": m["mAP"]})
        self.log(f"\nepoch {epoch + 1}: {results_line(results)}")


_START_OVER = ("the run cannot resume from it: pass --fresh to start over (the run's checkpoints and history are "
               "deleted)")


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore with each backup file (the model's state, the epoch counter) replaced atomically,
    so a kill during a backup leaves the previous one loadable. A kill between the two renames makes the resumed
    run repeat one epoch.

    With ``copy_of`` (the run's last.keras checkpoint, which comes before it) the state is ``latest.keras``, a link
    to that epoch's file; without (workers other than the chief) Keras' ``latest.weights.h5``. ``model.load_weights``
    restores the same state (weights, optimizer, step count) from either, and a resume reads whichever is there.
    """

    def __init__(self, backup_dir: str, copy_of: AtomicCheckpoint | None = None) -> None:
        super().__init__(backup_dir)
        self.copy_of = copy_of
        if copy_of is not None:
            self._weights_path = os.path.join(backup_dir, "latest.keras")
            self._prev_weights_path = f"{self._weights_path}.bkp"

    def on_train_begin(self, logs=None):
        own = self._weights_path
        kinds = [own] + [os.path.join(self.backup_dir, name) for name in ("latest.keras", "latest.weights.h5")]
        self._weights_path = next((path for path in kinds if os.path.exists(path)), own)
        try:
            with naming(self._weights_path, "the weights of a backup to resume from", _START_OVER):
                super().on_train_begin(logs)
        finally:
            self._weights_path = own

    def _save_model(self):
        if self.copy_of is not None:
            save_or_link(self.model, self._weights_path, self._current_epoch, self.copy_of)
        else:
            with undistributed():  # as in save_model_atomic
                atomic_write(self._weights_path, lambda tmp: self.model.save_weights(tmp, overwrite=True))
        write_text_atomic(self._training_metadata_path,
                          json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen}))


class AtomicCheckpoint(keras.callbacks.Callback):
    """Save the model (.keras) every epoch, or only when ``monitor`` improves, atomically.

    With a monitor the best value is kept in ``<path>.json`` so it survives a resume; epochs
    whose logs lack the monitor (e.g. no evaluation that epoch) are skipped. ``mode`` "auto"
    maximises names containing acc/map/rank/cmc and minimises the rest. With ``copy_of`` (a checkpoint
    that comes before this one), an epoch that one saved is linked from its file.
    """

    def __init__(self, filepath: str, monitor: str | None = None, mode: str = "auto",
                 copy_of: AtomicCheckpoint | None = None):
        super().__init__()
        if not filepath.endswith(".keras"):
            raise ValueError(f"checkpoint path must end in .keras, found {filepath!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', found {mode!r}")
        if mode == "auto" and monitor is not None:
            mode = "max" if any(k in monitor.lower() for k in ("acc", "map", "rank", "cmc")) else "min"
        self.filepath, self.monitor, self.mode, self.copy_of = filepath, monitor, mode, copy_of
        self.best = None
        self.saved_after: int | None = None  # the epoch (counted from 1) whose end this file holds

    def on_train_begin(self, logs=None):
        if self.monitor and os.path.exists(self.filepath + ".json"):
            state = read_json(self.filepath + ".json")
            if isinstance(state, dict) and state.get("monitor") == self.monitor:
                self.best = state["value"]

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor is None:
            save_or_link(self.model, self.filepath, epoch + 1, self.copy_of)
            self.saved_after = epoch + 1
            return
        value, loss = (logs or {}).get(self.monitor), (logs or {}).get("loss", 0.0)
        if value is None or not math.isfinite(float(value)) or not math.isfinite(float(loss)):
            return  # an epoch whose loss is NaN/inf is never the best, whatever its evaluation said
        value = float(value)
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            save_or_link(self.model, self.filepath, epoch + 1, self.copy_of)
            self.saved_after, self.best = epoch + 1, value
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
            with naming(self.json_path, "the run's history (a list of epochs)"):
                self.rows = {row["epoch"]: row for row in read_json(self.json_path)}

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
      ``checkpoint_best_monitor`` improves; both written atomically, best.keras (and the backup) as links to
      last.keras when they hold the same epoch;
    - ``backup/``: BackupAndRestore state, so re-running the same fit after a kill resumes at the
      epoch after the last completed one (weights, optimiser state and step count restored);
      it is deleted when fit completes. It comes last, so an epoch only counts as done once the
      other callbacks have written its files.
    Under several workers only the chief writes logs and checkpoints; other workers keep only
    their own backup (``backup-worker<i>/``).
    """
    os.makedirs(run_dir, exist_ok=True)
    callbacks: list[keras.callbacks.Callback] = []
    chief, last = is_chief(), None
    if chief:
        missing = [name for name in ("tensorboard", "tensorflow") if importlib.util.find_spec(name) is None]
        if tensorboard and missing:  # Keras writes TensorBoard logs with TensorFlow, whatever the backend
            warnings.warn(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed (pip install "
                          f"{' '.join(missing)}): training without TensorBoard logs", stacklevel=2)
        elif tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard")))
        callbacks.append(HistoryLog(run_dir))
        last = AtomicCheckpoint(os.path.join(run_dir, "last.keras"))
        callbacks.append(last)
        if checkpoint_best_monitor:
            callbacks.append(AtomicCheckpoint(os.path.join(run_dir, "best.keras"), monitor=checkpoint_best_monitor,
                                              mode=best_mode, copy_of=last))
    if backup:
        callbacks.append(AtomicBackupAndRestore(_backup_dir(run_dir), copy_of=last))
    return callbacks


def _backup_dir(run_dir: str) -> str:
    """This worker's BackupAndRestore folder in ``run_dir``."""
    return os.path.join(run_dir, "backup" if is_chief() else f"backup-worker{worker_index()}")


def completed_epochs(run_dir: str) -> int:
    """Epochs the backup in ``run_dir`` has recorded (0 without one): where re-running the fit resumes.
    The caller starts its training stream after that many epochs' batches, so the resumed run sees what
    the uninterrupted one would have (`rga_keras.data.make_train_dataset`'s ``first_batch``)."""
    path = os.path.join(_backup_dir(run_dir), "training_metadata.json")
    try:
        with naming(path, "a backup's record of its epoch", _START_OVER):
            return int(read_json(path)["epoch"])
    except (FileNotFoundError, NotADirectoryError):  # no backup; a run_dir that is a file is refused later
        return 0
