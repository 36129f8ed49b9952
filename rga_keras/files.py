"""Files written atomically: a temporary file beside the target, renamed over it once complete.

A crash or an error mid-write leaves the target as it was, so a half-written checkpoint, report or
picture can never be mistaken for a good one. What is written keeps its owner's intent: a file or folder
that replaces another gets the permission bits of the one it replaces (a new one follows the umask), and an
output path that is a symbolic link is written through (the link stays; its target is replaced), as
``open(path, "w")`` would (`output_target`, `publish`).

Temporary names carry ``<pid>@<host>~``, the process that writes them. A process killed mid-write
(kill -9, a power cut) leaves its temporary behind; the next write of the same kind in the same folder
removes it once it is stale: written on this host by a process that no longer runs, or, written
elsewhere (a shared filesystem) or before names carried the tag, last modified over `STALE_AFTER_S` ago.
A live process's temporaries are never touched.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable

from rga_keras.interrupts import deferred, raise_if_interrupted

STALE_AFTER_S = 24 * 3600  # a temporary whose writer cannot be checked is stale after a day
_TAG = re.compile(r"(\d+)@([^~/]*)~")


def temp_tag() -> str:
    """``<pid>@<host>~``: put in every temporary name, so a later run can tell whether its writer still runs."""
    return f"{os.getpid()}@{socket.gethostname()}~"


def _writer_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def is_stale(path: Path) -> bool:
    """Whether the temporary ``path`` was left by a writer that is gone (see the module doc)."""
    match = _TAG.search(path.name)
    if match and match.group(2) == socket.gethostname():
        return int(match.group(1)) != os.getpid() and _writer_gone(int(match.group(1)))
    try:
        return time.time() - path.lstat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def remove_stale_temps(parent: str | os.PathLike, prefix: str, suffix: str = "") -> list[Path]:
    """Delete the stale temporaries ``parent/<prefix>*<suffix>`` (files or folders); returns those deleted."""
    removed = []
    for path in Path(parent).glob(glob.escape(prefix) + "*" + glob.escape(suffix)):
        if not is_stale(path):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
    return removed


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def staging_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new temporary folder in ``parent`` with the permissions of an ordinary new folder; stale ones of the
    same ``prefix`` there are removed first.

    mkdtemp makes it private (0700), and a folder published by renaming it would stay so: a TF Serving
    process or a colleague under another user could not read it.
    """
    remove_stale_temps(parent, prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix + temp_tag(), dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (so nothing can be made below it), else None."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_folder(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a Path for an output folder; refused (FileExistsError, naming ``option``) when it, or the
    nearest existing folder above it, is a file: said before any work, where the OS would only say "Not a
    directory" or "File exists" about some file inside, after it."""
    path = Path(path)
    blocker = path if path.exists() and not path.is_dir() else _file_above(path)
    if blocker is not None:
        what = "is a file" if blocker == path else f"would be made inside {blocker}, which is a file"
        raise FileExistsError(f"{option} {path} {what}, not a folder: choose another {option}")
    return path


def check_file(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a Path for an output file; refused (FileExistsError, naming ``option``) when it is a folder
    or lies below a file, so a program says so before its work, not when it writes the result."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{option} {path} is a folder; expected the path of a file to write")
    check_folder(path.parent, f"{option}'s folder")
    return path


def output_target(path: str | os.PathLike) -> Path:
    """Where writing ``path`` lands: ``path`` itself, or, where it (or a folder on the way) is a symbolic link,
    the link's target, which need not exist yet. A link that leads to itself is refused (OSError naming it)."""
    path = Path(path)
    if not path.is_symlink():
        return path
    try:
        os.stat(path)
    except FileNotFoundError:  # a dangling link: its target is made
        pass
    except OSError as err:
        raise OSError(err.errno, f"{path} is a symbolic link that cannot be followed ({err.strerror}): remove it "
                                 "or point it at a file", str(path)) from None
    return Path(os.path.realpath(path))


def publish(staged: str | os.PathLike, path: str | os.PathLike, aside: str | os.PathLike | None = None) -> Path:
    """Rename the finished file or folder ``staged`` onto ``path`` (in the same file system): through a link
    there, with the permission bits of what it replaces. A folder in the way is first moved into the folder
    ``aside`` (which the caller deletes), as a rename cannot replace a folder that is not empty. Returns where
    it landed."""
    target = output_target(path)
    try:
        os.chmod(staged, stat.S_IMODE(os.stat(target).st_mode))
    except FileNotFoundError:
        pass
    raise_if_interrupted()  # a signal that native code swallowed on the way: publish nothing
    if aside is not None and target.is_dir():
        os.replace(target, Path(aside) / target.name)
    os.replace(staged, target)
    return target


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, then rename it to ``path`` (`publish`:
    through a link, keeping the permission bits of the file it replaces).

    The temporary name keeps ``path``'s extension (``.keras``, ``.weights.h5``, ...), which some writers
    check, and a new file gets the permissions of an ordinary new file (mkstemp makes it private).
    """
    path = check_file(path, "output")
    target = output_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    name = target.name
    ext = ".weights.h5" if name.endswith(".weights.h5") else target.suffix
    prefix, suffix = f".{name[: len(name) - len(ext)]}.", f".tmp{ext}"
    remove_stale_temps(target.parent, prefix, suffix)  # left by a writer killed mid-write
    fd, tmp = tempfile.mkstemp(prefix=prefix + temp_tag(), suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        publish(tmp, target)
    except BaseException:
        with deferred(), contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
