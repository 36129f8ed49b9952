"""Find JPEG files that decode only with libjpeg's "Corrupt JPEG data" warnings (docs/DATA.md).

TensorFlow's decoder prints such a warning, unattributed, and returns an image with garbage in it: such a
file would be trained on or embedded without a word. `simplejpeg` (libjpeg-turbo) in strict mode turns the
warning into an error. The check decodes at 1/8 scale in grey: the entropy-coded data, where corruption
shows, is still read in full, at about a third of a full decode's cost (docs/DATA.md gives the measured cost).
Files that are not JPEG are not checked here; the pipelines skip those that fail to decode.

Each verdict is remembered in the cache folder by the file's path, size and modification time
(``image_verdicts.sqlite3``): a dataset loaded again, or an image embedded again, is not read twice; a file
changed since (its size or time) is checked again. Without a usable cache folder every file is checked.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import simplejpeg

from rga_keras.cores import available_cores
from rga_keras.data._cache import cache_root

JPEG_SIGNATURE = b"\xff\xd8\xff"
VERDICTS_FILE = "image_verdicts.sqlite3"
UNREADABLE = "cannot be read"  # a verdict about access, not the file: never remembered
_LOOKUP_ROWS = 500  # paths per query (SQLite's limit on parameters is 999 in old builds)


def jpeg_problem(data: bytes) -> str | None:
    """Why the encoded image ``data`` is a corrupt JPEG (libjpeg's message), or None (fine, or not JPEG)."""
    if not data.startswith(JPEG_SIGNATURE):
        return None
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_factor=8)
    except ValueError as error:
        return f"corrupt JPEG data ({error})"
    return None


def file_problem(path: str | os.PathLike) -> str | None:
    """`jpeg_problem` of a file, or why it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return jpeg_problem(handle.read())
    except OSError as error:
        return f"{UNREADABLE} ({error.strerror or error})"


def find_corrupt(paths: Sequence[str], workers: int | None = None) -> dict[str, str]:
    """``{path: problem}`` for the files of ``paths`` that are corrupt JPEGs or unreadable. Files checked before
    and unchanged take their remembered verdict; the others are read, in threads (simplejpeg releases the GIL
    while decoding), and their verdicts remembered."""
    stamps = {path: _stamp(path) for path in dict.fromkeys(paths)}
    verdicts = _Verdicts(cache_root() / VERDICTS_FILE)
    known = verdicts.known(stamps)
    unknown = [path for path in stamps if path not in known]
    with ThreadPoolExecutor(workers or available_cores()) as pool:
        found = dict(zip(unknown, pool.map(file_problem, unknown, chunksize=64)))
    verdicts.remember({path: (stamps[path], why) for path, why in found.items()
                       if stamps[path] is not None and not (why or "").startswith(UNREADABLE)})
    found.update(known)
    return {path: found[path] for path in stamps if found[path]}


def _stamp(path: str) -> tuple[int, int] | None:
    """(size, modification time in ns) of a file, or None where it cannot be read (never remembered)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


class _Verdicts:
    """Earlier verdicts by absolute path, valid while the file keeps its (size, mtime). A cache that cannot be
    opened or written (a read-only or full disk, a damaged file) only costs the time of checking again."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def _open(self) -> sqlite3.Connection:
        """The database, made if missing, and anew if the file is not one (damaged: it holds only verdicts)."""
        self.file.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect()
        except sqlite3.OperationalError:  # locked, read-only, ...: not the file's fault
            raise
        except sqlite3.DatabaseError:
            self.file.unlink(missing_ok=True)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.file, timeout=30)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS verdicts (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                       "problem TEXT)")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def known(self, stamps: dict[str, tuple[int, int] | None]) -> dict[str, str | None]:
        """The remembered verdicts of the files in ``stamps`` still as they were."""
        keys = {os.path.abspath(path): path for path, stamp in stamps.items() if stamp is not None}
        found: dict[str, str | None] = {}
        try:
            with contextlib.closing(self._open()) as db:
                names = list(keys)
                for start in range(0, len(names), _LOOKUP_ROWS):
                    chunk = names[start:start + _LOOKUP_ROWS]
                    rows = db.execute(f"SELECT path, size, mtime_ns, problem FROM verdicts WHERE path IN "
                                      f"({','.join('?' * len(chunk))})", chunk)
                    for key, size, mtime_ns, problem in rows:
                        if stamps[keys[key]] == (size, mtime_ns):
                            found[keys[key]] = problem
        except (sqlite3.Error, OSError):
            return {}
        return found

    def remember(self, verdicts: dict[str, tuple[tuple[int, int], str | None]]) -> None:
        """Store ``{path: ((size, mtime_ns), problem or None)}``."""
        if not verdicts:
            return
        rows = [(os.path.abspath(path), *stamp, problem) for path, (stamp, problem) in verdicts.items()]
        try:
            with contextlib.closing(self._open()) as db, db:
                db.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)", rows)
        except (sqlite3.Error, OSError):
            pass
