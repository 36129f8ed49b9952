"""What is known about a gallery image besides its embedding: path, camera, time and identity.

A features file records only paths, so for its images camera and identity come from the file name where it
follows the re-id datasets' convention (Market-1501, DukeMTMC: ``0002_c1s1_000451_03.jpg`` = identity 0002,
camera 1; MSMT17: ``0000_000_01_0303morning_0015_0.jpg`` = identity 0000, camera 01), and the time is the
image file's modification time: when the camera system wrote the crop. A Milvus gallery stores all three
with each embedding (`rga_keras.retrieval.milvus`), so they survive the image files.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

_MARKET = re.compile(r"^(-?\d+)_c(\d+)")  # as rga_keras.data.readers reads Market-1501 / DukeMTMC names
_MSMT = re.compile(r"^(\d+)_(\d+)_(\d+)_")
UNKNOWN_TIME = -1


@dataclass(frozen=True)
class Crop:
    """A gallery image: ``path``; ``camera`` and ``identity`` ("" where unknown); ``time`` in seconds since
    the epoch (UTC), `UNKNOWN_TIME` where unknown."""

    path: str
    camera: str = ""
    identity: str = ""
    time: int = UNKNOWN_TIME


def name_labels(path: str) -> tuple[str, str]:
    """(identity, camera) from a re-id dataset file name, ("", "") for any other name."""
    name = Path(path).name
    match = _MARKET.match(name)
    if match:
        return match[1], match[2]
    match = _MSMT.match(name)
    return (match[1], match[3]) if match else ("", "")


def crops_of(paths: Sequence[str], *, stat: bool = False) -> list[Crop]:
    """The `Crop` of each path from its name; with ``stat`` also its time (the file's modification time, in
    whole seconds; `UNKNOWN_TIME` for a file that is gone)."""
    crops = []
    for path in paths:
        identity, camera = name_labels(path)
        crops.append(Crop(path, camera, identity, _mtime(path) if stat else UNKNOWN_TIME))
    return crops


def _mtime(path: str) -> int:
    try:
        return int(os.stat(path).st_mtime)
    except OSError:
        return UNKNOWN_TIME
