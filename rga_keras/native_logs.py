"""Keep TensorFlow's C++ start-up lines off the terminal when ``TF_CPP_MIN_LOG_LEVEL`` asks for that.

TensorFlow ≥ 2.19 writes them (the oneDNN notice, CUDA probing, "failed call to cuInit" on a machine without a
GPU) through absl before absl's logging is set up, where ``TF_CPP_MIN_LOG_LEVEL`` has no effect yet
(tensorflow/tensorflow#100442). With that variable at 1 or more — the programs set 2 unless the user chose a
value — importing Keras and initialising TensorFlow's devices run with file descriptor 2 on /dev/null.
Python exceptions are unaffected: they propagate and are reported after stderr is restored.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator


def _wants_quiet() -> bool:
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0").strip()
    return level.isdigit() and int(level) >= 1


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Within the block, native code's writes to stderr are dropped (when ``TF_CPP_MIN_LOG_LEVEL`` ≥ 1)."""
    if not _wants_quiet():
        yield
        return
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
