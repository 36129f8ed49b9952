"""rga-search: the most similar gallery images for each query, by exact cosine search of a features file.

QUERY is image files / folders / .txt or .csv lists (embedded with the gallery's model, as recorded in the
gallery file, or --model: the same file moved elsewhere) or one features file from rga-embed (made with the
same model and settings as the gallery). Prints each query's top-k gallery paths and cosine similarities;
--json / --csv write them, --picture draws the ranked lists as PNG. The search is exact and chunked over
queries (at most ~256 MiB of similarities at a time); --rerank re-ranks with k-reciprocal encoding (small
galleries: it holds the dense query x gallery matrix). The work is `rga_keras.retrieval`; bad input exits
with status 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from rga_keras.cli.common import CommandError, OneLineParser, report_skipped, run_command, starting
from rga_keras.files import check_file, write_text_atomic


EPILOG = """examples:
  rga-search person.jpg --gallery gallery.h5                      # embedded with the gallery's model
  rga-search queries/ --gallery gallery.h5 --top-k 20 --json results.json --picture results.png
  rga-search queries.h5 --gallery gallery.h5 --csv results.csv    # queries embedded by rga-embed"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="rga-search", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query", nargs="+", help="query images, folders, .txt/.csv lists, or one features file")
    parser.add_argument("--gallery", type=Path, required=True, help="gallery features file written by rga-embed")
    parser.add_argument("--top-k", type=int, default=10, help="gallery images per query (default 10)")
    parser.add_argument("--model", type=Path,
                        help="the gallery's model, where it is now (default: the path recorded in the gallery file)")
    parser.add_argument("--rerank", action="store_true",
                        help="k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3); for small galleries")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--csv", type=Path, help="write the results to this CSV file (query,rank,path,similarity)")
    parser.add_argument("--picture", type=Path, help="draw the ranked lists into this PNG file")
    parser.add_argument("--num-queries", type=int, default=8,
                        help="queries in the picture, spread over the queries (default 8)")
    parser.add_argument("--batch-size", type=int, default=64, help="query images per forward pass (default 64)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no per-query listing")
    return parser


def load_queries(args: argparse.Namespace, gallery):
    """The query FeatureSet: a features file as it is, or images embedded like the gallery."""
    from rga_keras import retrieval

    if len(args.query) == 1 and retrieval.is_features_candidate(args.query[0]):
        if args.model:
            raise CommandError("--model applies to query images, not to a query features file")
        query = retrieval.read_features(args.query[0])
        retrieval.check_same_source(gallery.source, query.source, f"query file {args.query[0]}")
        return query
    paths = retrieval.list_images(args.query)
    model = args.model or Path(gallery.source["model"])
    if args.model is None and not model.exists():
        raise CommandError(f"the gallery's model {model} does not exist (moved?); pass its location with --model")
    embedder = retrieval.load_embedder(model, gallery.source["feature"])
    source = retrieval.feature_source(embedder, gallery.source["flip"])
    retrieval.check_same_source(gallery.source, source, "--model" if args.model else "the model at the recorded path")
    features, embedded, skipped = retrieval.embed_images(embedder, paths, batch_size=args.batch_size,
                                                         flip=gallery.source["flip"],
                                                         verbose=0 if args.quiet else 1)
    report_skipped(skipped)
    return retrieval.FeatureSet(features, embedded, source)


def result_rows(query_paths, gallery_paths, indices, similarities) -> list[tuple[str, int, str, float]]:
    """(query, rank, gallery path, similarity) for every result, queries in order, best first."""
    return [(q, rank, gallery_paths[g], float(s)) for q, row, sims in zip(query_paths, indices, similarities)
            for rank, (g, s) in enumerate(zip(row, sims), start=1)]


def results_json(args: argparse.Namespace, gallery, rows) -> str:
    queries: dict[str, list] = {}
    for q, rank, path, similarity in rows:
        queries.setdefault(q, []).append({"rank": rank, "path": path, "similarity": round(similarity, 6)})
    return json.dumps({"gallery": str(args.gallery), "gallery_source": gallery.source, "top_k": args.top_k,
                       "rerank": args.rerank,
                       "queries": [{"query": q, "results": found} for q, found in queries.items()]}, indent=2) + "\n"


def results_csv(rows) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["query", "rank", "path", "similarity"])
    writer.writerows((q, rank, path, f"{similarity:.6f}") for q, rank, path, similarity in rows)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("top_k", "num_queries", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")

    with starting("rga-search"):
        from rga_keras import retrieval
        from rga_keras.visualize.plots import plot_search_results

    def work() -> int:
        for option in ("json", "csv", "picture"):  # before the search, not when its results are written
            if getattr(args, option):
                check_file(getattr(args, option), f"--{option}")
        gallery = retrieval.read_features(args.gallery)
        print(f"gallery  {args.gallery}: {gallery.describe()}", flush=True)
        query = load_queries(args, gallery)
        indices, similarities = retrieval.search(query.features, gallery.features, args.top_k, rerank=args.rerank)
        rows = result_rows(query.paths, gallery.paths, indices, similarities)
        if not args.quiet:
            for q, rank, path, similarity in rows:
                if rank == 1:
                    print(f"query {q}")
                print(f"  {rank:3d}  {similarity:.4f}  {path}")
        print(f"{len(query.paths)} queries, top {indices.shape[1]} of {len(gallery.paths)} gallery images"
              f"{' (re-ranked)' if args.rerank else ''}")
        written = {args.json: lambda: results_json(args, gallery, rows), args.csv: lambda: results_csv(rows)}
        for path, text in written.items():
            if path:
                write_text_atomic(path, text())
                print(f"wrote {path}")
        if args.picture:
            plot_search_results(query.paths, gallery.paths, indices, similarities, args.picture,
                                num_queries=args.num_queries)
            print(f"wrote {args.picture}")
        return 0

    return run_command("rga-search", work)


if __name__ == "__main__":
    sys.exit(main())
