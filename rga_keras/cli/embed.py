"""rga-embed: embed image files with a re-id model of any format into a gallery: a features file or Milvus.

MODEL is a .keras file, a SavedModel version folder (rga-export's serving/NAME/VERSION), a .tflite or an .onnx
file; IMAGES are image files, folders (searched recursively) or list files (.txt: a path per line; .csv: the
first column). The features file (--out, HDF5, docs/RETRIEVAL.md) holds the L2-normalised embeddings, the
image paths and what made them (the model file and its SHA-256, feature, input size, flip); --index builds
its faiss index beside it, and appending to a file with an index adds to the index (no rebuild). --milvus
appends to a Milvus gallery instead (made on first use), with each image's camera, identity and time.
Unreadable images are skipped and listed. The work is `rga_keras.retrieval`; bad input exits with status 2
and a one-line message.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rga_keras.cli.common import CommandError, OneLineParser, report_skipped, run_command, starting
from rga_keras.files import check_file
from rga_keras.locks import writer_lock
from rga_keras.memory import check_batch_fits, explain_oom


EPILOG = """examples:
  rga-embed runs/demo/best.keras crops/ --out gallery.h5
  rga-embed exported/tflite/rga_v1_float32.tflite cam1/ cam2/ list.txt --out gallery.h5 --flip
  rga-embed exported/serving/rga/1 new_crops/ --out gallery.h5 --append    # only the new images are embedded
  rga-embed runs/demo/best.keras crops/ --out gallery.h5 --index           # and its faiss index
  rga-embed runs/demo/best.keras new_crops/ --milvus http://milvus:19530 --collection city"""


def build_parser() -> argparse.ArgumentParser:
    """The parser (call inside `starting`: the choices come from the library)."""
    from rga_keras.models import FEATURES
    from rga_keras.retrieval.milvus import DEFAULT_COLLECTION

    parser = OneLineParser(prog="rga-embed", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="model: .keras, SavedModel version folder, .tflite or .onnx")
    parser.add_argument("images", nargs="+", help="image files, folders (recursive) or .txt/.csv lists of paths")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="features file to write (HDF5, e.g. gallery.h5)")
    where.add_argument("--milvus", metavar="URI", help="add to a Milvus gallery instead: a Milvus Lite folder "
                       "(gallery.db) or a server, http://HOST:19530 (token in $MILVUS_TOKEN); images already there "
                       "are skipped")
    parser.add_argument("--collection", default=DEFAULT_COLLECTION,
                        help=f"the Milvus collection (default {DEFAULT_COLLECTION})")
    parser.add_argument("--append", action="store_true",
                        help="add the images not yet in --out to it (same model and settings), keeping the others")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--index", action="store_true",
                        help="build (or rebuild) --out's faiss index; an existing one is updated by --append anyway")
    parser.add_argument("--feature", choices=FEATURES,
                        help="a .keras model's embedding (default after_bn); exported models have theirs built in")
    parser.add_argument("--flip", action="store_true", help="average each image's embedding with its mirror's")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def open_gallery(args: argparse.Namespace):
    """The gallery to append to (None: a new features file, or a Milvus gallery made after embedding), checked
    before the model is loaded: an existing --out needs --append or --overwrite, and its index must index it
    (one behind by an append is caught up first). The caller checks that the model is the gallery's."""
    from rga_keras import retrieval

    if args.milvus:
        try:
            gallery = retrieval.MilvusGallery(args.milvus, args.collection)
        except FileNotFoundError:
            return None
    else:
        check_file(args.out, "--out")
        if args.out.exists() and not (args.append or args.overwrite):
            raise FileExistsError(f"{args.out} exists; --append adds images to it, --overwrite replaces it")
        status = retrieval.index_status(args.out) if args.out.exists() else "none"
        if status != "none" and args.overwrite and not args.index:
            raise CommandError(f"{args.out} has an index ({retrieval.index_path(args.out)}) that would no longer "
                               "index it: add --index to build it again for the new file, or delete it")
        if not (args.append and args.out.exists()):
            return None
        if status == "stale" and not args.index:
            raise CommandError(f"index {retrieval.index_path(args.out)} is stale (built for another version of "
                               f"{args.out}): add --index to build it again, or delete it")
        if status == "behind":
            added = retrieval.update_index(args.out, verbose=0)
            print(f"index    {retrieval.index_path(args.out)}: caught up with {added} rows appended before")
        gallery = (retrieval.IndexedGallery(args.out) if status in ("current", "behind")
                   else retrieval.FileGallery(args.out))
    return gallery


def finish_index(args: argparse.Namespace) -> int:
    """With --index, build --out's index unless it is current (appending kept it so)."""
    from rga_keras import retrieval

    if args.index and retrieval.index_status(args.out) != "current":
        path = retrieval.build_index(args.out, verbose=0 if args.quiet else 1)
        with retrieval.IndexedGallery(args.out) as gallery:
            print(f"index    wrote {path}: {gallery.method}")
    return 0


def main(argv: list[str] | None = None) -> int:
    with starting("rga-embed"):
        from rga_keras import retrieval  # noqa: F401 (TensorFlow's seconds of import, inside `starting`)
        parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if args.append and args.overwrite:
        parser.error("--append and --overwrite exclude each other")
    if args.milvus and (args.overwrite or args.index):
        parser.error("--overwrite and --index apply to --out; a Milvus gallery is appended to and indexed by Milvus")

    def work() -> int:
        if args.milvus:  # Milvus orders its own writers
            return _embed(args)
        check_file(args.out, "--out")
        if args.out.exists() and not (args.append or args.overwrite):
            raise FileExistsError(f"{args.out} exists; --append adds images to it, --overwrite replaces it")
        with writer_lock(args.out, inside=False):  # from reading the old file (--append) to writing the new one
            return _embed(args)  # and its index, which the lock of the features file covers

    def kept() -> str:
        if args.milvus:
            return (f"the Milvus gallery {args.collection} keeps the rows inserted before (1,000 at a time); the same "
                    "command again embeds only the rest")
        return f"nothing was written to {args.out}"

    return run_command("rga-embed", work, on_interrupt=kept)


def _embed(args: argparse.Namespace) -> int:
    """The work of rga-embed, with the features file locked."""
    from rga_keras import retrieval  # imported by main already, inside `starting`

    gallery = open_gallery(args)  # None: a new features file or Milvus gallery
    try:
        paths = retrieval.list_images(args.images)
        embedder = retrieval.load_embedder(args.model, args.feature)
        source = retrieval.feature_source(embedder, args.flip)
        if gallery is not None:
            retrieval.check_same_source(gallery.source, source, f"--model {args.model}", against=gallery.name)
            known = gallery.known_paths(paths)
            paths = [path for path in paths if path not in known]
            if not paths:
                print(f"nothing to add: all images are already in {gallery.describe()}")
                return finish_index(args)
        batch = min(args.batch_size, len(paths))  # a larger batch only costs memory
        check_batch_fits(batch, embedder.input_size, "--batch-size")
        print(f"model    {args.model} ({embedder.format}, input {embedder.input_size[0]}x{embedder.input_size[1]}, "
              f"feature {embedder.feature or 'unknown'}, flip {'on' if args.flip else 'off'})")
        print(f"images   {len(paths)}{f' new (not in {gallery.name})' if gallery is not None else ''}", flush=True)
        with explain_oom("while embedding", f"lower --batch-size (was {batch})"):
            features, embedded, skipped = retrieval.embed_images(embedder, paths, batch_size=batch, flip=args.flip,
                                                                 verbose=0 if args.quiet else 1)
        report_skipped(skipped)
        data = retrieval.FeatureSet(features, embedded, source)
        if gallery is None and args.milvus:
            gallery = retrieval.MilvusGallery(args.milvus, args.collection, create_for=(source, features.shape[1]))
        if gallery is None:
            retrieval.write_features(args.out, data)
            done = f"wrote {args.out}: {data.describe()}"
        else:
            gallery.append(data)
            done = f"added them to {gallery.describe()}"
            if isinstance(gallery, retrieval.IndexedGallery):
                done += f", and to its index {retrieval.index_path(args.out)} (no rebuild)"
        print(f"embedded {len(embedded)} images ({len(skipped)} skipped); {done}")
    finally:
        if gallery is not None:
            gallery.close()
    return finish_index(args)


if __name__ == "__main__":
    sys.exit(main())
