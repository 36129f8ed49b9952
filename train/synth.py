"""rga-synth: write a synthetic person re-id dataset in the Market-1501 layout (`rga_keras.data.synthetic`).

An entry point of its own, free of TensorFlow until ``main`` runs, as every program's: a Ctrl-C while the library
imports is one line (train/arguments.py), not an import traceback.
"""
from __future__ import annotations

from train.arguments import starting


def main(argv: list[str] | None = None) -> int:
    with starting("rga-synth"):
        from rga_keras.data.synthetic import main as synth_main
    return synth_main(argv)
