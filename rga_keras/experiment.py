"""A training run from a config: dataset → tf.data → model → `model.fit` → evaluation → summary.

The `train/` program is a thin command line over `run` and `evaluate_model`. A config is a nested dict
(YAML files in ``train/configs``); `default_config` lists every key with the paper's values (docs/DESIGN.md §3).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import weakref
from pathlib import Path
from typing import Any

import keras
import numpy as np
import yaml

_PAPER_MILESTONES = list(range(80, 361, 40))
_LR_SCALING = {"linear": lambda ratio: ratio, "sqrt": lambda ratio: ratio ** 0.5, "none": lambda ratio: 1.0}


def default_config() -> dict:
    """The paper's recipe (RGA-SC on Market-1501) with every option the program understands."""
    return {
        "dataset": {"name": "market1501", "root": None, "split": None},
        "model": {
            "attention": "sc", "input_size": [256, 128], "last_stride": 1, "rga_stages": [1, 2, 3, 4],
            "backbone_weights": "imagenet", "s1": 8, "s2": 8, "use_relation": True, "use_original": True,
            "embedding": "asymmetric", "relation": "fused", "zero_init_residual": True,
        },
        # The GLOBAL batch, all replicas and machines together: P = num_ids_per_batch identities × K images.
        "sampler": {"num_ids_per_batch": 16, "images_per_id": 4, "augment": True, "cache": False},
        "optimizer": {
            # base_lr and warmup_start_lr are for a global batch of lr_reference_batch images; another global
            # batch scales both by lr_scaling: "linear" (× batch / reference), "sqrt" or "none".
            "name": "adam", "base_lr": 8e-4, "lr_reference_batch": 64, "lr_scaling": "linear",
            "weight_decay": 5e-4, "decoupled": False,
            "schedule": "multistep", "warmup_start_lr": 8e-6, "warmup_epochs": 20,
            "milestones": _PAPER_MILESTONES, "gamma": 0.5,
        },
        "loss": {"margin": 0.3, "epsilon": 0.1, "triplet_weight": 1.0, "ce_weight": 1.0, "soft_margin": False},
        "training": {
            "epochs": 600, "steps_per_epoch": None, "eval_every": 20, "seed": 0, "strategy": "auto",
            # devices: a list (e.g. ["/gpu:0", "/gpu:1"]) trains with MirroredStrategy on exactly those.
            # join_timeout_s: how long a multi-worker run (TF_CONFIG) waits for every worker before it gives up.
            "devices": None, "join_timeout_s": 300,
            "precision": "float32", "xla": False, "sync_bn": False, "backup": True, "tensorboard": True,
            # deterministic: seeded and TensorFlow's op determinism, so two runs give the same losses (slower,
            # docs/TRAINING.md); diverge_factor: stop when the loss exceeds this multiple of its first value.
            "deterministic": False, "diverge_factor": 100.0,
        },
        "eval": {"feature": "after_bn", "metric": "cosine", "flip": False, "rerank": False, "batch_size": 128},
        # After training: export the final model (rga_keras.export) into run_dir/export, checked on query/gallery.
        "export": {"enabled": False, "formats": ["saved_model", "tflite_float32", "tflite_float16", "tflite_dynamic"],
                   "num_calibration": 200, "enforce": False},
        "run_dir": "runs/market1501_rga_sc",
    }


def demo_config(run_dir: str | None = None) -> dict:
    """The README's main job: RGA-SC on the built-in synthetic dataset, a few minutes on 2 CPU cores."""
    config = default_config()
    config["dataset"] = {"name": "synthetic", "root": None, "split": None, "num_ids": 100,
                         "images_per_id": 20}
    # 64×32: from scratch the network learns within the demo's 300 steps at this size (at 128×64 it needs
    # several times more); the synthetic images are rendered at 128×64 and resized, as real data would be.
    config["model"].update(input_size=[64, 32], backbone_weights=None)
    config["sampler"].update(num_ids_per_batch=8, images_per_id=4)
    # A constant rate after a short warm-up: over so few steps from scratch, decaying it (cosine, or ×0.1 for
    # the last quarter) left the network less far along (docs/TRAINING.md, "The demo").
    config["optimizer"].update(base_lr=1e-3, lr_reference_batch=32, warmup_start_lr=1e-4, warmup_epochs=1,
                               schedule="multistep", milestones=[], weight_decay=5e-4)
    config["training"].update(epochs=12, steps_per_epoch=25, eval_every=4)
    config["eval"]["batch_size"] = 64
    config["export"]["enabled"] = True
    config["run_dir"] = run_dir or "runs/demo"
    return config


def merge(base: dict, override: dict, path: str = "") -> dict:
    """Deep-merge ``override`` into a copy of ``base``; unknown keys are an error (typos fail loudly)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in out:
            raise KeyError(f"unknown config key '{where}'; known here: {', '.join(sorted(out))}")
        if isinstance(out[key], dict) and not isinstance(value, dict):
            raise ValueError(f"config key '{where}' is a section; expected a mapping, found {value!r}")
        if isinstance(out[key], float) and isinstance(value, str):
            value = _as_float(value, where)  # YAML 1.1 reads "1e-3" as a string
        _check_type(out[key], value, where)
        out[key] = merge(out[key], value, where + ".") if isinstance(out[key], dict) and value else value
    return out


def _as_float(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"config key '{where}' expects a number, found {text!r}") from None


def _check_type(default: Any, value: Any, where: str) -> None:
    """A value for a key whose default is a bool, an integer, a number or a string must be one too (a string
    key may be null): ``training.epochs=abc`` fails here, naming the key, not deep inside the run."""
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str, type(None))}.get(type(default))
    if expected is None or (isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)):
        return
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[type(default)]
    raise ValueError(f"config key '{where}' expects {kind}, found {value!r}")


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), base: dict | None = None) -> dict:
    """A config: ``base`` (default: `default_config`), then the YAML file (whose ``base: other.yaml`` is
    read first), then ``key.sub=value`` overrides (values parsed as YAML)."""
    config = base if base is not None else default_config()
    if path is not None:
        config = merge(config, _read_yaml(Path(path)))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override must look like section.key=value, found {item!r}")
        dotted, raw = item.split("=", 1)
        try:
            value: Any = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"override {item!r}: the value is not valid YAML (quote it, e.g. key='...')") from None
        for part in reversed(dotted.strip().split(".")):
            value = {part: value}
        config = merge(config, value)
    check_config(config)
    return config


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:  # one line: where, and what the parser expected
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ValueError(f"{path}: not valid YAML ({where}{' '.join(str(problem).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    return _deep_update(_read_yaml(path.parent / base), data)


def _deep_update(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = _deep_update(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


# Numbers that must be > 0, or >= 0 (null allowed where the default is null: steps_per_epoch = a whole pass).
_POSITIVE_KEYS = ("optimizer.base_lr", "training.steps_per_epoch", "training.diverge_factor", "eval.batch_size")
_NON_NEGATIVE_KEYS = ("optimizer.warmup_start_lr", "optimizer.warmup_epochs", "optimizer.weight_decay",
                      "loss.margin", "loss.epsilon", "loss.triplet_weight", "loss.ce_weight")


def check_config(config: dict, num_replicas: int = 1) -> None:
    """Reject configs that contradict themselves, saying what was expected and what was found."""
    sampler, training = config["sampler"], config["training"]
    for key in (*_POSITIVE_KEYS, *_NON_NEGATIVE_KEYS):
        section, name = key.split(".")
        value, positive = config[section][name], key in _POSITIVE_KEYS
        if value is not None and not (value > 0 if positive else value >= 0):  # "not": NaN fails too
            raise ValueError(f"{key} must be {'> 0' if positive else '>= 0'}, found {value!r}")
    p, k = sampler["num_ids_per_batch"], sampler["images_per_id"]
    if not (isinstance(p, int) and isinstance(k, int) and p >= 2 and k >= 2):
        raise ValueError(f"sampler: need num_ids_per_batch >= 2 and images_per_id >= 2 for the batch-hard triplet "
                         f"loss, found P={p}, K={k}")
    if p % num_replicas:
        raise ValueError(f"sampler: the global batch of {p * k} images (P={p} identities × K={k}) cannot be split into "
                         f"{num_replicas} replicas holding whole identities: it must be a multiple of replicas × K = "
                         f"{num_replicas * k} (P a multiple of {num_replicas})")
    reference = config["optimizer"]["lr_reference_batch"]
    if not (isinstance(reference, int) and reference >= 1):
        raise ValueError(f"optimizer.lr_reference_batch must be a positive number of images, found {reference!r}")
    if config["optimizer"]["lr_scaling"] not in _LR_SCALING:
        raise ValueError(f"optimizer.lr_scaling must be one of {list(_LR_SCALING)}, "
                         f"found {config['optimizer']['lr_scaling']!r}")
    if int(training["epochs"]) < 1:
        raise ValueError(f"training.epochs must be >= 1, found {training['epochs']}")
    if config["eval"]["feature"] not in ("after_bn", "before_bn"):
        raise ValueError(f"eval.feature must be 'after_bn' or 'before_bn', found {config['eval']['feature']!r}")
    size = config["model"]["input_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and min(size) >= 32):
        raise ValueError(f"model.input_size must be [height, width] with both >= 32, found {size!r}")
    schedule = config["optimizer"]["schedule"]
    if schedule not in ("multistep", "cosine"):
        raise ValueError(f"optimizer.schedule must be 'multistep' or 'cosine', found {schedule!r}")
    from rga_keras.export import FORMATS

    formats = config["export"]["formats"]
    if not formats or any(f not in FORMATS for f in formats):
        raise ValueError(f"export.formats must be a non-empty list from {list(FORMATS)}, found {formats!r}")


def lr_factor(config: dict) -> float:
    """What the config's learning rates are multiplied by for its global batch (``optimizer.lr_scaling``)."""
    opt, sampler = config["optimizer"], config["sampler"]
    ratio = sampler["num_ids_per_batch"] * sampler["images_per_id"] / opt["lr_reference_batch"]
    return _LR_SCALING[opt["lr_scaling"]](ratio)


def distribution_line(config: dict, num_replicas: int, workers: int) -> str:
    """One line for the start of a run: global batch, its split over the replicas, and the learning rate."""
    sampler, opt = config["sampler"], config["optimizer"]
    p, k = sampler["num_ids_per_batch"], sampler["images_per_id"]
    factor = lr_factor(config)
    return (f"global batch {p * k} images ({p} identities × {k}) over {num_replicas} replica(s) on {workers} "
            f"worker(s): {p * k // num_replicas} images ({p // num_replicas} identities) per replica; "
            f"lr {opt['base_lr'] * factor:.3g} = base_lr {opt['base_lr']:.3g} (for batch {opt['lr_reference_batch']}) "
            f"× {factor:.3g} ({opt['lr_scaling']} scaling)")


def load_data(config: dict):
    """The `ReidDataset` the config names; "synthetic" generates (once) the built-in dataset."""
    from rga_keras.data import load_dataset
    from rga_keras.data.synthetic import ensure_synthetic

    spec = dict(config["dataset"])
    name, root = spec.pop("name"), spec.pop("root")
    split = spec.pop("split")
    if name == "synthetic":
        root = ensure_synthetic(root, **spec)
        name = "market1501"
    elif root is None:
        raise ValueError(f"dataset.root is not set: pass --data-root PATH to the folder holding {name}")
    kwargs = {"split": split} if split else {}
    return load_dataset(name, root, **kwargs)


def build_model(config: dict, num_classes: int) -> keras.Model:
    """`build_rga_resnet50` from the config's model section."""
    from rga_keras.layers import RGAOptions
    from rga_keras.models import build_rga_resnet50

    m = config["model"]
    options = RGAOptions(**{field.name: m[field.name] for field in dataclasses.fields(RGAOptions)})
    return build_rga_resnet50(
        num_classes, m["attention"], input_shape=(*m["input_size"], 3), last_stride=m["last_stride"],
        rga_stages=m["rga_stages"], backbone_weights=m["backbone_weights"], rga_options=options,
        zero_init_residual=m["zero_init_residual"],
    )


_INFERENCE_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def eval_features(config: dict, feature: str | None = None) -> tuple[str, ...]:
    """The retrieval features to evaluate: ``feature`` alone if given, else both with the config's
    ``eval.feature`` (the one that selects best.keras and is exported) first."""
    from rga_keras.models import FEATURES

    if feature is not None:
        return (feature,)
    first = config["eval"]["feature"]
    return (first, *(f for f in FEATURES if f != first))


def query_gallery_features(model: keras.Model, dataset, config: dict, verbose: int = 0,
                           features: tuple[str, ...] | None = None) -> tuple:
    """Retrieval features of the query and gallery images as the config's eval section says:
    ``((query_features, query_meta), (gallery_features, gallery_meta))``, meta as `extract_features` gives.

    The features are the config's ``eval.feature`` as an (n, d) array, or with ``features`` (names from
    ``after_bn``, ``before_bn``) a dict {name: (n, d) array}, all from one forward pass per batch."""
    from rga_keras.data import make_eval_dataset
    from rga_keras.evaluation import extract_features
    from rga_keras.models import embedding_model

    ev = config["eval"]
    # One inference model per (model, features), reused by every evaluation of a training run: Keras traces
    # its predict step once per batch shape instead of on every evaluation (TF warned about the retracing).
    cached = _INFERENCE_MODELS.setdefault(model, {})
    key = features if features is not None else ev["feature"]
    if key not in cached:
        cached[key] = embedding_model(model, key) if features is None else keras.Model(
            model.input, {f: embedding_model(model, f).output for f in features}, name=f"{model.name}_embeddings")
    embed = cached[key]
    size = tuple(config["model"]["input_size"])

    def extract(samples):
        ds = make_eval_dataset(samples, image_size=size, batch_size=ev["batch_size"])
        return extract_features(embed, ds, flip=ev["flip"], verbose=verbose,
                                num_batches=-(-len(samples) // ev["batch_size"]))

    return extract(dataset.query), extract(dataset.gallery)


def evaluate_model(model: keras.Model, dataset, config: dict, verbose: int = 0,
                   features: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Rank-1/5/10, mAP and mINP of ``model`` on the dataset's query/gallery split (docs/DESIGN.md §4), per
    retrieval feature: ``{feature: evaluate()'s dict}`` for ``features`` (default `eval_features`: both,
    ``eval.feature`` first). One forward pass serves every feature; each costs only its ranking."""
    from rga_keras.evaluation import evaluate

    ev = config["eval"]
    features = features or eval_features(config)
    (qf, q), (gf, g) = query_gallery_features(model, dataset, config, verbose, features)
    results = {}
    for name in features:
        result = evaluate(qf[name], gf[name], q["person_id"], g["person_id"], q["camera_id"], g["camera_id"],
                          metric=ev["metric"], rerank=ev["rerank"])
        results[name] = {k: (float(v) if np.isscalar(v) else v) for k, v in result.items()}
    return results


def format_results_line(results: dict[str, dict]) -> str:
    """``{feature: metrics}`` on one line: ``after_bn Rank-1 5.7 mAP 5.9 mINP 2.2 | before_bn ...``."""
    return " | ".join(f"{name} Rank-1 {100 * m['rank1']:.1f}  mAP {100 * m['mAP']:.1f}  mINP {100 * m['mINP']:.1f}"
                      for name, m in results.items())


class PeriodicEvaluation(keras.callbacks.Callback):
    """Evaluates on query/gallery every ``every`` epochs (and at the last) and adds ``val_rank1`` /
    ``val_mAP`` of ``eval.feature`` to the epoch logs, so checkpoints can monitor them and TensorBoard/history
    record them; the other feature, from the same forward pass, is logged as ``val_rank1_<feature>`` /
    ``val_mAP_<feature>``."""

    def __init__(self, dataset, config: dict, every: int, epochs: int) -> None:
        super().__init__()
        self.dataset, self.config, self.every, self.epochs = dataset, config, max(1, int(every)), epochs
        self.results: dict[int, dict[str, dict]] = {}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if (epoch + 1) % self.every and epoch + 1 != self.epochs:
            return
        results = evaluate_model(self.model, self.dataset, self.config)
        self.results[epoch + 1] = results
        if logs is not None:
            for i, (name, m) in enumerate(results.items()):  # eval.feature first: the monitored val_mAP
                suffix = f"_{name}" if i else ""
                logs.update({f"val_rank1{suffix}": m["rank1"], f"val_mAP{suffix}": m["mAP"]})
        print(f"\nepoch {epoch + 1}: {format_results_line(results)}", flush=True)


def run(config: dict, *, verbose: int = 1, fresh: bool = False) -> dict:
    """Train as the config says and return the summary (also written to ``run_dir/summary.json``).

    Re-running the same config after an interruption resumes from ``run_dir/backup``; a finished run, or an
    unfinished one of another config, is refused before anything is written (`rga_keras.run_folder`), unless
    ``fresh``, which deletes the run's files first. A diverging run stops with `TrainingDiverged`. Under several workers
    (TF_CONFIG) every worker trains, but only the chief evaluates and writes files into its ``run_dir``; the
    others keep only their own backup there and return ``{"chief": False, ...}`` without results.
    """
    from rga_keras.data import check_enough_identities, corrupt_images, steps_per_epoch
    from rga_keras.files import write_text_atomic
    from rga_keras.run_folder import check_run_folder, clear_run_folder
    from rga_keras.training import (DivergenceGuard, completed_epochs, explain_oom, get_strategy, is_chief,
                                    make_callbacks, num_workers, set_precision)
    from rga_keras.visualize import plot_training_curves

    training, sampler = config["training"], config["sampler"]
    set_determinism(int(training["seed"]), bool(training["deterministic"]))  # before TensorFlow's first op
    strategy = get_strategy(training["strategy"], training["devices"], training["join_timeout_s"])
    replicas, workers = strategy.num_replicas_in_sync, num_workers(strategy)
    check_config(config, replicas)
    set_precision(training["precision"])
    run_dir, chief = Path(config["run_dir"]), is_chief()
    resumed = completed_epochs(str(run_dir)) if training["backup"] else 0  # epochs a backup says are done
    # Before anything is written: a finished run, or another config's, is refused with what differs.
    folder = check_run_folder(run_dir, config, resumable=resumed > 0, fresh=fresh) if chief else "resume"
    data = load_data(config)  # before anything is written: a wrong dataset path leaves no run folder behind
    check_enough_identities(data.train, sampler["num_ids_per_batch"])  # an empty train split, before the model
    print(data.summary(), flush=True)
    print(distribution_line(config, replicas, workers), flush=True)
    if folder != "resume":  # --fresh, or the same run stopped before its first backup: start over cleanly
        clear_run_folder(run_dir)
        resumed = 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if chief:
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    steps = training["steps_per_epoch"] or steps_per_epoch(data.train, sampler["num_ids_per_batch"])
    epochs = int(training["epochs"])
    with strategy.scope():
        model = _compiled_model(config, data.num_train_ids, steps)
    train_ds = _train_input(config, data, strategy, first_batch=resumed * steps)  # continue where it stopped

    started = time.time()
    untrained = None if resumed or not chief else evaluate_model(model, data, config)
    if untrained:
        print(f"untrained: {format_results_line(untrained)}", flush=True)
    evaluation = PeriodicEvaluation(data, config, training["eval_every"], epochs)
    guard = DivergenceGuard(_probe_images(config, data), training["diverge_factor"])  # first: before any file
    callbacks = [guard] + ([evaluation] if chief else []) + make_callbacks(
        str(run_dir), backup=training["backup"], tensorboard=training["tensorboard"],
        checkpoint_best_monitor="val_mAP", best_mode="max")
    with explain_oom("lower sampler.num_ids_per_batch or model.input_size, or use training.precision=mixed_float16"):
        # shuffle=False: the P×K sampler shuffles; Keras cannot shuffle a tf.data.Dataset (and warns if asked).
        history = model.fit(train_ds, epochs=epochs, steps_per_epoch=steps, shuffle=False,
                            callbacks=callbacks, verbose=verbose)
    if not chief:  # the chief's files may not even be on this machine: read and write none of them
        return {"chief": False, "run_dir": str(run_dir), "epochs": epochs, "replicas": replicas,
                "history": {k: [float(x) for x in v] for k, v in history.history.items()}}
    final = evaluation.results.get(epochs) or evaluate_model(model, data, config)
    curves = plot_training_curves(run_dir / "history.json", run_dir / "training_curves.png")
    summary = {
        "dataset": data.summary(), "run_dir": str(run_dir), "epochs": epochs, "steps_per_epoch": steps,
        "replicas": replicas, "workers": workers,
        "global_batch": sampler["num_ids_per_batch"] * sampler["images_per_id"],
        "learning_rate": config["optimizer"]["base_lr"] * lr_factor(config),
        "train_seconds": round(time.time() - started, 1),
        "eval_feature": config["eval"]["feature"], "untrained": _metrics(untrained), "final": _metrics(final),
        "history": {k: [float(x) for x in v] for k, v in history.history.items()},
        "corrupt_images_skipped": corrupt_images.count,
        "artefacts": {"last": str(run_dir / "last.keras"), "best": str(run_dir / "best.keras"),
                      "curves": str(curves)},
    }
    if training["tensorboard"] and (run_dir / "tensorboard").is_dir():  # absent when tensorboard is not installed
        summary["artefacts"]["tensorboard"] = str(run_dir / "tensorboard")
    if config["export"]["enabled"]:
        summary["export"] = export_model(model, data, config, run_dir / "export")
        if summary["export"]["artefacts"]:
            summary["artefacts"]["export"] = str(run_dir / "export")
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    return {**summary, "chief": True, "model": model, "data": data}


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and the backend; with ``deterministic`` also make TensorFlow's ops deterministic and
    run one op at a time, so two runs of the same config give the same losses (docs/TRAINING.md gives the cost).

    Op determinism alone is not enough on CPU: with ops running concurrently (inter-op parallelism), eight
    repeats of one training step from the same state gave three different sets of weights (last-bit differences
    that grow over the steps); with one inter-op thread every repeat, and every process, gives the same.
    TensorFlow fixes that thread count when it runs its first op, and offers no way to undo op determinism:
    both are process-wide, so ``deterministic`` must be chosen before TensorFlow runs anything (as rga-train does).
    """
    keras.utils.set_random_seed(seed)
    if deterministic:
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
    from rga_keras.data import make_eval_dataset

    ds = make_eval_dataset(data.query[:count], image_size=tuple(config["model"]["input_size"]), batch_size=count)
    return next(iter(ds))[0]


def _compiled_model(config: dict, num_classes: int, steps: int) -> keras.Model:
    """The config's model, compiled with its losses and optimiser (learning rates scaled for the global batch).
    Call inside the strategy scope."""
    from rga_keras.optimizers import WarmupCosineSchedule, WarmupMultiStepSchedule, make_optimizer
    from rga_keras.training import compile_reid, use_sync_batchnorm

    opt, loss, training = config["optimizer"], config["loss"], config["training"]
    model = build_model(config, num_classes)
    if training["sync_bn"]:
        use_sync_batchnorm(model)
    factor = lr_factor(config)
    schedule_args = dict(base_lr=opt["base_lr"] * factor, warmup_start_lr=opt["warmup_start_lr"] * factor,
                         warmup_epochs=opt["warmup_epochs"], steps_per_epoch=steps)
    schedule = (WarmupMultiStepSchedule(milestones=opt["milestones"], gamma=opt["gamma"], **schedule_args)
                if opt["schedule"] == "multistep" else
                WarmupCosineSchedule(total_epochs=max(int(training["epochs"]), opt["warmup_epochs"] + 1),
                                     **schedule_args))
    return compile_reid(model, optimizer=make_optimizer(opt["name"], schedule, opt["weight_decay"], opt["decoupled"]),
                        triplet_weight=loss["triplet_weight"], ce_weight=loss["ce_weight"], margin=loss["margin"],
                        epsilon=loss["epsilon"], soft_margin=loss["soft_margin"], jit_compile=training["xla"])


def _train_input(config: dict, data, strategy, first_batch: int):
    """The P×K training stream for ``model.fit``: one dataset of global batches on one replica; under several,
    each worker reads only its replicas' slices of every global batch (whole identities each)."""
    from rga_keras.data import make_train_dataset
    from rga_keras.training import distribute_pk_dataset, to_reid_targets

    sampler, replicas = config["sampler"], strategy.num_replicas_in_sync

    def stream(slices=None):
        return to_reid_targets(make_train_dataset(
            data.train, num_ids_per_batch=sampler["num_ids_per_batch"], images_per_id=sampler["images_per_id"],
            image_size=tuple(config["model"]["input_size"]), augment=sampler["augment"], cache=sampler["cache"],
            seed=int(config["training"]["seed"]), num_replicas=replicas, first_batch=first_batch, replicas=slices))

    return stream() if replicas == 1 else distribute_pk_dataset(strategy, stream)


def export_model(model: keras.Model, data, config: dict, out_dir: Path) -> dict:
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
        print(f"\nexport FAILED, nothing was published: {err}", flush=True)
        return {"passed": False, "error": str(err), "artefacts": {}}
    table = format_table(report)
    print("\nexport (" + ("all checks passed" if report["passed"] else "SOME CHECKS FAILED, see the report")
          + f"): {out_dir}\n{table}" + "".join(f"\n  {line}" for line in failed_checks(report)), flush=True)
    return {"passed": bool(report["passed"]), "table": table,
            "artefacts": dict(report["artefacts"])}


def _metrics(results: dict[str, dict] | None) -> dict | None:
    """``{feature: {rank1, rank5, rank10, mAP, mINP}}`` rounded for summary.json (eval.feature first)."""
    if results is None:
        return None
    return {name: {k: round(float(m[k]), 6) for k in ("rank1", "rank5", "rank10", "mAP", "mINP")}
            for name, m in results.items()}


def print_summary(result: dict) -> None:
    """What the run produced and where it went, for the terminal."""
    if not result["chief"]:
        print(f"\ntraining: {result['epochs']} epochs done on this worker; the chief (worker 0) evaluates and "
              "writes the model, history, summary and export into its run_dir")
        return
    selected = "  (eval.feature: selects best.keras" + (", exported)" if "export" in result else ")")

    def rows(label: str, results: dict | None) -> list[str]:
        if results is None:
            return [f"{label:16s}: –"]
        lines = []
        for name, m in results.items():
            mark = selected if name == result["eval_feature"] else ""
            head = f"{label:16s}:" if not lines else " " * 17
            lines.append(f"{head} {name:9s}  Rank-1 {100 * m['rank1']:5.1f}  mAP {100 * m['mAP']:5.1f}  "
                         f"mINP {100 * m['mINP']:5.1f}{mark}")
        return lines

    print("\n" + result["dataset"])
    print("\n".join(rows("untrained model", result["untrained"]) + rows("trained model", result["final"])))
    print(f"{'training':16s}: {result['epochs']} epochs, {result['train_seconds']} s")
    for name, path in result["artefacts"].items():
        print(f"{name:16s}: {path}")
    print(f"{'summary':16s}: {Path(result['run_dir']) / 'summary.json'}")
