"""Signals that end a run as exceptions, a check that writers make before they publish, and cleanup that a
second signal cannot cut short.

While `handle_signals` is active (the programs run their start-up and their work inside it,
`rga_keras.cli.common`), SIGINT raises KeyboardInterrupt, and SIGTERM (schedulers, ``docker stop``), SIGHUP (a
closed terminal or a dropped ssh session) and SIGQUIT (Ctrl-\\) raise `Interrupted`; so every ``finally`` runs
(staging folders and partial files removed) and the program says what happened in one line. A signal that is
ignored when the program starts (``nohup`` ignores SIGHUP) stays ignored. Every signal is recorded, so
`raise_if_interrupted` still stops a writer when native code caught the exception on its way up (a C++
converter may) and carried on. A signal whose exception Python cannot raise where it lands (inside a garbage
collector callback or a ``__del__``, where it printed "Exception ignored in …" and a traceback) is delivered
again a moment later, in the program's own code.
"""
from __future__ import annotations

import _thread
import contextlib
import signal
import sys
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
_active = [0]  # > 0 inside `handle_signals`
REDELIVER_S = 0.02  # how long after an unraisable interrupt it is delivered again


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)


def _on_signal(signum: int, frame) -> None:
    _received.append(signum)
    if not _deferring[0]:
        raise _exception(signum)


def _redeliver(signum: int) -> None:
    """Deliver ``signum`` to the main thread again (the Python-level handler runs; nothing if the handlers were
    restored meanwhile: `_thread.interrupt_main` only calls a Python handler)."""
    if _active[0]:
        _thread.interrupt_main(signum)


def _unraisable_hook(previous):
    def hook(unraisable) -> None:
        err = unraisable.exc_value
        if isinstance(err, (Interrupted, KeyboardInterrupt)) and _received and _active[0]:
            timer = threading.Timer(REDELIVER_S, _redeliver, (signal_of(err),))
            timer.daemon = True
            timer.start()  # a gc callback or __del__ swallowed it: raise it again, once back in the program
            return
        previous(unraisable)

    return hook


def raise_if_interrupted() -> None:
    """Raise now if the running command got a signal, even if something below swallowed the exception.

    Writers call this just before they publish, so an interrupted run never publishes."""
    if _received:
        raise _exception(_received[-1])


def interruption_in(err: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or `Interrupted` that ``err`` is, or that caused it: a signal that lands while a C
    extension initialises (TensorFlow's, inside an import) comes back as ``ImportError: initialization failed``
    raised from the interruption."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (KeyboardInterrupt, Interrupted)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


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
    previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable_hook(sys.unraisablehook)
    _active[0] += 1
    try:
        yield
    finally:
        _active[0] -= 1
        sys.unraisablehook = previous_hook
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
