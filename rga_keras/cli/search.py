"""rga-search: the most similar gallery images for each query, by cosine similarity.

The gallery is a features file from rga-embed (--gallery) or a Milvus collection (--milvus). QUERY is image
files / folders / .txt or .csv lists (embedded with the gallery's model, as recorded in the gallery, or
--model: the same file moved elsewhere) or one features file from rga-embed (made with the same model and
settings as the gallery). Prints which search ran, then each query's top-k gallery paths and cosine
similarities; --json / --csv write them, --picture draws the ranked lists as PNG.

A features file is searched exactly (chunked over queries: at most ~256 MiB of similarities at a time) or
through its faiss index (rga-gallery index): by default the index when there is one and the gallery has at
least 50,000 images (--search). A Milvus gallery is searched by Milvus. Both approximate searches re-rank a
shortlist exactly. --rerank re-ranks with k-reciprocal encoding (exact search of small galleries: it holds the
dense query x gallery matrix). The work is `rga_keras.retrieval`; bad input exits with status 2 and a one-line
message.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from rga_keras.cli.common import (CommandError, OneLineParser, add_gallery_arguments, load_gallery_model,
                                  open_named_gallery, report_skipped, run_command, starting)
from rga_keras.evaluation.feature_check import check_features
from rga_keras.files import check_file, write_text_atomic
from rga_keras.memory import check_batch_fits, explain_oom


EPILOG = """examples:
  rga-search person.jpg --gallery gallery.h5                      # embedded with the gallery's model
  rga-search queries/ --gallery gallery.h5 --top-k 20 --json results.json --picture results.png
  rga-search queries.h5 --gallery gallery.h5 --csv results.csv    # queries embedded by rga-embed
  rga-search person.jpg --gallery big.h5 --search index --nprobe 64   # through its faiss index
  rga-search person.jpg --milvus http://milvus:19530 --collection city"""


def build_parser() -> argparse.ArgumentParser:
    """The parser (call inside `starting`: the choices come from the library)."""
    parser = OneLineParser(prog="rga-search", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query", nargs="+", help="query images, folders, .txt/.csv lists, or one features file")
    add_gallery_arguments(parser)
    parser.add_argument("--top-k", type=int, default=10, help="gallery images per query (default 10)")
    parser.add_argument("--model", type=Path,
                        help="the gallery's model, where it is now (default: the path recorded in the gallery)")
    parser.add_argument("--rerank", action="store_true",
                        help="k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3); exact search of small galleries")
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
        found = check_features(query.features)
        if len(found.unusable):
            raise ValueError(f"{args.query[0]}: {found.describe('query rows', query.paths)}; they cannot be "
                             "searched with")
        return query
    paths = retrieval.list_images(args.query)
    embedder, source = load_gallery_model(args.model, gallery)
    batch = min(args.batch_size, len(paths))  # a larger batch only costs memory
    check_batch_fits(batch, embedder.input_size, "--batch-size")
    with explain_oom("while embedding the queries", f"lower --batch-size (was {batch})"):
        features, embedded, skipped = retrieval.embed_images(embedder, paths, batch_size=batch,
                                                             flip=gallery.source["flip"],
                                                             verbose=0 if args.quiet else 1)
    report_skipped(skipped)
    return retrieval.FeatureSet(features, embedded, source)


def result_rows(query_paths, gallery, hits) -> list[tuple[str, int, str, float]]:
    """(query, rank, gallery path, similarity) for every result, queries in order, best first."""
    found = hits.ids[hits.ids >= 0]
    paths = dict(zip(found.tolist(), (crop.path for crop in gallery.crops(found)))) if len(found) else {}
    return [(q, rank, paths[int(g)], float(s)) for q, row, sims in zip(query_paths, hits.ids, hits.similarities)
            for rank, (g, s) in enumerate(((g, s) for g, s in zip(row, sims) if g >= 0), start=1)]


def results_json(args: argparse.Namespace, gallery, rows) -> str:
    queries: dict[str, list] = {}
    for q, rank, path, similarity in rows:
        queries.setdefault(q, []).append({"rank": rank, "path": path, "similarity": round(similarity, 6)})
    return json.dumps({"gallery": gallery.name, "gallery_source": gallery.source, "search": gallery.method,
                       "top_k": args.top_k, "rerank": args.rerank,
                       "queries": [{"query": q, "results": found} for q, found in queries.items()]}, indent=2) + "\n"


def results_csv(rows) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["query", "rank", "path", "similarity"])
    writer.writerows((q, rank, path, f"{similarity:.6f}") for q, rank, path, similarity in rows)
    return out.getvalue()


def search(args: argparse.Namespace, gallery, query):
    """The gallery's `Hits` for the queries; --rerank only for exact search (it needs every similarity)."""
    from rga_keras import retrieval

    if not args.rerank:
        return gallery.search(query.features, args.top_k)
    if not isinstance(gallery, retrieval.FileGallery) or gallery.method != "exact":
        raise CommandError(f"--rerank needs exact search of a features file, not {gallery.method} search")
    indices, similarities = retrieval.search(query.features, gallery.features, args.top_k, rerank=True,
                                             query_names=query.paths, left_out=gallery.left_out())
    return retrieval.Hits(indices, similarities)


def main(argv: list[str] | None = None) -> int:
    with starting("rga-search"):
        from rga_keras.visualize.plots import plot_search_results
        parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("top_k", "num_queries", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")

    def work() -> int:
        for option in ("json", "csv", "picture"):  # before the search, not when its results are written
            if getattr(args, option):
                check_file(getattr(args, option), f"--{option}")
        with open_named_gallery(args) as gallery:
            print(f"gallery  {gallery.describe()}", flush=True)
            query = load_queries(args, gallery)
            print(f"search   {gallery.method}{' then k-reciprocal re-ranking' if args.rerank else ''}", flush=True)
            rows = result_rows(query.paths, gallery, search(args, gallery, query))
            size = len(gallery)
        if not args.quiet:
            for q, rank, path, similarity in rows:
                if rank == 1:
                    print(f"query {q}")
                print(f"  {rank:3d}  {similarity:.4f}  {path}")
        print(f"{len(query.paths)} queries, top {min(args.top_k, size)} of {size} gallery images")
        written = {args.json: lambda: results_json(args, gallery, rows), args.csv: lambda: results_csv(rows)}
        for path, text in written.items():
            if path:
                write_text_atomic(path, text())
                print(f"wrote {path}")
        if args.picture:
            plot_search_results(*picture_lists(query.paths, rows), args.picture, num_queries=args.num_queries)
            print(f"wrote {args.picture}")
        return 0

    return run_command("rga-search", work, on_interrupt=lambda: "nothing was written")


def picture_lists(query_paths, rows):
    """`plot_search_results`' inputs from the result rows: the paths shown and (q, k) indices into them."""
    import numpy as np

    shown = sorted({path for _, _, path, _ in rows})
    where = {path: i for i, path in enumerate(shown)}
    k = max(rank for _, rank, _, _ in rows)
    indices, similarities = np.zeros((len(query_paths), k), np.int64), np.zeros((len(query_paths), k), np.float32)
    row_of = {q: i for i, q in enumerate(query_paths)}
    for q, rank, path, similarity in rows:
        indices[row_of[q], rank - 1], similarities[row_of[q], rank - 1] = where[path], similarity
    return query_paths, shown, indices, similarities


if __name__ == "__main__":
    sys.exit(main())
