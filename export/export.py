"""Export from a source checkout without installing the programs: ``python export/export.py --help``.

The same program as ``rga-export`` (`rga_keras.cli.export`).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's rga_keras, installed or not
from rga_keras.cli.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
