"""Cache folder location and all-or-nothing creation of generated directories.

Generated data (CUHK03 images extracted from the .mat release, the synthetic dataset) is built in a
temporary sibling folder and renamed into place only once complete, with a marker file written last,
so an interrupted run never leaves a folder that looks finished.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from rga_keras.files import output_target, publish, remove_stale_temps, staging_dir
from rga_keras.interrupts import deferred

MARKER = ".complete.json"


def cache_root() -> Path:
    """$RGA_KERAS_CACHE if set, else ~/.cache/rga_keras."""
    env = os.environ.get("RGA_KERAS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rga_keras"


def read_marker(folder: Path) -> dict | None:
    """The parameters a finished folder was built with, or None if it is missing or unfinished."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def build_atomically(final: Path, build: Callable[[Path], None], params: dict, *,
                     replace_foreign: bool = True) -> Path:
    """Run ``build(tmp)`` in a temporary folder beside ``final``, write the marker, then move it into place.

    An existing ``final`` is replaced; with ``replace_foreign=False`` only if it is empty or its marker
    names the same ``generator`` (else FileExistsError, raised before building). If another process
    publishes a finished folder with the same parameters first, its result is kept and ours is discarded.
    """
    given, final = Path(final), output_target(final)  # a link to the folder stays a link
    if not replace_foreign:
        check_replaceable(final, params)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent, f".{final.name}.old-")  # a replaced folder a killed run had not deleted
    tmp = staging_dir(final.parent, prefix=f".{final.name}.tmp-")
    old = None
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True))
        if final.exists():
            if read_marker(final) == params:
                return given  # someone else finished the same work meanwhile
            if not replace_foreign:
                check_replaceable(final, params)
            old = staging_dir(final.parent, prefix=f".{final.name}.old-")
        try:
            publish(tmp, final, aside=old)  # the folder it replaces keeps its permission bits
        except OSError:  # lost a race: keep the winner's folder if it is the same work
            if read_marker(final) != params:
                raise
    finally:
        with deferred():
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    return given


def check_replaceable(folder: Path, params: dict) -> None:
    """Raise unless ``folder`` is absent, an empty folder, or was built by ``params["generator"]``: the
    library replaces only what it made, never a user's folder given by mistake."""
    if not folder.exists() or (read_marker(folder) or {}).get("generator") == params["generator"]:
        return
    if folder.is_dir() and not any(folder.iterdir()):
        return
    raise FileExistsError(f"{folder} exists and was not created by rga_keras (no {MARKER} from "
                          f"{params['generator']}); not replacing it: move it away or choose another folder")
