"""Signals that end a run as exceptions, a check that writers make before they publish, and cleanup that a
second signal cannot cut short.

While `handle_signals` is active (the programs run their start-up and their work inside it,
`rga_keras.cli.common`), SIGINT raises KeyboardInterrupt, and SIGTERM (schedulers, ``docker stop``), SIGHUP (a
closed terminal or a dropped ssh session) and SIGQUIT (Ctrl-\\) raise `Interrupted`; so every ``finally`` runs
(staging folders and partial files removed) and the program says what happened in one line. A signal that is
ignored when the program starts (``nohup`` ignores SIGHUP) stays ignored. Every signal is recorded, so
`raise_if_interrupted` still stops a writer when native code caught the exception on its way up (a C++
converter may) and carried on.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

# The signals a program answers, with what sends them (docs/RELIABILITY.md has the table).
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Interrupted(BaseException):
    """SIGTERM, SIGHUP or SIGQUIT received (SIGINT raises KeyboardInterrupt). A BaseException, as
    KeyboardInterrupt is, so no ``except Exception`` on the way up can swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []  # signals received by the running command, in order
_deferring = [0]  # > 0 inside `deferred`: signals are recorded, raised when it ends


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)


def _on_signal(signum: int, frame) -> None:
    _received.append(signum)
    if not _deferring[0]:
        raise _exception(signum)


def raise_if_interrupted() -> None:
    """Raise now if the running command got a signal, even if something below swallowed the exception.

    Writers call this just before they publish, so an interrupted run never publishes."""
    if _received:
        raise _exception(_received[-1])


def signal_of(err: BaseException) -> int:
    """The signal number an interruption exception stands for (KeyboardInterrupt: SIGINT)."""
    return err.signum if isinstance(err, Interrupted) else signal.SIGINT


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """While inside: the `SIGNALS` raise KeyboardInterrupt / `Interrupted` and are recorded for
    `raise_if_interrupted`; the previous handlers come back after. A signal ignored on entry (``nohup``) stays
    ignored. Only the main thread can set handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, _on_signal)
    _received.clear()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _received.clear()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Cleanup that must finish (removing a staging folder or a temporary): a signal arriving inside is
    recorded, and raised once the body is done, unless the body is ending with an exception of its own."""
    before = len(_received)
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1
    if len(_received) > before:
        raise_if_interrupted()
