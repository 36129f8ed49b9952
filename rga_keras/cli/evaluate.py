"""rga-eval: Rank-1/5/10, mAP and mINP of a trained RGA re-id model on a dataset's query/gallery split, for
both retrieval features (after_bn, before_bn; one forward pass) or the one --feature names.

The work is `rga_keras.evaluation.features.evaluate_model` (protocol: docs/DESIGN.md §4, docs/EVALUATION.md); this is its
command line. Errors (missing or unsuitable model file, missing dataset, wrong image size) exit with status 2
and a one-line message.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rga_keras.cli.common import (OneLineParser, add_model_and_data_arguments, check_model_and_data_arguments,
                                  eval_config, load_data, load_model, run_command, starting)
from rga_keras.files import check_file, write_text_atomic
from rga_keras.memory import explain_oom

EPILOG = """examples:
  rga-eval runs/demo/best.keras --dataset synthetic                # the demo's model on the demo's data, both features
  rga-eval best.keras --dataset market1501 --data-root ~/data/Market-1501-v15.09.15 --flip --json market.json
  rga-eval best.keras --dataset cuhk03 --split detected --data-root ~/data/cuhk03 --rerank
  rga-eval best.keras --dataset msmt17 --data-root ~/data/MSMT17_V1 --feature before_bn   # that feature only"""


def build_parser() -> argparse.ArgumentParser:
    """The parser (call inside `starting`: the choices come from the library)."""
    from rga_keras.evaluation import METRICS

    parser = OneLineParser(prog="rga-eval", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data_arguments(parser)
    parser.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)")
    parser.add_argument("--metric", default="cosine", choices=METRICS, help="distance (default cosine)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def format_results(results: dict[str, dict]) -> str:
    """The metrics table (percent), one row per feature, and the query counts."""
    keys = ("rank1", "rank5", "rank10", "mAP", "mINP")
    first = next(iter(results.values()))
    return "\n".join([
        f"{'feature':9s}" + "".join(f"{n:>9}" for n in ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP")),
        *(f"{name:9s}" + "".join(f"{100 * m[k]:9.1f}" for k in keys) for name, m in results.items()),
        f"{int(first['num_valid_queries'])} queries evaluated, {int(first['num_skipped_queries'])} skipped "
        f"(no true match in the gallery)",
    ])


def images_line(results: dict[str, dict], data) -> str:
    """``N query and M gallery images`` as evaluated, with the unreadable ones the pipeline left out said."""
    first = next(iter(results.values()))
    counts = {"query": int(first["num_query_images"]), "gallery": int(first["num_gallery_images"])}
    left = sum(len(getattr(data, split)) - n for split, n in counts.items())
    return (f"{counts['query']} query and {counts['gallery']} gallery images"
            + (f" ({left} unreadable images left out)" if left else ""))


def write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    with starting("rga-eval"):
        from rga_keras.evaluation.features import eval_features, evaluate_model
        parser = build_parser()
    args = parser.parse_args(argv)
    check_model_and_data_arguments(parser, args)

    def work() -> int:
        if args.json:
            check_file(args.json, "--json")  # before the evaluation, not when its result is written
        data = load_data(args, "rga-eval")  # before the model: a broken dataset is found in a second
        model, size = load_model(args.model, args.image_size)
        print(f"model    {args.model} ({model.name}, input {size[0]}x{size[1]})")
        print(f"dataset  {data.summary()}")
        config = eval_config(args, size, data)
        features = eval_features(config, args.feature)
        print(f"feature  {', '.join(features)}; {args.metric} distance, flip {'on' if args.flip else 'off'}, "
              f"re-ranking {'on' if args.rerank else 'off'}", flush=True)
        started = time.time()
        with explain_oom("while evaluating", f"lower --batch-size (was {config['eval']['batch_size']})"):
            results = evaluate_model(model, data, config, verbose=0 if args.quiet else 1, features=features)
        seconds = round(time.time() - started, 1)
        print(format_results(results))
        print(f"{images_line(results, data)} in {seconds} s")
        if args.json:
            write_json(args.json, _json_record(args, model, size, data, results, seconds))
            print(f"wrote {args.json}")
        return 0

    return run_command("rga-eval", work, on_interrupt=lambda: "nothing was written")


def _json_record(args, model, size, data, results: dict[str, dict], seconds: float) -> dict[str, Any]:
    """Settings, then one entry per evaluated feature (in ``features`` order) with its metrics and CMC."""
    def metrics(m: dict) -> dict[str, Any]:
        return {**{k: m[k] for k in ("rank1", "rank5", "rank10", "mAP", "mINP")},
                **{k: int(m[k]) for k in ("num_valid_queries", "num_skipped_queries")},
                "cmc": [float(x) for x in m["cmc"]]}

    return {
        "model": str(args.model), "model_name": model.name, "input_size": list(size),
        "dataset": args.dataset, "data_root": args.data_root, "dataset_summary": data.summary(),
        "features": list(results), "metric": args.metric, "flip": args.flip, "rerank": args.rerank,
        "num_query": int(next(iter(results.values()))["num_query_images"]),
        "num_gallery": int(next(iter(results.values()))["num_gallery_images"]), "seconds": seconds,
        **{name: metrics(m) for name, m in results.items()},
    }


if __name__ == "__main__":
    sys.exit(main())
