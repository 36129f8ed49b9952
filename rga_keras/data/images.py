"""Image decoding, resizing and augmentation in NumPy and Pillow: the pixels of the Grain pipeline, equal to
those of the tf.data pipeline's TensorFlow ops up to float32 rounding (tests/test_data_grain.py).

- Decoding: JPEG through libjpeg-turbo (`simplejpeg`) with the integer fast DCT and fancy upsampling, as
  TensorFlow's ``decode_image`` does by default (the same pixels, bit for bit); in strict mode, so a file whose
  compressed data libjpeg finds damaged or truncated fails (as TensorFlow fails on a truncated one) instead of
  giving an image with garbage in it. PNG, BMP and GIF (first frame) through Pillow; grey, palette and RGBA
  become RGB, the alpha channel dropped, as TensorFlow does.
- Resizing: Pillow's bilinear filter in float32: antialiased when shrinking, plain when enlarging, which is
  what `rga_keras.data.pipeline.resize_image` computes with TensorFlow.
- Augmentation: one row of `rga_keras.data.sampling.augment_parameters` applied as the tf.data pipeline does.
"""
from __future__ import annotations

import functools
import io

import numpy as np
import scipy.sparse
import simplejpeg
from PIL import Image

from rga_keras.data.image_check import JPEG_SIGNATURE
from rga_keras.data.sampling import IMAGENET_MEAN_255, TRANSLATE_SCALE

_MEAN = np.array(IMAGENET_MEAN_255, np.float32)


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG/BMP/GIF bytes → (H, W, 3) uint8 RGB; raises (ValueError, OSError, …) when they do not decode."""
    if data.startswith(JPEG_SIGNATURE):
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def decodes(path: str) -> bool:
    """Whether the file at ``path`` can be read and decoded by `decode_image`."""
    try:
        with open(path, "rb") as handle:
            decode_image(handle.read())
        return True
    except Exception:  # noqa: BLE001 - Pillow's decoders raise many kinds (OSError, SyntaxError, ValueError, …)
        return False


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w, 3) uint8 → (height, width, 3) float32, Pillow's bilinear filter (antialiased when shrinking).

    Applied as two sparse products, columns then rows, on the channels-last pixels: the same weights as
    Pillow's float resize at 2.5 times its speed (which resizes one channel at a time, and copies each
    result out through its encoder).
    """
    h, w, channels = image.shape
    columns = image.transpose(1, 0, 2).reshape(w, h * channels).astype(np.float32)
    rows = (_bilinear_weights(w, width) @ columns).reshape(width, h, channels).transpose(1, 0, 2)
    return (_bilinear_weights(h, height) @ rows.reshape(h, width * channels)).reshape(height, width, channels)


@functools.lru_cache(maxsize=1024)
def _bilinear_weights(size: int, new_size: int) -> scipy.sparse.csr_matrix:
    """The (new_size, size) matrix of Pillow's bilinear resampling along one axis (its precompute_coeffs): a
    triangle filter at each output pixel's centre, widened by the scale when shrinking, normalised to sum 1."""
    scale = size / new_size
    support = max(scale, 1.0)
    centre = (np.arange(new_size) + 0.5) * scale
    first = np.maximum(np.trunc(centre - support + 0.5), 0).astype(np.int64)
    stop = np.minimum(np.trunc(centre + support + 0.5), size).astype(np.int64)
    taps = first[:, None] + np.arange(int(np.ceil(support)) * 2 + 1)
    weights = np.maximum(0.0, 1.0 - np.abs((taps + 0.5 - centre[:, None]) / support)) * (taps < stop[:, None])
    weights /= weights.sum(axis=1, keepdims=True)
    keep = weights > 0
    rows = np.broadcast_to(np.arange(new_size)[:, None], taps.shape)
    return scipy.sparse.csr_matrix((weights[keep].astype(np.float32), (rows[keep], taps[keep])),
                                   shape=(new_size, size))


def augment_image(image: np.ndarray, params: np.ndarray, out: np.ndarray) -> None:
    """Write ``image`` (decoded uint8) into ``out`` (float32 (H, W, 3)) augmented by one row of parameters
    (flip, translate, crop top, crop left, erased top, left, height, width); all zeros: plainly resized.

    The flip happens first, on the small decoded image: mirroring commutes with resizing, and with
    the random crop in distribution.
    """
    flip, translate, crop_top, crop_left, top, left, h, w = (int(v) for v in params)
    height, width = out.shape[:2]
    if flip:
        image = image[:, ::-1]
    if translate:
        big = resize_image(image, round(height * TRANSLATE_SCALE), round(width * TRANSLATE_SCALE))
        out[:] = big[crop_top:crop_top + height, crop_left:crop_left + width]
    else:
        out[:] = resize_image(image, height, width)
    out[top:top + h, left:left + w] = _MEAN
