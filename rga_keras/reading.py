"""Reading the files the programs are given, with errors that name the file.

Text is UTF-8, with or without the byte-order mark that Excel's "CSV UTF-8" and Windows editors write; a file
in another encoding is refused naming the file, the line and the byte. JSON errors name the file and the
place. `naming` gives any other reader's errors (h5py's "truncated file: eof = …", a missing HDF5 attribute)
the file's name.
"""
from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator


def read_text(path: str | os.PathLike) -> str:
    """The text of ``path``: UTF-8, a leading byte-order mark dropped; ValueError naming the file, line and byte
    when it is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save it as UTF-8 "
                         "(in Excel: \"CSV UTF-8\")") from None


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in ``path``; ValueError naming the file and the place when it does not parse."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); the file is "
                         "damaged or was not written by rga-keras") from None


@contextlib.contextmanager
def naming(path: str | os.PathLike, what: str, hint: str = "") -> Iterator[None]:
    """Inside, a reader's error that does not name ``path`` (OSError, ValueError, KeyError, TypeError, RuntimeError, as
    h5py and TensorFlow raise them; zipfile's BadZipFile, a .keras file cut short) is raised again as a ValueError
    that does, saying it was ``what`` (and ``hint``: what to do): a message such as "truncated file: eof = 1000" then
    says which file is truncated."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, zipfile.BadZipFile) as err:
        message = " ".join((str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)).split())
        if isinstance(err, OSError) and err.filename:  # named already (a missing file: the callers' business)
            raise
        if str(path) in message:
            if not hint:
                raise
            raise ValueError(f"{message}; {hint}") from None
        raise ValueError(f"{path}: cannot be read as {what} ({message or type(err).__name__}); the file is "
                         "damaged, truncated or of another kind" + (f"; {hint}" if hint else "")) from None
