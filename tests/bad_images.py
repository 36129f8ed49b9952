"""Image files broken the ways real ones are, for the bad-input tests."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (64, 32)) -> bytes:
    """A real JPEG (Pillow, quality 90) of blocky noise."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3))
    pixels = np.clip(np.kron(blocks, np.ones((8, 8, 1))) + rng.normal(0, 20, (*size, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def corrupt_jpeg_bytes() -> bytes:
    """A JPEG with 16 bytes in the middle of its data inverted: it still decodes (checked here, with Pillow,
    which like TensorFlow returns an image), with libjpeg warning "Corrupt JPEG data"."""
    data = bytearray(jpeg_bytes(0))
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    Image.open(io.BytesIO(bytes(data))).load()  # still decodable: the corruption is silent there
    return bytes(data)


def write_images(folder: Path, names: list[str], corrupt: tuple[str, ...] = ()) -> None:
    """Real JPEG files ``names`` in ``folder``; the ``corrupt`` ones made by `corrupt_jpeg_bytes`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(corrupt_jpeg_bytes() if name in corrupt else jpeg_bytes(i))
