"""Cache folder location and all-or-nothing creation of generated directories.

Generated data (CUHK03 images extracted from the .mat release, the synthetic dataset) is built in a
temporary sibling folder and renamed into place only once complete, with a marker file written last,
so an interrupted run never leaves a folder that looks finished.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

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


def build_atomically(final: Path, build: Callable[[Path], None], params: dict) -> Path:
    """Run ``build(tmp)`` in a temporary folder beside ``final``, write the marker, then move it into place.

    An existing ``final`` is replaced. If another process publishes a finished folder with the same
    parameters first, its result is kept and ours is discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True))
        if final.exists():
            if read_marker(final) == params:
                return final  # someone else finished the same work meanwhile
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:  # lost a race: keep the winner's folder if it is the same work
            if read_marker(final) != params:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
