"""rga-visualize: pictures of a trained RGA re-id model on a dataset, written as PNG into --out.

ranked_lists.png   each chosen query and its top-k gallery images (true matches green, false red)
attention.png      spatial attention of every RGA stage over each query image (paper Fig. 1)
relations.png      relations of a target position with all positions, R[t,:] and R[:,t] (paper Fig. 4)
grad_cam.png       Grad-CAM of the last stage for the predicted training identity (paper Fig. 5)
training_curves.png  loss, Rank-1 and mAP over epochs (with --run-dir)

The pictures come from `rga_keras.visualize` (plots and attention maps; docs/EVALUATION.md). Errors exit
with status 2 and a one-line message, as rga-eval's.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from rga_keras.cli.common import (CommandError, OneLineParser, add_model_and_data_arguments,
                                  check_model_and_data_arguments, eval_config, load_data, load_model, run_command,
                                  starting)
from rga_keras.locks import writer_lock

EPILOG = """examples:
  rga-visualize runs/demo/best.keras --dataset synthetic --out pictures --run-dir runs/demo
  rga-visualize best.keras --data-root ~/data/Market-1501-v15.09.15 --out market_pictures --num-queries 12
  rga-visualize best.keras --data-root ~/data/market --out pictures --target 60 64   # relations of pixel (60, 64)"""

MIN_CELL_WIDTH = 128  # map cells are enlarged (by an integer factor) to at least this width
MAP_CHUNK = 8  # images per map pass (stage-1 relations are (H·W/16)² floats per image)


def build_parser() -> argparse.ArgumentParser:
    """The parser (call inside `starting`: the choices come from the library)."""
    parser = OneLineParser(prog="rga-visualize", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    parser.add_argument("--num-queries", type=int, default=8,
                        help="queries shown, spread over the query set (default 8)")
    parser.add_argument("--top-k", type=int, default=10, help="gallery images per ranked list (default 10)")
    parser.add_argument("--target", type=int, nargs=2, metavar=("ROW", "COL"),
                        help="relation target, a pixel of the model's input (default: 35%% down, centred: the torso)")
    parser.add_argument("--run-dir", type=Path, help="training run folder; its history.json/.csv gives the curves")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _history_file(run_dir: Path) -> Path:
    for name in ("history.json", "history.csv"):
        if (run_dir / name).is_file():
            return run_dir / name
    raise CommandError(f"--run-dir {run_dir} holds no history.json or history.csv (written by rga-train)")


def _attention_maps(model, images: np.ndarray) -> dict:
    """Spatial attention and relations of every RGA stage, MAP_CHUNK images at a time."""
    from rga_keras.visualize.attention_maps import attention_maps

    keep = ("spatial_attention", "spatial_relation")
    parts = [attention_maps(model, images[i : i + MAP_CHUNK]) for i in range(0, len(images), MAP_CHUNK)]
    return {stage: {k: np.concatenate([p[stage][k] for p in parts]) for k in keep if k in maps}
            for stage, maps in parts[0].items()}


def main(argv: list[str] | None = None) -> int:
    with starting("rga-visualize"):
        parser = build_parser()
    args = parser.parse_args(argv)
    check_model_and_data_arguments(parser, args)
    if args.num_queries < 1 or args.top_k < 1:
        parser.error("--num-queries and --top-k must be positive")

    def work() -> int:
        if args.out.exists() and not args.out.is_dir():
            raise CommandError(f"--out {args.out} is a file; expected a folder for the pictures (made if missing)")
        with writer_lock(args.out, inside=True):  # one set of pictures, not two runs' mixed
            return draw()

    def draw() -> int:
        history = _history_file(args.run_dir) if args.run_dir else None
        model, size = load_model(args.model, args.image_size)
        target = tuple(args.target) if args.target else (int(0.35 * size[0]), size[1] // 2)
        if not (0 <= target[0] < size[0] and 0 <= target[1] < size[1]):
            raise CommandError(f"--target {target[0]} {target[1]} lies outside the model's {size[0]}x{size[1]} input")
        data = load_data(args, "rga-visualize")
        print(data.summary(), flush=True)
        written = _pictures(args, model, size, data, target, verbose=0 if args.quiet else 1)
        if history is not None:
            from rga_keras.visualize.plots import plot_training_curves

            written.append(plot_training_curves(history, args.out / "training_curves.png"))
        print("wrote:")
        for path in written:
            print(f"  {path}")
        return 0

    return run_command("rga-visualize", work)


def _pictures(args, model, size, data, target, verbose: int) -> list[Path]:
    """Ranked lists for the chosen queries, then their attention, relation and Grad-CAM pictures."""
    from rga_keras.data.pipeline import load_images
    from rga_keras.evaluation import pairwise_distance
    from rga_keras.evaluation.features import query_gallery_features
    from rga_keras.evaluation.metrics import check_rankable
    from rga_keras.models import rga_layers
    from rga_keras.visualize import attention_maps as am
    from rga_keras.visualize.plots import plot_ranked_lists, spread_indices

    config = eval_config(args, size, data)
    print(f"features of {len(data.query)} query and {len(data.gallery)} gallery images", flush=True)
    (qf, q), (gf, g) = query_gallery_features(model, data, config, verbose)
    check_rankable(qf, "query_features")  # NaN rows refused, as rga-eval refuses them (a NaN model drew lists)
    check_rankable(gf, "gallery_features")
    rows = spread_indices(len(qf), args.num_queries)
    written = [plot_ranked_lists(q["path"][rows], g["path"], pairwise_distance(qf[rows], gf, config["eval"]["metric"]),
                                 q["person_id"][rows], g["person_id"], q["camera_id"][rows], g["camera_id"],
                                 args.out / "ranked_lists.png", top_k=args.top_k, num_queries=len(rows))]

    images = load_images(list(q["path"][rows]), size)
    scale = math.ceil(MIN_CELL_WIDTH / size[1])
    cell = (size[1] * scale, size[0] * scale)
    print(f"attention, relation and Grad-CAM maps of {len(rows)} queries", flush=True)
    if rga_layers(model):
        maps = _attention_maps(model, images)
        if any("spatial_attention" in m for m in maps.values()):
            written.append(am.plot_attention_maps(images, maps, args.out / "attention.png", cell_size=cell))
        else:
            print("  no spatial attention (channel-only RGA): attention.png skipped")
        if any("spatial_relation" in m for m in maps.values()):
            written.append(am.plot_relation_maps(images, maps, target, args.out / "relations.png", cell_size=cell))
        else:
            print("  no spatial relations in this model: relations.png skipped")
    else:
        print("  baseline model (no RGA module): attention.png and relations.png skipped")
    chunks = [am.grad_cam(model, images[i : i + MAP_CHUNK]) for i in range(0, len(images), MAP_CHUNK)]
    cams, classes, scores = (np.concatenate(x) for x in zip(*chunks))
    labels = [f"class {c}: {s:.3g}" for c, s in zip(classes, scores)]
    written.append(am.plot_grad_cam(images, cams, args.out / "grad_cam.png", labels=labels, cell_size=cell))
    return written


if __name__ == "__main__":
    sys.exit(main())
