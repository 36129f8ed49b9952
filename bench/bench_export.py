"""Export benchmark: size and CPU latency at batch 1 and 16 of every format, fused vs explicit relation path.

    python bench/bench_export.py                              # RGA-SC 256×128, random weights (see below)
    python bench/bench_export.py --input-size 64 32           # the same at the demo's input size
    python bench/bench_export.py --model runs/x/best.keras    # a trained model: its parity numbers count too

Without --model the network is RGA-SC at --input-size (default 256×128) with random weights whose BatchNorm
statistics are estimated on 64 synthetic training images. Size and latency do not depend on the weights; parity does,
and a random deep network is chaotic (float16 rounding of its weights alone changes its embeddings), so
the parity columns of such a run say nothing about a trained model (docs/BENCHMARKS.md has trained-model
parity).

Each relation path is exported in every format of rga_keras.export.FORMATS (or --fused-formats /
--explicit-formats) with rga_keras.export.export_all (parity on the synthetic query/gallery split, int8
calibration on 200 synthetic training images, latency at batch 1). Then every artefact of the fused path,
loaded as rga-embed loads it (`rga_keras.retrieval.load_embedder`: LiteRT with its XNNPACK delegate, ONNX
Runtime's CPU provider, the SavedModel's serving_default), is timed next to the Keras model (a tf.function) at
batch 1 and at batch 16, interleaved (`measure_latencies`: wall clock and the process's CPU time per call),
all with --threads threads. --int8-extra also times the exported int8 models (tflite_int8, tflite_int8_full)
with 1 and 2 LiteRT threads.
Results are printed and written to OUT/bench_export.json. The CPU may be shared: latencies are noisy, compare
within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_model(size: tuple[int, int]):
    """RGA-SC with random weights and BatchNorm statistics estimated on 64 synthetic training images."""
    import keras

    from rga_keras import build_rga_resnet50
    from rga_keras import export as ex
    from rga_keras.data import load_dataset, load_images

    keras.utils.set_random_seed(0)
    data = load_dataset("synthetic")
    model = build_rga_resnet50(data.num_train_ids, "sc", input_shape=(*size, 3))
    ex.estimate_batchnorm_statistics(model, load_images(data.train, size, limit=64))
    return model


def keras_runner(model, report: dict):
    """The Keras embedding model as the export timed it: a tf.function of float32 pixel batches."""
    import tensorflow as tf

    from rga_keras import embedding_model

    embedder = embedding_model(model, report["model"]["feature"])
    keras_fn = tf.function(lambda x: embedder(x, training=False))
    return lambda x: keras_fn(tf.constant(x)).numpy()


def extra_int8_timings(model, report: dict, runs: int) -> dict:
    """The exported int8 models (selective and full-integer, those exported) with 1 and 2 LiteRT threads,
    interleaved with Keras, at batch 1 (the thread count matters on a machine other processes share)."""
    from rga_keras import export as ex
    from rga_keras.data import load_dataset, load_images

    runners = {"keras": keras_runner(model, report)}
    for fmt in ("tflite_int8", "tflite_int8_full"):
        for threads in (1, 2):
            if fmt in report["artefacts"]:
                runners[f"{fmt} ({threads} thread{'s' * (threads > 1)})"] = ex.TFLiteEmbedder(
                    report["artefacts"][fmt], num_threads=threads)
    images = load_images(load_dataset("synthetic").query, report["model"]["input_size"], 1)
    return {"latency_ms": ex.measure_latencies(runners, images, runs=runs)}


def batch_latencies(model, report: dict, batches: dict[int, int], num_threads: int) -> dict:
    """Median/min/p90 ms of the Keras model and of every published artefact at each batch size ({batch: runs}),
    interleaved across them; the images are synthetic query images."""
    from rga_keras import export as ex
    from rga_keras.data import load_dataset, load_images
    from rga_keras.retrieval import load_embedder

    runners = {"keras": keras_runner(model, report)}
    threaded = {".tflite": ex.TFLiteEmbedder, ".onnx": ex.ONNXEmbedder}  # the others have no thread setting
    for fmt, path in report["artefacts"].items():
        if fmt != "report":
            runner = threaded.get(Path(path).suffix)
            runners[fmt] = runner(path, num_threads) if runner else load_embedder(path)
    images = load_images(load_dataset("synthetic").query, report["model"]["input_size"], max(batches))
    return {batch: ex.measure_latencies(runners, images[:batch], runs=runs) for batch, runs in batches.items()}


def latency_table(latencies: dict, report: dict) -> str:
    """Markdown: one row per artefact, median wall-clock and CPU ms and speed-ups against Keras at each batch size."""
    batches = list(latencies)
    head = ("| artefact | size (MiB) | "
            + " | ".join(f"batch {b}: ms (× Keras) | CPU ms (× Keras)" for b in batches) + " |")
    lines = [head, "|---|---|" + "---|---|" * len(batches)]
    for name in latencies[batches[0]]:
        size = "–" if name == "keras" else f"{report['checks'][name]['size_bytes'] / 2**20:.1f}"
        cells = [f"{v[name][key]:.1f} ({v['keras'][key] / v[name][key]:.2f}×)"
                 for v in latencies.values() for key in ("median_ms", "cpu_median_ms")]
        lines.append(f"| {'Keras float32 (tf.function)' if name == 'keras' else name} | {size} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="trained .keras model (default: random-weight RGA-SC)")
    parser.add_argument("--input-size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"),
                        help="input size of the random-weight model (default 256 128)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/rga_bench_export"), help="output folder")
    parser.add_argument("--relations", default="fused,explicit", help="relation paths to export")
    parser.add_argument("--fused-formats", help="formats for the fused path (default: all of FORMATS)")
    parser.add_argument("--explicit-formats", default="saved_model,tflite_float32,tflite_int8",
                        help="formats for the explicit path")
    parser.add_argument("--latency-runs", type=int, default=40, help="timed runs at batch 1 (batch 16: a quarter)")
    parser.add_argument("--threads", type=int, help="LiteRT and ONNX Runtime threads (default: all cores)")
    parser.add_argument("--int8-extra", action="store_true",
                        help="also time the int8 models with 1 and 2 LiteRT threads")
    args = parser.parse_args()

    import platform

    from rga_keras import export as ex
    from rga_keras.cores import available_cores
    from rga_keras.models import load_reid_model

    model = load_reid_model(args.model) if args.model else random_model(tuple(args.input_size))
    threads = args.threads or available_cores()
    results = {"machine": {"processor": _cpu_model() or platform.processor(), "cpus": available_cores(),
                           "threads": threads}}
    for relation in args.relations.split(","):
        chosen = args.fused_formats if relation == "fused" else args.explicit_formats
        formats = chosen.split(",") if chosen else list(ex.FORMATS)
        start = time.perf_counter()
        report = ex.export_all(ex.with_relation(model, relation), args.out / relation, formats=formats,
                               model_name=f"rga_{relation}", latency_runs=args.latency_runs, enforce=False,
                               num_threads=threads, overwrite=True)
        report["seconds"] = round(time.perf_counter() - start)
        results[relation] = report
        print(f"\n== relation path: {relation} ({report['seconds']} s)\n{ex.format_table(report)}\n")
    if "fused" in results:
        batches = {1: args.latency_runs, 16: max(5, args.latency_runs // 4)}
        load_before = os.getloadavg()
        latencies = batch_latencies(model, results["fused"], batches, threads)
        results["batch_latency_ms"], results["load_average"] = latencies, [load_before, os.getloadavg()]
        print(f"CPU latency, median of interleaved runs ({results['machine']['processor']}, {threads} threads; "
              f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; CPU ms: the process's "
              "CPU time per call):")
        print(latency_table(latencies, results["fused"]))
    if args.int8_extra and "fused" in results:
        results["int8_extra"] = extra_int8_timings(model, results["fused"], args.latency_runs)
        print(json.dumps(results["int8_extra"], indent=1))
    (args.out / "bench_export.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out / 'bench_export.json'}")


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


if __name__ == "__main__":
    main()
