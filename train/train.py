"""Train from a source checkout without installing the programs: ``python train/train.py --help``.

The same program as ``rga-train`` (`rga_keras.cli.train`); the recipes are in train/configs/.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's rga_keras, installed or not
from rga_keras.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
