"""``rga-export``: a trained RGA model → TF Serving SavedModel, TFLite and ONNX, with parity
report.

The work is `rga_keras.export.export_all`; this is its command line (docs/EXPORT.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rga_keras.cli.common import OneLineParser, run_command, starting
from rga_keras.files import check_folder

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

EPILOG = """\
examples:
  rga-export --model runs/demo/best.keras --out exported/
  rga-export --model best.keras --out exported/ --formats saved_model,tflite_int8 --data-root ~/data/market
  rga-export --model best.keras --out exported/ --formats onnx      # for ONNX Runtime / TensorRT
  rga-export --untrained --attention sc --num-classes 751 --out /tmp/dry-run     # dry run, random weights

Output: OUT/serving/NAME/VERSION/ (TF Serving: --model_base_path=OUT/serving/NAME),
OUT/tflite/NAME_vVERSION_KIND.tflite, OUT/onnx/NAME_vVERSION.onnx, OUT/NAME_vVERSION_export_report.{json,md}.
Parity and retrieval are checked on the query/gallery split of --data-root (default: the built-in
synthetic dataset); a missed threshold publishes nothing and exits with status 1 unless --allow-failures.
Bad input (a model that does not load, an existing version without --overwrite, a full disk) exits with
status 2; Ctrl-C / SIGTERM publish nothing and exit with 130 / 143 (docs/RELIABILITY.md).
"""


def _formats(text: str) -> list[str]:
    from rga_keras.export.formats import FORMATS

    names = [f.strip() for f in text.split(",") if f.strip()]
    if names == ["all"]:
        return list(FORMATS)
    unknown = [f for f in names if f not in FORMATS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown format(s) {unknown or text!r}; choose from {', '.join(FORMATS)} "
                                         "(comma-separated) or 'all'")
    return names


def _percentile(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in (0, 100], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser (call inside `starting`: the choices come from the library)."""
    from rga_keras.attention import ATTENTIONS
    from rga_keras.data import DATASETS
    from rga_keras.export import (DEFAULT_FORMATS, FORMATS, INT8_FLOAT_OPS, INT8_MAX_STEP_ERROR,
                                  INT8_RANGE_PERCENTILES, SERVING_DTYPES)
    from rga_keras.layers import RELATIONS
    from rga_keras.models import FEATURES

    parser = OneLineParser(
        prog="rga-export", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Export an RGA re-id model (images → L2-normalised embedding) as a TF Serving SavedModel, "
                    "TFLite models (float32, float16, dynamic-range, int8, full-integer int8, int16x8) and ONNX "
                    "(opset 17, for ONNX Runtime and TensorRT), each checked against the Keras model: cosine "
                    "similarity, Rank-1/mAP, size and CPU latency.")
    source = parser.add_argument_group("model (one of)")
    which = source.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="trained model file (.keras), e.g. runs/demo/best.keras")
    which.add_argument("--untrained", action="store_true",
                       help="dry run: build an untrained model (random weights; BatchNorm statistics estimated "
                            "on the calibration images so its activations have realistic scales)")
    source.add_argument("--attention", choices=ATTENTIONS,
                        help="--untrained: an RGA mode or a Table 2 scheme (default sc, the paper's RGA-SC)")
    source.add_argument("--num-classes", type=int, help="--untrained: classifier width (default 751)")
    source.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="--untrained: input height and width (default 256 128)")
    source.add_argument("--relation", choices=RELATIONS,
                        help="export with this RGA relation path (same weights; default: the model's own, fused)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="output folder")
    out.add_argument("--formats", type=_formats, default=list(DEFAULT_FORMATS),
                     help=f"comma-separated subset of {','.join(FORMATS)}, or 'all' "
                          f"(default {','.join(DEFAULT_FORMATS)})")
    out.add_argument("--model-name", default="rga", help="model name: TF Serving folder and file prefix (default rga)")
    out.add_argument("--version", type=int, default=1, help="TF Serving version folder, a positive integer (default 1)")
    out.add_argument("--feature", choices=FEATURES, default="after_bn",
                     help="embedding: BNNeck output (after_bn, default) or the pooled feature (before_bn)")
    out.add_argument("--serving-dtype", choices=SERVING_DTYPES, default="float32",
                     help="dtype of serving_default's images input (default float32; uint8 makes requests 4x smaller)")
    out.add_argument("--serving-allow-unit-range", action="store_true",
                     help="serving_default accepts batches whose pixels are all <= 1 (default: refused as images "
                          "scaled to [0, 1]; docs/EXPORT.md)")
    out.add_argument("--int8-io", action="store_true",
                     help="int8 TFLite model takes uint8 pixels and returns int8 embeddings (default: float32)")
    out.add_argument("--int8-float-ops", default=",".join(INT8_FLOAT_OPS), metavar="OPS",
                     help="comma-separated TFLite ops kept in float32 in the (selective) int8 model; '' for none "
                          f"(default {','.join(INT8_FLOAT_OPS)}: the relation products)")
    out.add_argument("--int8-float-nodes", default="auto", metavar="NODES",
                     help="nodes (op output tensor names) kept in float32 in the int8 model, comma-separated; "
                          f"default auto: those whose own error exceeds {INT8_MAX_STEP_ERROR} int8 steps on the "
                          "calibration images (TFLite's QuantizationDebugger)")
    out.add_argument("--int8-range-percentile", type=_percentile, default="auto", metavar="P",
                     help="int8 activation ranges: percentile P of each tensor's per-image extremes over the "
                          "calibration images (100 = TFLite's plain min/max); default auto: the best of "
                          f"{', '.join(f'{p:g}' for p in INT8_RANGE_PERCENTILES)} by cosine to the float model")
    out.add_argument("--overwrite", action="store_true", help="replace an existing version / files of the same name")

    data = parser.add_argument_group("images for calibration and checks")
    data.add_argument("--data-root", type=Path,
                      help="dataset folder: train split for calibration (int8, int16x8, the dynamic-range "
                           "model's float32 ops), query/gallery for the checks "
                           "(default: the built-in synthetic dataset, generated on first use)")
    data.add_argument("--dataset", default="market1501", choices=DATASETS,
                      help="layout of --data-root for rga_keras.data.load_dataset (default market1501)")
    data.add_argument("--calibration-dir", type=Path,
                      help="folder of images (.jpg/.png, searched recursively) for calibration instead")
    data.add_argument("--num-calibration", type=int, default=200, help="calibration images (default 200)")

    checks = parser.add_argument_group("checks")
    checks.add_argument("--skip-parity-check", action="store_true",
                        help="write the artefacts without measuring parity, retrieval or latency")
    checks.add_argument("--allow-failures", action="store_true",
                        help="publish even if a parity threshold is missed (the report still says so)")
    checks.add_argument("--latency-runs", type=int, default=30, help="timed runs at batch 1 (default 30)")
    checks.add_argument("--threads", type=int,
                        help="TFLite and ONNX Runtime CPU threads (default: all available cores)")
    checks.add_argument("--quiet", action="store_true", help="print only the final table")
    return parser


def _calibration_images(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise FileNotFoundError(f"--calibration-dir {folder} is not a folder")
    paths = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"--calibration-dir {folder} holds no .jpg/.jpeg/.png images")
    return paths


def main(argv: list[str] | None = None) -> int:
    with starting("rga-export"):
        from rga_keras import export as ex
        from rga_keras.data import load_dataset
        from rga_keras.models import load_reid_model
        parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_calibration < 1 or args.latency_runs < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--num-calibration, --latency-runs and --threads must be positive")
    untrained_only = [flag for flag, value in (("--attention", args.attention), ("--num-classes", args.num_classes),
                                               ("--input-size", args.input_size)) if value is not None]
    if args.model is not None and untrained_only:
        parser.error(f"{', '.join(untrained_only)} describe the --untrained model; a --model file has its own "
                     "(an RGA model is tied to the input size it was built for)")

    def work() -> int:
        check_folder(args.out, "--out")
        data = None
        if args.data_root is not None:
            data = load_dataset(args.dataset, args.data_root)
            if not args.skip_parity_check:
                data.require(("query", "gallery"), "rga-export's parity checks")
            print(data.summary())
        calibration = _calibration_images(args.calibration_dir) if args.calibration_dir else (data and data.train)
        if args.untrained:
            model = _untrained_model(args, calibration)
        else:
            model = load_reid_model(args.model)
        if args.relation:
            model = ex.with_relation(model, args.relation)
        float_ops = [op.strip() for op in args.int8_float_ops.split(",") if op.strip()]
        float_nodes = args.int8_float_nodes if args.int8_float_nodes == "auto" else [
            node.strip() for node in args.int8_float_nodes.split(",") if node.strip()]
        try:
            report = ex.export_all(
                model, args.out, formats=args.formats, feature=args.feature, model_name=args.model_name,
                version=args.version, calibration_samples=calibration, num_calibration=args.num_calibration,
                eval_split=(data.query, data.gallery) if data else None, serving_dtype=args.serving_dtype,
                serving_allow_unit_range=args.serving_allow_unit_range, int8_io=args.int8_io, int8_float_ops=float_ops,
                int8_float_nodes=float_nodes,
                int8_range_percentile=args.int8_range_percentile, check=not args.skip_parity_check,
                enforce=not args.allow_failures, latency_runs=args.latency_runs, num_threads=args.threads,
                overwrite=args.overwrite, verbose=not args.quiet)
        except ex.ParityError as err:  # the export ran but missed a threshold: status 1, every failure named
            print(f"rga-export: {err}", file=sys.stderr)
            return 1
        if args.quiet:
            print(ex.format_table(report))
        for name, path in report["artefacts"].items():
            print(f"{name:16s} {path}")
        return 0

    return run_command("rga-export", work, errors=(ex.ExportError,),
                       on_interrupt=lambda: f"nothing was published in {args.out} (its staging folder was removed)")


def _untrained_model(args: argparse.Namespace, calibration):
    """build_rga_resnet50 with random weights and BatchNorm statistics estimated on 32 calibration images."""
    from rga_keras.data import load_dataset, load_images
    from rga_keras.export import estimate_batchnorm_statistics
    from rga_keras.models import build_rga_resnet50

    size = tuple(args.input_size or (256, 128))
    model = build_rga_resnet50(args.num_classes or 751, args.attention or "sc", input_shape=(*size, 3))
    samples = calibration if calibration is not None else load_dataset("synthetic").train
    estimate_batchnorm_statistics(model, load_images(samples, size, limit=32))
    return model


if __name__ == "__main__":
    raise SystemExit(main())
