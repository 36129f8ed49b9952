"""rga-embed: embed image files with a re-id model of any format into one features file.

MODEL is a .keras file, a SavedModel version folder (rga-export's serving/NAME/VERSION), a .tflite or an .onnx
file; IMAGES are image files, folders (searched recursively) or list files (.txt: a path per line; .csv: the
first column). The features file (HDF5, docs/RETRIEVAL.md) holds the L2-normalised embeddings, the image
paths and what made them (the model file and its SHA-256, feature, input size, flip). Unreadable images are
skipped and listed. The work is `rga_keras.retrieval`; bad input exits with status 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rga_keras.cli.common import OneLineParser, report_skipped, run_command, starting
from rga_keras.files import check_file


EPILOG = """examples:
  rga-embed runs/demo/best.keras crops/ --out gallery.h5
  rga-embed exported/tflite/rga_v1_float32.tflite cam1/ cam2/ list.txt --out gallery.h5 --flip
  rga-embed exported/serving/rga/1 new_crops/ --out gallery.h5 --append    # only the new images are embedded"""


def build_parser() -> argparse.ArgumentParser:
    """The parser (call inside `starting`: the choices come from the library)."""
    from rga_keras.models import FEATURES

    parser = OneLineParser(prog="rga-embed", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="model: .keras, SavedModel version folder, .tflite or .onnx")
    parser.add_argument("images", nargs="+", help="image files, folders (recursive) or .txt/.csv lists of paths")
    parser.add_argument("--out", type=Path, required=True, help="features file to write (HDF5, e.g. gallery.h5)")
    parser.add_argument("--append", action="store_true",
                        help="add the images not yet in --out to it (same model and settings), keeping the others")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--feature", choices=FEATURES,
                        help="a .keras model's embedding (default after_bn); exported models have theirs built in")
    parser.add_argument("--flip", action="store_true", help="average each image's embedding with its mirror's")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    with starting("rga-embed"):
        from rga_keras import retrieval
        parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if args.append and args.overwrite:
        parser.error("--append and --overwrite exclude each other")

    def work() -> int:
        check_file(args.out, "--out")
        if args.out.exists() and not (args.append or args.overwrite):
            raise FileExistsError(f"{args.out} exists; --append adds images to it, --overwrite replaces it")
        paths = retrieval.list_images(args.images)
        embedder = retrieval.load_embedder(args.model, args.feature)
        source = retrieval.feature_source(embedder, args.flip)
        old = retrieval.read_features(args.out) if args.append and args.out.exists() else None
        if old is not None:
            retrieval.check_same_source(old.source, source, f"--model {args.model}", against=str(args.out))
            known = set(old.paths)
            paths = [path for path in paths if path not in known]
            if not paths:
                print(f"nothing to add: all images are already in {args.out} ({old.describe()})")
                return 0
        print(f"model    {args.model} ({embedder.format}, input {embedder.input_size[0]}x{embedder.input_size[1]}, "
              f"feature {embedder.feature or 'unknown'}, flip {'on' if args.flip else 'off'})")
        print(f"images   {len(paths)}{f' new (not in {args.out})' if old is not None else ''}", flush=True)
        features, embedded, skipped = retrieval.embed_images(embedder, paths, batch_size=args.batch_size,
                                                             flip=args.flip, verbose=0 if args.quiet else 1)
        report_skipped(skipped)
        data = (retrieval.append_features(old, features, embedded) if old is not None
                else retrieval.FeatureSet(features, embedded, source))
        retrieval.write_features(args.out, data)
        print(f"embedded {len(embedded)} images ({len(skipped)} skipped); wrote {args.out}: {data.describe()}")
        return 0

    return run_command("rga-embed", work)


if __name__ == "__main__":
    sys.exit(main())
