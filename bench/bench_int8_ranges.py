"""Whether any choice of activation ranges can give a trained model a full-integer int8 model that passes the
export's checks, and which images and tensors stand in the way (docs/EXPORT.md, "Why no range choice
suffices").

    python bench/bench_int8_ranges.py runs/demo/best.keras [--data-root DIR --dataset NAME] [--percentile 90]

The model's fused relation path is converted as `rga-export --formats tflite_int8_full` converts it, and then
quantised with three range choices, each judged like the export (per-image cosine of the after_bn embedding to
the Keras model's on the query and gallery images): ranges from the calibration images (``--percentile`` of
their per-image extremes, as the export sets them), and, as an oracle no export can have, ranges from the
evaluation images themselves (their extremes, and their 99th percentile). It then says, for each evaluation
image, how far its activations go beyond the calibrated ranges — at the outputs of the relation products
(BATCH_MATMUL) and at the backbone's convolutions — and how the images whose relation products overflow
score against the others.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def per_image_overflow(extremes: tuple, limits: tuple[np.ndarray, np.ndarray], columns: np.ndarray) -> np.ndarray:
    """For each image of ``extremes`` (`activation_extremes`), the largest factor by which one of the tensors in
    ``columns`` goes beyond its range ``limits`` (low, high: `tflite.range_limits`), 1 where it stays inside."""
    _, lows, highs, _ = extremes
    low, high = limits
    with np.errstate(divide="ignore", invalid="ignore"):
        over = np.fmax(np.where(high > 0, highs / high, np.nan), np.where(low < 0, lows / low, np.nan))
    return np.fmax(np.nanmax(np.where(columns[None], over, np.nan), axis=1), 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="trained .keras model")
    parser.add_argument("--data-root", help="dataset folder (default: the built-in synthetic dataset)")
    parser.add_argument("--dataset", default="synthetic", help="dataset name (default synthetic)")
    parser.add_argument("--calibration", type=int, default=200, help="calibration images (training split, evenly "
                        "spread; default 200, as rga-export)")
    parser.add_argument("--percentile", type=float, default=90.0, help="range percentile of the calibrated model "
                        "(default 90, what rga-export's 'auto' chose on both measured models)")
    args = parser.parse_args()

    import tensorflow as tf
    from tensorflow.lite.python.util import modify_model_io_type
    from tensorflow.lite.tools import flatbuffer_utils

    from rga_keras import export as ex
    from rga_keras.data import load_dataset, load_images
    from rga_keras.export import tflite
    from rga_keras.export.flatbuffer import op_name
    from rga_keras.export.model import cosine_rows, write_float_saved_model
    from rga_keras.models import load_reid_model

    model = ex.with_relation(load_reid_model(args.model), "fused")
    size = tuple(int(d) for d in model.input.shape[1:3])
    data = load_dataset(args.dataset, args.data_root)
    calibration = load_images(data.train, size, args.calibration)
    images = np.clip(np.rint(load_images(data.query + data.gallery, size)), 0, 255).astype(np.float32)
    reference = model.embedding_model("after_bn").predict(images, batch_size=32, verbose=0)

    with tempfile.TemporaryDirectory() as work:  # calibrated here; quantised from the calibrated model below
        converter = tf.lite.TFLiteConverter.from_saved_model(str(write_float_saved_model(model, Path(work) / "src")))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
        debugger = tf.lite.experimental.QuantizationDebugger(converter=converter,
                                                             debug_dataset=converter.representative_dataset)
    calibrated = tflite.raw_pixel_input(debugger.calibrated_model)
    on_calibration = tflite.activation_extremes(calibrated, calibration)
    on_evaluation = tflite.activation_extremes(calibrated, images)

    def judged(extremes: tuple, percentile: float) -> np.ndarray:
        debugger.calibrated_model = tflite.zero_point_free_products(
            tflite.set_ranges(calibrated, extremes, percentile))
        full = modify_model_io_type(debugger.get_nondebug_quantized_model(), tf.uint8, tf.int8)
        return cosine_rows(ex.TFLiteEmbedder(full)(images), reference)

    print(f"{args.model}: {len(images)} query+gallery images at {size[0]}x{size[1]}, {len(calibration)} calibration "
          "images; per-image cosine of the full-integer after_bn embedding to the Keras model's")
    print("| activation ranges | mean | worst image | images < 0.9 |")
    print("|---|---|---|---|")
    cosines = {}
    for name, extremes, percentile in (("calibration images", on_calibration, args.percentile),
                                       ("evaluation images (oracle)", on_evaluation, 100.0),
                                       ("evaluation images (oracle)", on_evaluation, 99.0)):
        cosines[name, percentile] = c = judged(extremes, percentile)
        print(f"| {name}, percentile {percentile:g} | {c.mean():.4f} | {c.min():.3f} | {(c < 0.9).mean():.1%} |",
              flush=True)

    graph = flatbuffer_utils.read_model_from_bytearray(calibrated)
    made_by = {t: op_name(graph, op) for op in graph.subgraphs[0].operators for t in op.outputs}
    kinds = np.array([made_by.get(t, "") for t in on_calibration[0]])
    calibrated_limits = tflite.range_limits(on_calibration, args.percentile)
    cosine = cosines["calibration images", args.percentile]
    print(f"\nPer image, the largest factor by which an activation exceeds its calibrated range "
          f"(percentile {args.percentile:g}):")
    print("| tensors | median image | 90th percentile | 99th percentile | worst image |")
    print("|---|---|---|---|---|")
    overflow = {}
    for label, op in (("relation products (BATCH_MATMUL outputs)", "BATCH_MATMUL"), ("convolutions", "CONV_2D")):
        overflow[op] = per_image_overflow(on_evaluation, calibrated_limits, kinds == op)
        q = np.percentile(overflow[op], [50, 90, 99, 100])
        print(f"| {label} ({(kinds == op).sum()}) | {q[0]:.3g}x | {q[1]:.3g}x | {q[2]:.3g}x | {q[3]:.3g}x |")
    inside = overflow["BATCH_MATMUL"] <= 1.5
    for label, chosen in (("stay within 1.5x of", inside), ("go beyond 1.5x", ~inside)):
        if chosen.any():
            print(f"Images whose relation products {label} their ranges: {chosen.sum()}, mean cosine "
                  f"{cosine[chosen].mean():.4f}, worst {cosine[chosen].min():.3f}")


if __name__ == "__main__":
    main()
