"""What a training run folder holds, checked before a run writes anything into it.

A run records its config in ``run_dir/config.yaml`` and, once finished, its results in ``summary.json``.
Re-running into a folder is allowed only to resume the same unfinished run: a finished run, or an
unfinished one with another config, is refused with the keys that differ, before ``config.yaml`` or the
history is touched. ``fresh=True`` (``rga-train --fresh``) deletes the run's own files and starts over.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from rga_keras.files import check_folder
from rga_keras.training.config import default_config, read_yaml_file

# Every file or folder a run writes into run_dir (backup-worker<i>/ of other workers matched separately).
RUN_FILES = ("config.yaml", "summary.json", "history.json", "history.csv", "training_curves.png", "last.keras",
             "best.keras", "best.keras.json", "backup", "tensorboard", "export")
_NOT_IDENTITY = ("run_dir",)  # config keys that may change without making it another run


def run_files(run_dir: Path) -> list[Path]:
    """The run's own files and folders present in ``run_dir``."""
    run_dir = Path(run_dir)
    return [run_dir / n for n in RUN_FILES if (run_dir / n).exists()] + sorted(run_dir.glob("backup-worker*"))


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix[:-1]: config}
    return {k: v for key, value in config.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


def config_differences(recorded: dict, config: dict) -> list[str]:
    """``key: recorded → now`` for every dotted key whose value differs (``run_dir`` ignored). A key the recorded
    config lacks (written by an older version) differs only where it is now set to something else than its
    default, so a run started before a new option existed resumes under the new version."""
    old, new = _flatten(recorded), _flatten(config)
    defaults = _flatten(default_config())
    old.update({k: v for k, v in new.items() if k not in old and k in defaults and v == defaults[k]})
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in _NOT_IDENTITY and old.get(k) != new.get(k)]
    return [f"{k}: {old.get(k, '(absent)')!r} → {new.get(k, '(absent)')!r}" for k in keys]


def check_run_folder(run_dir: Path, config: dict, resumable: bool, fresh: bool = False) -> str:
    """Whether a run of ``config`` may use ``run_dir``: "new" (nothing there, or ``fresh``), "resume" (the same
    unfinished run, with a backup to resume from) or "restart" (the same unfinished run, nothing to resume:
    its files are to be replaced). Raises FileExistsError / ValueError, saying what differs and what to do.
    Reads only: ``fresh`` files are deleted by `clear_run_folder` once the run is sure to start."""
    run_dir = check_folder(run_dir, "--run-dir")
    present = run_files(run_dir)
    if fresh or not present or present == [run_dir / "config.yaml"]:  # a record of nothing (stopped at once)
        return "new"
    fresh_hint = f"or pass --fresh to delete this run's files in {run_dir} and start over"
    recorded_path = run_dir / "config.yaml"
    if not recorded_path.is_file():
        raise FileExistsError(f"{run_dir} holds {', '.join(p.name for p in present)} but no config.yaml, so it is "
                              f"no run this program can continue: choose another --run-dir, {fresh_hint}")
    try:
        recorded = read_yaml_file(recorded_path)
    except ValueError as err:
        raise ValueError(f"{err}: {fresh_hint}") from None
    differences = config_differences(recorded if isinstance(recorded, dict) else {}, config)
    said = f"; its config.yaml differs in {len(differences)} key(s): " + "; ".join(differences[:6]) + (
        "; ..." if len(differences) > 6 else "") if differences else ""
    if (run_dir / "summary.json").is_file():
        raise FileExistsError(f"{run_dir} holds a finished run (summary.json){said}. Re-running into it would mix "
                              f"two runs' checkpoints and history: choose another --run-dir, {fresh_hint}")
    if differences:
        raise ValueError(f"{run_dir} holds an unfinished run of another config{said}. To continue it, re-run with "
                         f"the recorded values (its config.yaml); {fresh_hint}")
    return "resume" if resumable else "restart"


def clear_run_folder(run_dir: Path) -> None:
    """Delete the run's own files in ``run_dir`` (not anything else a user put there)."""
    for path in run_files(run_dir):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
