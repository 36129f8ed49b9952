"""What every program does before TensorFlow is imported (docs/RELIABILITY.md): parse its arguments, with usage
errors on one line like every other bad input, and then import the library, a Ctrl-C during which ends in one
line too. Kept free of TensorFlow, so ``--help`` and usage errors stay instant."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator

# TensorFlow's and LiteRT's native start-up lines stay off the programs' output unless the user chose a level
# (rga_keras/native_logs.py): set here, as every program imports this module before TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class OneLineParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors (a bad or missing argument, ``parser.error(...)``) print one line,
    ``prog: error: message (see prog --help)``, and exit with status 2, instead of the usage block and the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


@contextlib.contextmanager
def starting(prog: str) -> Iterator[None]:
    """Around a program's import of TensorFlow (seconds, before `rga_keras.cli.run_command` handles signals): a Ctrl-C
    there ends the program with one line and status 130 (128 + SIGINT), not an import traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted by SIGINT while starting; nothing was done", file=sys.stderr)
        sys.exit(130)
