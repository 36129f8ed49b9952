"""Export from a source checkout without installing the programs: ``python export/export.py --help``.

The same program as ``rga-export`` (`rga_keras.cli.export`).
"""
import sys

from rga_keras.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
