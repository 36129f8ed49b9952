"""What the command-line programs (rga-train, rga-eval, rga-export, rga-synth, rga-visualize, rga-embed,
rga-search) share: one place that turns every way a run can end into one line and an exit status.

Exit statuses (docs/RELIABILITY.md):

- 0: done.
- 1: the run worked but its result failed a check (an export that missed a parity threshold); the
  program says which.
- 2: bad input or a fault of the environment (a missing or existing file, a bad value, an unknown config
  key, a YAML syntax error, a full disk (also when a library such as h5py or TensorFlow reports it), no network
  for downloads): ``prog: error: …`` on one line.
- 130 / 143: interrupted by SIGINT (Ctrl-C) / SIGTERM (what schedulers and preemption send):
  ``prog: interrupted by SIGTERM; …`` saying what was kept.
- 70 (EX_SOFTWARE of sysexits.h): an unexpected error, i.e. a bug: one line naming it and the file its
  traceback was saved to.

Never a traceback on the terminal. Importing this module imports TensorFlow (through the package), so
programs set ``TF_CPP_MIN_LOG_LEVEL`` before importing it and import it inside ``main``, which keeps
``--help`` fast.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, Iterator

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_UNEXPECTED = 0, 1, 2, 70

# Python's exceptions for inputs that cannot work: missing or existing files, bad values, unknown config keys,
# a dataset too large for memory, an optional package that is not installed.
INPUT_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, MemoryError, ImportError)


class CommandError(Exception):
    """A problem with a command's inputs found by the program itself, reported like `INPUT_ERRORS`."""


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

    Writers call this just before they publish, so an interrupted run never publishes (a C++ converter may
    catch the KeyboardInterrupt that Python raised inside it and carry on)."""
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


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk is full: an OSError with ENOSPC/EDQUOT, or a library's error (h5py,
    TensorFlow) that carries only the C library's message."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(os.strerror(code) in str(err) for code in (errno.ENOSPC, errno.EDQUOT))


def error_message(err: BaseException) -> str:
    """``err`` as one line; a KeyError's message without the quotes ``str(KeyError)`` adds; a full disk said so."""
    if disk_full(err):
        filename = getattr(err, "filename", None)
        where = f" writing {filename}" if filename else ""
        return (f"no space left on the device{where} ({os.strerror(errno.ENOSPC)}): free some space or write "
                "elsewhere; nothing half-written was kept")
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(message.split()) or type(err).__name__


def save_traceback(prog: str, err: BaseException) -> str:
    """Write ``err``'s traceback to a new file in the temp folder; returns its path."""
    fd, path = tempfile.mkstemp(prefix=f"{prog}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".traceback.txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"{prog} {' '.join(sys.argv[1:])}\n")
        traceback.print_exception(type(err), err, err.__traceback__, file=f)
    return path


def run_command(prog: str, work: Callable[[], int], errors: tuple[type[BaseException], ...] = (),
                on_interrupt: Callable[[], str] | None = None,
                failures: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``work()`` and return its status, turning every other ending into one line on stderr and the status
    of the module doc: a failed check (``failures``) → 1; bad input (`INPUT_ERRORS`, `CommandError`, ``errors``)
    → 2; SIGINT → 130, SIGTERM → 143, with ``on_interrupt()`` saying what was kept; anything else → 70 with
    the saved traceback's path."""
    try:
        with handle_signals():
            return work()
    except failures as err:
        print(f"{prog}: {error_message(err)}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except (CommandError, *INPUT_ERRORS, *errors) as err:
        print(f"{prog}: error: {error_message(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, Interrupted) as err:
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        kept = on_interrupt() if on_interrupt else ""
        print(f"\n{prog}: interrupted by {signal.Signals(signum).name}" + (f"; {kept}" if kept else ""),
              file=sys.stderr)
        return 128 + signum
    except Exception as err:  # a full disk seen by a library; else a bug: one line, the traceback kept
        if disk_full(err):
            print(f"{prog}: error: {error_message(err)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        try:
            where = f"traceback saved to {save_traceback(prog, err)}"
        except OSError as save_err:
            where = f"its traceback could not be saved ({error_message(save_err)})"
        message = error_message(err)
        message = message if len(message) <= 300 else message[:297] + "..."
        print(f"{prog}: unexpected error (a bug, please report it): {type(err).__name__}: {message} — {where}",
              file=sys.stderr)
        return EXIT_UNEXPECTED
