"""Find JPEG files that decode only with libjpeg's "Corrupt JPEG data" warnings (docs/DATA.md).

TensorFlow's decoder prints such a warning, unattributed, and returns an image with garbage in it: such a
file would be trained on or embedded without a word. `simplejpeg` (libjpeg-turbo) in strict mode turns the
warning into an error. The check decodes at 1/8 scale in grey: the entropy-coded data, where corruption
shows, is still read in full, at about a third of a full decode's cost (docs/DATA.md gives the measured cost).
Files that are not JPEG are not checked here; the pipelines skip those that fail to decode.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import simplejpeg

JPEG_SIGNATURE = b"\xff\xd8\xff"


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
        return f"cannot be read ({error.strerror or error})"


def find_corrupt(paths: Sequence[str], workers: int | None = None) -> dict[str, str]:
    """``{path: problem}`` for the files of ``paths`` that are corrupt JPEGs or unreadable, checked in threads
    (simplejpeg releases the GIL while decoding)."""
    from rga_keras.data.pipeline import available_cores

    with ThreadPoolExecutor(workers or available_cores()) as pool:
        problems = pool.map(file_problem, paths, chunksize=64)
        return {path: why for path, why in zip(paths, problems) if why}
