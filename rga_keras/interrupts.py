"""SIGINT and SIGTERM as exceptions, and a check that writers make before they publish.

While `handle_signals` is active (the programs run their work inside it, `rga_keras.cli.common.run_command`),
SIGINT raises KeyboardInterrupt and SIGTERM `Interrupted`; both are recorded, so `raise_if_interrupted` still
stops a writer when native code caught the exception on its way up (a C++ converter may) and carried on.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Interrupted(BaseException):
    """SIGTERM received (SIGINT raises KeyboardInterrupt). A BaseException, as KeyboardInterrupt is, so no
    ``except Exception`` on the way up can swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []  # signals received by the running command, in order


def _on_signal(signum: int, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)


def raise_if_interrupted() -> None:
    """Raise now if the running command got SIGINT/SIGTERM, even if something below swallowed the exception.

    Writers call this just before they publish, so an interrupted run never publishes."""
    if _received:
        raise KeyboardInterrupt if _received[-1] == signal.SIGINT else Interrupted(_received[-1])


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """While inside: SIGINT raises KeyboardInterrupt and SIGTERM `Interrupted`, both recorded for
    `raise_if_interrupted`; the previous handlers come back after. Only the main thread can set handlers;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    _received.clear()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received.clear()
