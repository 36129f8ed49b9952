"""The record of image files the input pipelines had to skip (docs/DATA.md, "Unreadable and corrupt images").

Both pipelines (tf.data and Grain) skip an element holding a file that cannot be read or decoded, rather than
stop an epoch, and record the file here: by default in the module's ``corrupt_images``.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

_log = logging.getLogger("rga_keras.data.pipeline")  # the logger docs/DATA.md names, whichever pipeline skips


class CorruptImages:
    """Thread-safe record of the image files the pipelines had to skip.

    count: how many times a bad image was met (a file met in several epochs counts each time).
    paths: the distinct bad files. unexplained: skipped elements in which no bad file was found.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.unexplained = 0
        self._paths: set[str] = set()

    @property
    def paths(self) -> list[str]:
        return sorted(self._paths)

    def summary(self) -> str:
        text = f"{self.count} corrupt image reads skipped ({len(self._paths)} distinct files)"
        return text + (f", {self.unexplained} elements dropped for other errors" if self.unexplained else "")

    def record_dropped(self, paths: Sequence[str | bytes], decodes: Callable[[str], bool]) -> None:
        """Find which of the files of a skipped element are unreadable (``decodes(path)`` is False: the
        pipeline's own decoder), and record them; each is logged the first time it is met."""
        bad = [p for p in (p.decode() if isinstance(p, bytes) else p for p in paths) if not decodes(p)]
        with self._lock:
            self.count += len(bad)
            self.unexplained += not bad
            new = [p for p in bad if p not in self._paths]
            self._paths.update(new)
        for path in new:
            _log.warning("skipping unreadable image %s", path)


corrupt_images = CorruptImages()


def check_some_decode(paths: Sequence[str], decodes: Callable[[str], bool], tries: int = 8) -> None:
    """Fail early, with a clear message, when none of a few spread-out files decodes (wrong folder or
    format): the pipelines skip unreadable files, and would otherwise skip forever or yield nothing."""
    picks = sorted({round(i * (len(paths) - 1) / max(tries - 1, 1)) for i in range(min(tries, len(paths)))})
    if not any(decodes(paths[i]) for i in picks):
        raise ValueError(f"none of {len(picks)} images tried could be read as JPEG/PNG/BMP/GIF "
                         f"(e.g. {paths[picks[0]]})")


def read_or_empty(path: str) -> bytes:
    """The file's bytes, or b"" when it cannot be read: it then fails to decode and is skipped and recorded like
    any bad file (the pipelines' ``cache`` reads every file up front this way)."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""
