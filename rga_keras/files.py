"""Files written atomically: a temporary file beside the target, renamed over it once complete.

A crash or an error mid-write leaves the target as it was, so a half-written checkpoint, report or
picture can never be mistaken for a good one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def staging_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new temporary folder in ``parent`` with the permissions of an ordinary new folder.

    mkdtemp makes it private (0700), and a folder published by renaming it would stay so: a TF Serving
    process or a colleague under another user could not read it.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, then rename it to ``path``.

    The temporary name keeps ``path``'s extension (``.keras``, ``.weights.h5``, ...), which some writers
    check, and the file gets the permissions of an ordinary new file (mkstemp makes it private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    ext = ".weights.h5" if name.endswith(".weights.h5") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{name[: len(name) - len(ext)]}.", suffix=f".tmp{ext}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
