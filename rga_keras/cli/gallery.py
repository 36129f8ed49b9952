"""rga-gallery: look after a gallery: a features file's faiss index, a Milvus collection.

  index FILE       build the faiss index beside a features file (FILE.faiss), or add the rows appended since it
                   was saved; --rebuild builds it again (a stale one: the file changed otherwise)
  info             what a gallery holds (--gallery FILE or --milvus URI), and for a file the state of its index
  copy FILE        put a features file's embeddings into a Milvus gallery (--milvus URI), with each image's
                   camera, identity (from re-id file names) and time (the file's modification time); images
                   already there are skipped
  delete           delete a camera's crops (--camera), a day's (--day, UTC) or a camera's on a day from a Milvus
                   gallery

The work is `rga_keras.retrieval` (index, milvus); bad input exits with status 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import sys
import warnings
from pathlib import Path

from rga_keras.cli.common import (CommandError, OneLineParser, add_gallery_arguments, open_named_gallery,
                                  run_command, starting)
from rga_keras.evaluation.feature_check import DegenerateFeaturesWarning, check_features
from rga_keras.locks import writer_lock

EPILOG = """examples:
  rga-gallery index gallery.h5                          # build, or add what rga-embed --append added
  rga-gallery index gallery.h5 --rebuild --nprobe 64
  rga-gallery info --gallery gallery.h5
  rga-gallery copy gallery.h5 --milvus http://milvus:19530 --collection city
  rga-gallery delete --milvus gallery.db --camera 3 --day 2026-12-04"""


def day(text: str) -> datetime.date:
    """A --day value: YYYY-MM-DD."""
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a day as YYYY-MM-DD, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The parser (call inside `starting`: the choices come from the library)."""
    from rga_keras.retrieval.milvus import DEFAULT_COLLECTION

    parser = OneLineParser(prog="rga-gallery", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    index = commands.add_parser("index", help="build or update a features file's faiss index")
    index.add_argument("features", type=Path, help="features file written by rga-embed")
    index.add_argument("--rebuild", action="store_true", help="build it again even if it exists")
    index.add_argument("--factory", help="faiss index factory string (default: PCA256,IVF<~sqrt(rows)>,PQ128x4fs)")
    index.add_argument("--nprobe", type=int, help="lists a query visits (default: a quarter of them)")
    index.add_argument("--shortlist", type=int, default=200, help="candidates re-ranked exactly (default 200)")
    index.add_argument("--train-rows", type=int, default=40_000, help="rows the index is trained on (default 40,000)")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    info = commands.add_parser("info", help="what a gallery holds")
    add_gallery_arguments(info, search=False)
    copy = commands.add_parser("copy", help="put a features file into a Milvus gallery")
    copy.add_argument("features", type=Path, help="features file written by rga-embed")
    copy.add_argument("--milvus", metavar="URI", required=True, help="Milvus Lite folder (gallery.db) or server URI")
    copy.add_argument("--collection", default=DEFAULT_COLLECTION, help=f"collection (default {DEFAULT_COLLECTION})")
    delete = commands.add_parser("delete", help="delete a camera's or a day's crops from a Milvus gallery")
    delete.add_argument("--milvus", metavar="URI", required=True, help="Milvus Lite folder or server URI")
    delete.add_argument("--collection", default=DEFAULT_COLLECTION, help=f"collection (default {DEFAULT_COLLECTION})")
    delete.add_argument("--camera", help="the camera whose crops go")
    delete.add_argument("--day", type=day, help="the day (YYYY-MM-DD, UTC) whose crops go")
    return parser


def run_index(args: argparse.Namespace) -> int:
    if not args.features.is_file():
        raise FileNotFoundError(f"features file {args.features} does not exist")
    with writer_lock(args.features, inside=False):  # the lock rga-embed takes: the file and its index are one output
        return _index(args)


def _index(args: argparse.Namespace) -> int:
    from rga_keras import retrieval

    status = retrieval.index_status(args.features)
    path = retrieval.index_path(args.features)
    if status == "behind" and not args.rebuild:
        added = retrieval.update_index(args.features, verbose=0 if args.quiet else 1)
        print(f"index    {path}: added the {added} rows appended to {args.features} (no rebuild)")
    elif status == "current" and not args.rebuild:
        print(f"index    {path} is current; nothing to do (--rebuild builds it again)")
    elif status == "stale" and not args.rebuild:
        raise CommandError(f"index {path} was built for another version of {args.features}; --rebuild builds it "
                           "again")
    else:
        retrieval.build_index(args.features, factory=args.factory, nprobe=args.nprobe, shortlist=args.shortlist,
                              train_rows=args.train_rows, verbose=0 if args.quiet else 1)
        print(f"index    wrote {path}")
    with retrieval.IndexedGallery(args.features) as gallery:
        print(f"         {len(gallery)} vectors, {gallery.method}; {path.stat().st_size / 2**20:.1f} MiB "
              f"(1/{gallery.features.nbytes / path.stat().st_size:.0f} of the features)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from rga_keras import retrieval

    with open_named_gallery(args) as gallery:
        print(gallery.describe())
    if args.gallery is not None:
        status = retrieval.index_status(args.gallery)
        print(f"index    {retrieval.index_path(args.gallery)}: {status}")
    return 0


def run_copy(args: argparse.Namespace) -> int:
    from rga_keras import retrieval

    with retrieval.open_features(args.features) as file:
        create = (file.source, file.features.shape[1])
        with retrieval.MilvusGallery(args.milvus, args.collection, create_for=create) as gallery:
            added, unusable = 0, []
            for start, (vectors, paths) in zip(itertools.count(0, 1 << 14), file.chunks(1 << 14)):
                known = gallery.known_paths(paths)
                bad = set(check_features(vectors).unusable.tolist())  # NaN/Inf or all zero: never searchable
                unusable.extend(start + i for i in sorted(bad))
                keep = [i for i, path in enumerate(paths) if path not in known and i not in bad]
                if keep:
                    gallery.append(retrieval.FeatureSet(vectors[keep], [paths[i] for i in keep], file.source))
                    added += len(keep)
            if unusable:
                warnings.warn(f"{len(unusable)} of {len(file.features)} rows of {args.features} hold NaN/Inf values "
                              f"or are all zero (first: row {unusable[0]}, {file.paths_at([unusable[0]])[0]}); "
                              "not copied", DegenerateFeaturesWarning, stacklevel=2)
            there = len(file.features) - added - len(unusable)
            print(f"copied   {added} of {len(file.features)} images{f' ({there} were there)' if there else ''}; "
                  f"{gallery.describe()}")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    from rga_keras import retrieval

    if args.camera is None and args.day is None:
        raise CommandError("say what to delete: --camera, --day or both")
    with retrieval.MilvusGallery(args.milvus, args.collection) as gallery:
        deleted = gallery.delete(camera=args.camera, day=args.day)
        print(f"deleted  {deleted} crops; {gallery.describe()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    with starting("rga-gallery"):
        parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("nprobe", "shortlist", "train_rows"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    work = {"index": run_index, "info": run_info, "copy": run_copy, "delete": run_delete}[args.command]
    kept = {"index": f"the index of {getattr(args, 'features', '')} was not changed (it is written whole or not at all)",
            "copy": "the collection keeps the rows copied before; the same command again copies only the rest",
            "delete": "Milvus may have deleted some of the crops; the same command again deletes the rest"}
    return run_command("rga-gallery", lambda: work(args), on_interrupt=lambda: kept.get(args.command, ""))


if __name__ == "__main__":
    sys.exit(main())
