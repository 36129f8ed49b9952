"""A training run's config: every option with the paper's values (docs/DESIGN.md §3), the demo's, the bundled
recipes, merging YAML files and ``key=value`` overrides, validation, and the learning-rate rule — each once.

A config is a nested dict; `default_config` lists every key. `load_config` returns a checked config; what can
only be checked against the devices (the global batch's split over replicas) is `check_replica_split`.
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import yaml

from rga_keras.attention import check_attention
from rga_keras.checks import check_choice
from rga_keras.data.samples import check_pk_batch
from rga_keras.evaluation.distances import METRICS
from rga_keras.models import FEATURES, RESNET50_BLOCKS, RESNET50_WIDTHS
from rga_keras.reading import read_text

CONFIG_DIR = Path(__file__).parent / "configs"  # the paper's recipes (train/configs in the repository)
SCHEDULES = ("multistep", "cosine")

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
            # ResNet-50's bottlenecks per stage and widths; other values give smaller networks for experiments and
            # tests (ImageNet weights exist for ResNet-50's only).
            "stage_blocks": list(RESNET50_BLOCKS), "stage_widths": list(RESNET50_WIDTHS),
        },
        # The GLOBAL batch, all replicas and machines together: P = num_ids_per_batch identities × K images.
        # workers: the processes that build the batches with Grain (backends other than TensorFlow); null: one
        # per available core, 0: in the training process.
        "sampler": {"num_ids_per_batch": 16, "images_per_id": 4, "augment": True, "cache": False, "workers": None},
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
            # devices: a list (e.g. ["/gpu:0", "/gpu:1"]) trains with MirroredStrategy (on JAX: DataParallel) on
            # exactly those.
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



def bundled_configs() -> dict[str, Path]:
    """The bundled recipes by name (``rga-train --list-configs``)."""
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.yaml"))}


def config_path(name: str | os.PathLike) -> Path:
    """A config file: ``name`` itself if it is a file, else the bundled recipe of that name (".yaml" optional)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = bundled_configs().get(path.name.removesuffix(".yaml"))
    if bundled is None:
        raise FileNotFoundError(f"config '{name}' is neither a file nor a bundled config "
                                f"({', '.join(bundled_configs())})")
    return bundled


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
            value: Any = load_yaml(raw)
        except yaml.YAMLError:
            raise ValueError(f"override {item!r}: the value is not valid YAML (quote it, e.g. key='...')") from None
        except ValueError as err:
            raise ValueError(f"override {item!r}: {err}") from None
        for part in reversed(dotted.strip().split(".")):
            value = {part: value}
        config = merge(config, value)
    check_config(config)
    return config



def load_yaml(text: str) -> Any:
    """YAML ``text`` as Python values (safe: no objects); yaml.YAMLError for bad syntax, ValueError naming the
    key (dotted) and its lines when a mapping holds a key twice (PyYAML would keep the last silently)."""
    _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader))
    return yaml.safe_load(text)


def _check_unique_keys(node: Any, prefix: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
            if key in seen:
                raise ValueError(f"key '{key}' appears twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
            _check_unique_keys(value_node, key + ".")
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item, prefix)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """Where and what, on one line: ``line 3, column 1: expected ',' or ']'``."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + " ".join(str(getattr(err, "problem", None) or err).split())


def read_yaml_file(path: str | os.PathLike) -> Any:
    """The YAML document in ``path`` (UTF-8, BOM accepted); ValueError naming the file and the place."""
    text = read_text(path)
    try:
        return load_yaml(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = read_yaml_file(path)
    if data is None:  # empty, or comments only: the defaults would run unasked
        raise ValueError(f"{path}: the config is empty; give the keys to set, or `base: RECIPE` to start from a "
                         "bundled one (rga-train --list-configs)")
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



def check_config(config: dict) -> None:
    """Reject configs that contradict themselves, saying what was expected and what was found (`load_config`
    calls it; the split over the replicas is checked once they are known, `check_replica_split`)."""
    from rga_keras.export.formats import FORMATS  # the format names only: no converter is imported

    sampler, training = config["sampler"], config["training"]
    for key, value in _numbers(config):
        if not math.isfinite(value):
            raise ValueError(f"config key '{key}' must be a finite number, found {value!r}")
    for key in (*_POSITIVE_KEYS, *_NON_NEGATIVE_KEYS):
        section, name = key.split(".")
        value, positive = config[section][name], key in _POSITIVE_KEYS
        if value is not None and not (value > 0 if positive else value >= 0):  # "not": NaN fails too
            raise ValueError(f"{key} must be {'> 0' if positive else '>= 0'}, found {value!r}")
    p, k = sampler["num_ids_per_batch"], sampler["images_per_id"]
    if not (isinstance(p, int) and isinstance(k, int) and p >= 2 and k >= 2):
        raise ValueError(f"sampler: need num_ids_per_batch >= 2 and images_per_id >= 2 for the batch-hard triplet "
                         f"loss, found P={p}, K={k}")
    workers = sampler["workers"]
    if workers is not None and not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0):
        raise ValueError(f"sampler.workers must be null (one per core) or an integer >= 0, found {workers!r}")
    reference = config["optimizer"]["lr_reference_batch"]
    if not (isinstance(reference, int) and reference >= 1):
        raise ValueError(f"optimizer.lr_reference_batch must be a positive number of images, found {reference!r}")
    for key, value, choices in (("optimizer.lr_scaling", config["optimizer"]["lr_scaling"], tuple(_LR_SCALING)),
                                ("optimizer.schedule", config["optimizer"]["schedule"], SCHEDULES),
                                ("eval.feature", config["eval"]["feature"], FEATURES),
                                ("eval.metric", config["eval"]["metric"], METRICS)):
        check_choice(key, value, choices)
    check_attention(config["model"]["attention"])
    if int(training["epochs"]) < 1:
        raise ValueError(f"training.epochs must be >= 1, found {training['epochs']}")
    size = config["model"]["input_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and min(size) >= 32):
        raise ValueError(f"model.input_size must be [height, width] with both >= 32, found {size!r}")
    model = config["model"]
    resnet50 = list(model["stage_blocks"]) == list(RESNET50_BLOCKS) and list(model["stage_widths"]) == list(
        RESNET50_WIDTHS)
    if model["backbone_weights"] is not None and not resnet50:
        raise ValueError(f"model.backbone_weights {model['backbone_weights']!r} are ResNet-50's: they need "
                         f"model.stage_blocks={list(RESNET50_BLOCKS)} and model.stage_widths={list(RESNET50_WIDTHS)}, "
                         f"found {model['stage_blocks']} and {model['stage_widths']} (or set model.backbone_weights=null)")
    formats = config["export"]["formats"]
    if not formats or any(f not in FORMATS for f in formats):
        raise ValueError(f"export.formats must be a non-empty list from {list(FORMATS)}, found {formats!r}")


def _numbers(config: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float in the config (in lists too) with its dotted key."""
    if isinstance(config, dict):
        return [item for key, value in config.items() for item in _numbers(value, f"{prefix}{key}.")]
    if isinstance(config, (list, tuple)):
        return [item for value in config for item in _numbers(value, prefix)]
    return [(prefix[:-1], config)] if isinstance(config, float) else []


def check_replica_split(config: dict, num_replicas: int) -> None:
    """The config's global batch must split over ``num_replicas`` replicas into whole identities."""
    check_pk_batch(config["sampler"]["num_ids_per_batch"], config["sampler"]["images_per_id"], num_replicas)


def lr_factor(config: dict) -> float:
    """What the config's learning rates are multiplied by for its global batch (``optimizer.lr_scaling``)."""
    opt, sampler = config["optimizer"], config["sampler"]
    ratio = sampler["num_ids_per_batch"] * sampler["images_per_id"] / opt["lr_reference_batch"]
    return _LR_SCALING[opt["lr_scaling"]](ratio)



def distribution_line(config: dict, num_replicas: int, workers: int, factor: float) -> str:
    """One line for the start of a run: global batch, its split over the replicas, and the learning rate
    (``factor``: `lr_factor` of the config)."""
    sampler, opt = config["sampler"], config["optimizer"]
    p, k = sampler["num_ids_per_batch"], sampler["images_per_id"]
    return (f"global batch {p * k} images ({p} identities × {k}) over {num_replicas} replica(s) on {workers} "
            f"worker(s): {p * k // num_replicas} images ({p // num_replicas} identities) per replica; "
            f"lr {opt['base_lr'] * factor:.3g} = base_lr {opt['base_lr']:.3g} (for batch {opt['lr_reference_batch']}) "
            f"× {factor:.3g} ({opt['lr_scaling']} scaling)")

