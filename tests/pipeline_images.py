"""Image files for the input-pipeline tests (tf.data and Grain): tiny PNGs whose colour encodes the sample
index, so every output pixel can be traced back to its file; noise pictures 1.125 × the output size, so a
translate crop is an exact crop; and files broken the ways real ones are."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from rga_keras.data import Sample

SIZE = (16, 8)  # the pipelines' output size in these tests
COUNTS = [1, 2, 3, 4, 5, 6, 7, 3, 2, 5, 4, 6]  # images of the 12 identities of `traced_samples`


def colour(index: int) -> np.ndarray:
    return np.array([index % 251, (index // 251) * 40 + 3, 200], np.uint8)


def index_of(image: np.ndarray) -> int:
    """Sample index encoded in a constant image (after resizing, values stay within rounding)."""
    r, g = np.round(image[0, 0, :2]).astype(int)
    return int(r + 251 * ((g - 3) // 40))


def traced_samples(root: Path) -> list[Sample]:
    """12 identities (ids 3, 6, ..., 36) with 1..7 images each, constant-colour 10×6 PNGs."""
    items = []
    for person, count in enumerate(COUNTS):
        for shot in range(count):
            path = root / f"{len(items):03d}.png"
            Image.fromarray(np.tile(colour(len(items)), (10, 6, 1))).save(path)
            items.append(Sample(str(path), 3 * (person + 1), shot % 3))
    return items


def noise_samples(root: Path, size: tuple[int, int] = (18, 9), count: int = 16) -> tuple[list, list]:
    """``count`` random-noise PNGs of ``size``, two per identity, and their pixels."""
    rng = np.random.default_rng(0)
    items, pictures = [], []
    for i in range(count):
        picture = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(picture).save(root / f"{i}.png")
        items.append(Sample(str(root / f"{i}.png"), i // 2, 1))
        pictures.append(picture)
    return items, pictures


def with_unreadable(samples: list[Sample], root: Path) -> tuple[list[Sample], list[str]]:
    """The samples with three files made unreadable: truncated, garbage in the middle, not an image; and
    the sorted paths of those three."""
    items = list(samples)
    data = open(samples[5].path, "rb").read()
    bad = {
        1: data[: len(data) // 2],
        9: data[:40] + bytes(range(256))[: len(data) - 52] + data[-12:],
        len(items) - 1: b"hello",
    }
    for index, content in bad.items():
        path = root / f"bad{index}.png"
        path.write_bytes(content)
        items[index] = items[index]._replace(path=str(path))
    return items, sorted(items[i].path for i in bad)
