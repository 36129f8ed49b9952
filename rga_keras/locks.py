"""One writer per output: a lock taken before anything is written into a run folder, an export folder, a
features file or an index, so that a second program writing the same output is refused at once.

The lock is ``flock`` on a small lock file (a folder's: ``FOLDER/.rga-keras.lock``; a file's, which is replaced
by renaming: ``.NAME.rga-keras.lock`` beside it). The kernel releases it when its process ends in any way,
``kill -9`` included, so a lock is never stale; the file names the holder (pid, host, program, start time) for
the refusal. On Linux, flock on NFS is carried out as a POSIX lock by the server, so it holds across hosts too.
A writer that finds the lock held is refused at once (`OutputLocked`), not made to wait: the holder may be a
training run of days, and a writer that waited would then write over a result it never saw.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".rga-keras.lock"


class OutputLocked(BlockingIOError):
    """Another process holds the output's writer lock (an OSError: the programs report it as bad input, status 2)."""


def lock_path(output: str | os.PathLike, inside: bool) -> Path:
    """Where the lock of ``output`` lives: inside a folder that is written into, beside anything replaced whole."""
    output = Path(output)
    return output / LOCK_NAME if inside else output.parent / f".{output.name}{LOCK_NAME}"


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or "a process that is still starting"


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its ancestors that do not exist yet, nearest first."""
    missing = []
    for path in (folder, *folder.absolute().parents):
        if path.exists():
            break
        missing.append(path)
    return missing


@contextlib.contextmanager
def writer_lock(output: str | os.PathLike, *, inside: bool) -> Iterator[Path]:
    """Hold the writer lock of ``output`` (a folder written into when ``inside``, else a file or folder replaced
    whole) while the body writes it; `OutputLocked` at once, naming the holder, when another process holds it.

    Folders made to hold the lock are removed again on the way out if nothing else was put in them, so a
    refused or failed start leaves nothing behind. Re-entrant within one process for the same output is not
    supported (flock locks per open file: a second acquisition would refuse its own holder)."""
    output = Path(output)
    path = lock_path(output, inside)
    made = _missing_folders(path.parent)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # /proc, a read-only mount, no permission: say what could not be made
            raise OSError(err.errno, f"cannot make the folder {err.filename or path.parent} to write {output} "
                                     f"({err.strerror}): choose a folder you can write to") from None
        fd = _acquire(path, output)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, {_program()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it: a process waiting on this file sees it is gone and retries
        os.close(fd)
        _remove_empty(made)


def _acquire(path: Path, output: Path) -> int:
    """An open descriptor of the lock file ``path``, locked; `OutputLocked` naming the holder if another has it."""
    while True:  # until the file locked is the one at `path` (a holder unlinks it when it is done)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except BlockingIOError:
            os.close(fd)
            raise OutputLocked(f"{output} is being written by another process ({_holder(path)}): wait for it to end "
                               "or stop it, or write elsewhere") from None
        except FileNotFoundError:
            same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this process made for a lock, nearest first, where they are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _program() -> str:
    """The running program's name for the lock file (``rga-train``, or the Python script)."""
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
