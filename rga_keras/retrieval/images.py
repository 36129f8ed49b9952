"""The image files a command names: files, folders (searched recursively) and list files (.txt, .csv)."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Iterable

from rga_keras.reading import read_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")  # what the evaluation pipeline decodes
LIST_SUFFIXES = (".txt", ".csv", ".lst")


def list_images(sources: Iterable[str | os.PathLike]) -> list[str]:
    """Absolute paths of the images ``sources`` name, in order, each once.

    A folder gives its image files (`IMAGE_SUFFIXES`, any case), recursively, sorted; a ``.txt``/``.lst``
    file one path per line (blank lines and ``#`` comments skipped); a ``.csv`` file the first column of
    each row (a header row starting ``path`` skipped); list paths are relative to the list file's folder.
    Any other file is taken as an image (an unreadable one is skipped when embedding). A source that does
    not exist is a `FileNotFoundError`; finding no image at all is a `ValueError`.
    """
    sources = [Path(s).expanduser() for s in sources]
    found: dict[str, None] = {}
    for source in sources:
        if source.is_dir():
            names = (p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            found.update(dict.fromkeys(os.path.abspath(p) for p in sorted(names)))
        elif source.is_file():
            listed = _read_list(source) if source.suffix.lower() in LIST_SUFFIXES else [source]
            found.update(dict.fromkeys(os.path.abspath(p) for p in listed))
        else:
            raise FileNotFoundError(f"{source} does not exist")
    if not found:
        raise ValueError(f"no images found in {', '.join(map(str, sources)) or 'the inputs (none given)'} "
                         f"(looked for {', '.join(IMAGE_SUFFIXES)} files)")
    return list(found)


def _read_list(file: Path) -> list[Path]:
    """The paths a list file names (UTF-8, a byte-order mark accepted: `rga_keras.reading.read_text`)."""
    text = read_text(file)
    if file.suffix.lower() == ".csv":
        names = [row[0].strip() for row in csv.reader(io.StringIO(text, newline="")) if row and row[0].strip()]
        names = names[1:] if names and names[0].lower() == "path" else names
    else:
        names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [file.parent / name for name in names]
