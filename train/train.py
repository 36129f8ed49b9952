"""Train from a source checkout without installing the programs: ``python train/train.py --help``.

The same program as ``rga-train`` (`rga_keras.cli.train`); the recipes are in train/configs/.
"""
import sys

from rga_keras.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
