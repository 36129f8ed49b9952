"""A training run from a config: dataset → P×K pipeline → `model.fit` with the paper's losses → periodic
evaluation → checkpoints → summary → export (docs/TRAINING.md). ``rga-train`` is a thin program over `run`.

On the TensorFlow backend the pipeline is tf.data and the devices tf.distribute's; on JAX, Grain and
keras.distribution (`rga_keras.training.placement`), with the same configs, run folder and callbacks. The export
needs the TensorFlow backend: elsewhere the run says how to export its model later.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import keras
import yaml

from rga_keras.data import check_enough_identities, corrupt_images, load_dataset, steps_per_epoch
from rga_keras.evaluation import features
from rga_keras.files import check_folder, write_text_atomic
from rga_keras.interrupts import deferred
from rga_keras.locks import writer_lock
from rga_keras.memory import check_batch_fits, explain_oom
from rga_keras.training.callbacks import DivergenceGuard, PeriodicEvaluation, completed_epochs, make_callbacks
from rga_keras.training.callbacks import results_line
from rga_keras.training.config import check_replica_split, distribution_line, lr_factor
from rga_keras.training.cluster import is_chief
from rga_keras.training.model import compiled_model, set_precision, to_reid_targets
from rga_keras.training.placement import Placement, place
from rga_keras.training.run_folder import check_run_folder, clear_run_folder
from rga_keras.visualize.plots import plot_training_curves

Log = Callable[[str], None]


def run(config: dict, *, verbose: int = 1, fresh: bool = False, log: Log = print,
        callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict:
    """Train as the (checked, `rga_keras.training.config.load_config`) config says and return the summary (also
    written to ``run_dir/summary.json``); what the run has to say on the way (dataset, batch split, evaluations,
    export) goes to ``log``, the progress bar to Keras (``verbose``).

    The run folder is locked first (`rga_keras.locks`): a second run into it is refused at once, naming this one.
    Re-running the same config after an interruption resumes from ``run_dir/backup``; a finished run, or an
    unfinished one of another config, is refused before anything is written (`rga_keras.training.run_folder`),
    unless ``fresh``, which deletes the run's files first. A run that ends before its first epoch is done leaves
    no files of its own (no folder recording nothing). A diverging run stops with `TrainingDiverged`. Under
    several workers (TF_CONFIG) every worker trains, but only the chief evaluates and writes files into its
    ``run_dir`` (and locks it); the others keep only their own backup there and return ``{"chief": False, ...}``
    without results. ``callbacks`` join the run's own, after its divergence guard (e.g. to time the steps:
    bench/bench_train.py).
    """
    run_dir = check_folder(config["run_dir"], "--run-dir")
    if not is_chief():
        return _run(config, verbose, fresh, log, callbacks)
    started: list[bool] = []  # set once this run has written its config.yaml
    with writer_lock(run_dir, inside=True):
        try:
            return _run(config, verbose, fresh, log, callbacks, started)
        except BaseException:
            if started and not any((run_dir / name).exists() for name in ("last.keras", "backup", "summary.json")):
                with deferred():
                    clear_run_folder(run_dir)  # no epoch was kept: no record of a run that never ran
            raise


def _run(config: dict, verbose: int, fresh: bool, log: Log, callbacks: Sequence[keras.callbacks.Callback],
         started: list[bool] | None = None) -> dict:
    training, sampler = config["training"], config["sampler"]
    set_determinism(int(training["seed"]), bool(training["deterministic"]))  # before the backend's first op
    placement = place(training)
    replicas, workers = placement.replicas, placement.workers
    check_replica_split(config, replicas)
    set_precision(training["precision"])
    run_dir, chief = Path(config["run_dir"]), is_chief()
    resumed = completed_epochs(str(run_dir)) if training["backup"] else 0  # epochs a backup says are done
    # Before anything is written: a finished run, or another config's, is refused with what differs.
    folder = check_run_folder(run_dir, config, resumable=resumed > 0, fresh=fresh) if chief else "resume"
    data = load_data(config)  # before anything is written: a wrong dataset path leaves no run folder behind
    check_enough_identities(data.train, sampler["num_ids_per_batch"])  # an empty train split, before the model
    data.require(("query", "gallery"), "the evaluation of the run")
    size = config["model"]["input_size"]
    check_batch_fits(sampler["num_ids_per_batch"] * sampler["images_per_id"], size, "sampler.num_ids_per_batch × "
                     "sampler.images_per_id =")
    check_batch_fits(min(config["eval"]["batch_size"], max(len(data.query), len(data.gallery))), size,
                     "eval.batch_size =")
    factor = lr_factor(config)
    log(data.summary())
    log(distribution_line(config, replicas, workers, factor))
    if folder != "resume":  # --fresh, or the same run stopped before its first backup: start over cleanly
        clear_run_folder(run_dir)
        resumed = 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if chief:
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        if started is not None:
            started.append(True)
    steps = training["steps_per_epoch"] or steps_per_epoch(data.train, sampler["num_ids_per_batch"])
    epochs = int(training["epochs"])
    with placement.scope():
        model = compiled_model(config, data.num_train_ids, steps, factor)
    train_ds = _train_input(config, data, placement, first_batch=resumed * steps)  # continue where it stopped

    started = time.time()
    with explain_oom("while evaluating", "lower eval.batch_size"):
        untrained = None if resumed or not chief else features.evaluate_model(model, data, config)
    if untrained:
        log(f"untrained: {results_line(untrained)}")
    evaluation = PeriodicEvaluation(data, config, training["eval_every"], epochs, log)
    guard = DivergenceGuard(_probe_images(config, data), training["diverge_factor"])  # first: before any file
    callbacks = [guard, *callbacks] + ([evaluation] if chief else []) + make_callbacks(
        str(run_dir), backup=training["backup"], tensorboard=training["tensorboard"],
        checkpoint_best_monitor="val_mAP", best_mode="max")
    with explain_oom("while training", "lower sampler.num_ids_per_batch (the batch is P×K images), eval.batch_size "
                     "or model.input_size, or use training.precision=mixed_float16"):
        # shuffle=False: the P×K sampler shuffles; Keras cannot shuffle a tf.data.Dataset (and warns if asked).
        history = model.fit(train_ds, epochs=epochs, steps_per_epoch=steps, shuffle=False,
                            callbacks=callbacks, verbose=verbose)
    if not chief:  # the chief's files may not even be on this machine: read and write none of them
        return {"chief": False, "run_dir": str(run_dir), "epochs": epochs, "replicas": replicas,
                "history": {k: [float(x) for x in v] for k, v in history.history.items()}}
    final = evaluation.results.get(epochs) or features.evaluate_model(model, data, config)
    curves = plot_training_curves(run_dir / "history.json", run_dir / "training_curves.png")
    summary = {
        "dataset": data.summary(), "run_dir": str(run_dir), "epochs": epochs, "steps_per_epoch": steps,
        "replicas": replicas, "workers": workers,
        "global_batch": sampler["num_ids_per_batch"] * sampler["images_per_id"],
        "learning_rate": config["optimizer"]["base_lr"] * factor,
        "train_seconds": round(time.time() - started, 1),
        "eval_feature": config["eval"]["feature"], "untrained": _metrics(untrained), "final": _metrics(final),
        "history": {k: [float(x) for x in v] for k, v in history.history.items()},
        "corrupt_images_skipped": corrupt_images.count,
        "artefacts": {"last": str(run_dir / "last.keras"), "best": str(run_dir / "best.keras"),
                      "curves": str(curves)},
    }
    if training["tensorboard"] and (run_dir / "tensorboard").is_dir():  # absent when tensorboard is not installed
        summary["artefacts"]["tensorboard"] = str(run_dir / "tensorboard")
    if config["export"]["enabled"] and keras.backend.backend() != "tensorflow":
        log(_export_later(config, run_dir))
    elif config["export"]["enabled"]:
        summary["export"] = export_model(model, data, config, run_dir / "export", log)
        if summary["export"]["artefacts"]:
            summary["artefacts"]["export"] = str(run_dir / "export")
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    return {**summary, "chief": True, "model": model, "data": data}


def load_data(config: dict):
    """The `ReidDataset` of the config's dataset section ("synthetic": the built-in dataset, generated once)."""
    spec = dict(config["dataset"])
    name, root, split = spec.pop("name"), spec.pop("root"), spec.pop("split")
    if name == "synthetic":  # the rest of the section: the synthetic dataset's size
        return load_dataset(name, root, **spec)
    if root is None:
        raise ValueError(f"dataset.root is not set: pass --data-root PATH to the folder holding {name}")
    return load_dataset(name, root, **({"split": split} if split else {}))


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and the backend; with ``deterministic`` also make the backend's ops deterministic, so
    two runs of the same config give the same losses (docs/TRAINING.md gives the cost).

    TensorFlow: op determinism, and one op at a time. Op determinism alone is not enough on CPU: with ops running
    concurrently (inter-op parallelism), eight repeats of one training step from the same state gave three
    different sets of weights (last-bit differences that grow over the steps); with one inter-op thread every
    repeat, and every process, gives the same. TensorFlow fixes that thread count when it runs its first op, and
    offers no way to undo op determinism: both are process-wide, so ``deterministic`` must be chosen before
    TensorFlow runs anything (as rga-train does). JAX: XLA's deterministic GPU ops (its CPU ops are), asked for
    through XLA_FLAGS, which JAX reads when it starts its first backend.
    """
    keras.utils.set_random_seed(seed)
    if deterministic and keras.backend.backend() == "jax":
        flag = "--xla_gpu_deterministic_ops=true"
        if flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    elif deterministic:
        import tensorflow as tf

        try:
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            raise ValueError("training.deterministic runs TensorFlow's ops one at a time, which can only be chosen "
                             "before TensorFlow runs its first operation: start the run in a fresh process "
                             "(as rga-train does)") from None
        tf.config.experimental.enable_op_determinism()


def _probe_images(config: dict, data, count: int = 16):
    """A fixed batch of query images for `DivergenceGuard`'s collapse check."""
    ds = features.eval_dataset(data.query[:count], tuple(config["model"]["input_size"]), count, workers=0)
    return next(iter(ds))[0]


def _train_input(config: dict, data, placement: Placement, first_batch: int):
    """The P×K training stream for ``model.fit``, tf.data on TensorFlow, Grain elsewhere: one stream of global
    batches on one replica; under several, each process reads only its replicas' slices of every global batch
    (whole identities each)."""
    sampler = config["sampler"]
    options = dict(num_ids_per_batch=sampler["num_ids_per_batch"], images_per_id=sampler["images_per_id"],
                   image_size=tuple(config["model"]["input_size"]), augment=sampler["augment"], cache=sampler["cache"],
                   seed=int(config["training"]["seed"]), num_replicas=placement.replicas, first_batch=first_batch)
    if keras.backend.backend() == "tensorflow":
        from rga_keras.data.pipeline import make_train_dataset as make
    else:
        from rga_keras.data.grain_pipeline import make_grain_train_dataset

        make = functools.partial(make_grain_train_dataset, workers=sampler["workers"])
    return placement.feed(lambda slices: to_reid_targets(make(data.train, replicas=slices, **options)))


def _export_later(config: dict, run_dir: Path) -> str:
    """The line that says the export needs the TensorFlow backend, and the command that exports the model later."""
    ex = config["export"]
    command = (f"KERAS_BACKEND=tensorflow rga-export --model {run_dir / 'last.keras'} --out {run_dir / 'export'} "
               f"--formats {','.join(ex['formats'])} --feature {config['eval']['feature']}")
    missing = "" if importlib.util.find_spec("tensorflow") else " (pip install tensorflow)"
    return (f"\nexport: skipped, it needs the TensorFlow backend (this run trained on {keras.backend.backend()}); "
            f"export the trained model later with{missing}: {command}")


def export_model(model: keras.Model, data, config: dict, out_dir: Path, log: Log = print) -> dict:
    """Export the trained model as the config's export section says, checked on the query/gallery split.

    Returns the short form kept in summary.json: whether every check passed, the report's table, the
    artefact paths. A re-run replaces an earlier export of the same run. An export that fails (a conversion
    error, or a missed threshold with ``enforce``) is reported and recorded, so the trained run is not lost.
    """
    from rga_keras.export import ExportError, export_all, failed_checks, format_table

    ex = config["export"]
    try:
        report = export_all(model, out_dir, formats=ex["formats"], feature=config["eval"]["feature"],
                            calibration_samples=data.train, num_calibration=int(ex["num_calibration"]),
                            eval_split=(data.query, data.gallery), enforce=bool(ex["enforce"]), overwrite=True,
                            verbose=False)
    except ExportError as err:
        log(f"\nexport FAILED, nothing was published: {err}")
        return {"passed": False, "error": str(err), "artefacts": {}}
    table = format_table(report)
    log("\nexport (" + ("all checks passed" if report["passed"] else "SOME CHECKS FAILED, see the report")
        + f"): {out_dir}\n{table}" + "".join(f"\n  {line}" for line in failed_checks(report)))
    return {"passed": bool(report["passed"]), "table": table,
            "artefacts": dict(report["artefacts"])}



def _metrics(results: dict[str, dict] | None) -> dict | None:
    """``{feature: {rank1, rank5, rank10, mAP, mINP}}`` rounded for summary.json (eval.feature first)."""
    if results is None:
        return None
    return {name: {k: round(float(m[k]), 6) for k in ("rank1", "rank5", "rank10", "mAP", "mINP")}
            for name, m in results.items()}
