"""Sizes that cannot fit, said before the work, and running out of memory during it, said with the option to
lower: the same for training, evaluation and embedding.

`check_batch_fits` refuses a batch whose pixels alone exceed the machine's memory (``--batch-size 100000000``
was found by TensorFlow 93 s into an evaluation); `explain_oom` turns an out-of-memory error of TensorFlow or
NumPy inside its block into a MemoryError (status 2 in the programs) naming what to lower.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

def physical_memory() -> int | None:
    """This machine's memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_fits(batch: int, image_size: Sequence[int], option: str) -> None:
    """A MemoryError naming ``option`` when one batch of ``batch`` float32 RGB images of ``image_size`` (H, W)
    would not fit in this machine's memory even before the network's activations (several times more)."""
    need = int(batch) * int(image_size[0]) * int(image_size[1]) * 3 * 4
    have = physical_memory()
    if have is not None and need > have:
        raise MemoryError(f"{option}: one batch of {batch} images of {image_size[0]}x{image_size[1]} needs "
                          f"{_bytes(need)} for its pixels alone, more than this machine's {_bytes(have)} of memory; "
                          f"lower {option}")


def _bytes(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:,.0f} TiB"


def _out_of_memory(err: BaseException) -> bool:
    """TensorFlow's ResourceExhaustedError, XLA's RESOURCE_EXHAUSTED on JAX, NumPy's or Python's MemoryError."""
    return (isinstance(err, MemoryError) or type(err).__name__ == "ResourceExhaustedError"
            or "RESOURCE_EXHAUSTED" in str(err)[:200])


@contextlib.contextmanager
def explain_oom(what: str, hint: str) -> Iterator[None]:
    """Turn running out of memory inside the block (TensorFlow's ResourceExhaustedError, XLA's RESOURCE_EXHAUSTED
    on JAX, NumPy's or Python's MemoryError) into a one-line MemoryError: "out of memory ``what`` (the library's first line); ``hint``".
    Files are written atomically, so none is left half."""
    try:
        yield
    except Exception as err:
        if not _out_of_memory(err) or str(err).startswith("out of memory "):
            raise
        first = (getattr(err, "message", None) or str(err)).strip().splitlines()[:1]
        raise MemoryError(f"out of memory {what}" + (f" ({first[0][:200]})" if first else "") + f"; {hint}") \
            from None
