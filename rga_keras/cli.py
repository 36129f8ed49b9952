"""What the command-line programs (rga-train, rga-eval, rga-visualize, rga-export) share.

One convention for bad input: a one-line ``prog: error: …`` on stderr and exit status 2 (argparse's own
status for usage errors), never a traceback. A run that worked but whose result failed a check (an export
that missed a parity threshold) is not bad input; programs report it with status 1 themselves.
Importing this module imports TensorFlow (through the package), so programs set ``TF_CPP_MIN_LOG_LEVEL``
before importing it and import it inside ``main``, which keeps ``--help`` fast.
"""
from __future__ import annotations

import sys
from typing import Callable

# Python's exceptions for inputs that cannot work: missing or existing files, bad values, unknown config keys,
# a dataset too large for memory, an optional package that is not installed.
INPUT_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, MemoryError, ImportError)


class CommandError(Exception):
    """A problem with a command's inputs found by the program itself, reported like `INPUT_ERRORS`."""


def error_message(err: BaseException) -> str:
    """``err`` as one line; a KeyError's message without the quotes ``str(KeyError)`` adds."""
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(message.split()) or type(err).__name__


def run_command(prog: str, work: Callable[[], int], errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``work()`` and return its status; bad input (`INPUT_ERRORS`, `CommandError`, ``errors``) → one line, 2."""
    try:
        return work()
    except (CommandError, *INPUT_ERRORS, *errors) as err:
        print(f"{prog}: error: {error_message(err)}", file=sys.stderr)
        return 2
