"""Checking artefacts against the Keras model: per-image cosine of the embeddings, retrieval (Rank-1, mAP)
and CPU latency at batch 1, judged by each format's thresholds (`rga_keras.export.formats`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from rga_keras.data.pipeline import make_eval_dataset
from rga_keras.evaluation.features import extract_features
from rga_keras.evaluation.metrics import evaluate
from rga_keras.export.formats import FORMATS, Runner
from rga_keras.export.model import cosine_rows
from rga_keras.models import embedding_model

def measure_latencies(runners: dict[str, Callable[[np.ndarray], Any]], image: np.ndarray, *, runs: int = 30,
                      rounds: int = 5, warmup: int = 2) -> dict[str, dict]:
    """Wall-clock and CPU milliseconds of each ``runner(image)`` (one batch), measured interleaved.

    After ``warmup`` untimed calls each, ``rounds`` rounds time every runner in turn (``runs`` calls each in
    all), so that load from other processes on a shared machine falls on all runners alike. The CPU time is
    the process's (all its threads) per call: on a loaded machine it says what a call costs where the wall
    clock says mostly how long it waited for a core.
    Returns {name: {"median_ms", "min_ms", "p90_ms", "cpu_median_ms", "runs"}}.
    """
    for run in runners.values():
        for _ in range(warmup):
            run(image)
    rounds = max(1, min(rounds, runs))
    per_round = -(-max(1, runs) // rounds)
    times, cpu = {name: [] for name in runners}, {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(per_round):
                start, start_cpu = time.perf_counter(), time.process_time()
                run(image)
                times[name].append(1e3 * (time.perf_counter() - start))
                cpu[name].append(1e3 * (time.process_time() - start_cpu))
    return {name: {"median_ms": float(np.median(t)), "min_ms": float(np.min(t)), "p90_ms": float(np.percentile(t, 90)),
                   "cpu_median_ms": float(np.median(cpu[name])), "runs": len(t)} for name, t in times.items()}


def _embed_dataset(run: Callable[[np.ndarray], np.ndarray], dataset: tf.data.Dataset) -> np.ndarray:
    return np.concatenate([np.asarray(run(images.numpy()), np.float32) for images, _ in dataset])


def _as_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def _runner(fmt: str, path: Path, num_threads: int | None) -> Runner:
    """The artefact, loaded by its format's module, as the programs load it."""
    return FORMATS[fmt].module().load(path, num_threads)


def check_artefacts(model, feature, built, report, query, gallery, batch_size, latency_runs, num_threads, log):
    """Embeddings, retrieval and latency of the Keras model and of every artefact; fills ``report``."""
    size = tuple(report["model"]["input_size"])
    datasets = [make_eval_dataset(s, image_size=size, batch_size=batch_size) for s in (query, gallery)]
    embedder = embedding_model(model, feature)
    (qf, qmeta), (gf, gmeta) = (extract_features(embedder, d, verbose=0) for d in datasets)
    labels = (qmeta["person_id"], gmeta["person_id"], qmeta["camera_id"], gmeta["camera_id"])
    image = next(iter(datasets[0]))[0].numpy()[:1]

    @tf.function
    def keras_fn(x):  # a named function: AutoGraph cannot read a lambda's source here (it warns)
        return embedder(x, training=False)

    report["reference"] = {"format": "keras float32 (tf.function)", **_retrieval(qf, gf, labels)}
    report["settings"]["eval_images"] = {"query": len(qf), "gallery": len(gf)}
    runners = {"keras": lambda x: keras_fn(tf.constant(x)).numpy()}
    for fmt, (path, _) in built.items():
        runner = _runner(fmt, path, num_threads)
        run, rounded = runner.run, runner.uint8_input
        runners[fmt] = run
        aq, ag = (_embed_dataset(run, d) for d in datasets)
        reference = [qf, gf] if not rounded else [
            _embed_dataset(lambda x: keras_fn(tf.constant(_as_uint8(x), tf.float32)).numpy(), d) for d in datasets]
        cos = cosine_rows(np.concatenate([aq, ag]), np.concatenate(reference))
        entry = report["checks"][fmt]
        entry.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()), **_retrieval(aq, ag, labels))
        entry["map_diff_points"] = 100 * (entry["mAP"] - report["reference"]["mAP"])
        entry["thresholds"] = FORMATS[fmt].thresholds
        entry["failures"] = _failures(entry, FORMATS[fmt].thresholds)
        entry["passed"] = not entry["failures"]
        log(f"{fmt}: cosine mean {entry['cosine_mean']:.5f} min {entry['cosine_min']:.5f}  "
            f"mAP {100 * entry['mAP']:.2f} (keras {100 * report['reference']['mAP']:.2f})  "
            f"{'ok' if entry['passed'] else 'FAILED'}")
    latencies = measure_latencies(runners, image, runs=latency_runs)
    report["reference"]["latency_ms"] = latencies.pop("keras")
    keras_ms = report["reference"]["latency_ms"]
    for fmt, latency in latencies.items():
        report["checks"][fmt]["latency_ms"] = latency
        report["checks"][fmt]["speedup_vs_keras"] = keras_ms["median_ms"] / latency["median_ms"]
    log("latency at batch 1 (median ms): " + ", ".join(
        f"{name} {v['median_ms']:.1f}" for name, v in [("keras", keras_ms), *latencies.items()]))


def _retrieval(qf, gf, labels) -> dict:
    result = evaluate(qf, gf, *labels, metric="cosine")
    return {"rank1": float(result["rank1"]), "mAP": float(result["mAP"])}


def _failures(entry: dict, thresholds: dict) -> list[str]:
    failures = []
    if "cosine_min" in thresholds and entry["cosine_min"] < thresholds["cosine_min"]:
        failures.append(f"minimum cosine similarity {entry['cosine_min']:.6f} < {thresholds['cosine_min']} "
                        "(its worst image)")
    if "cosine_mean" in thresholds and entry["cosine_mean"] < thresholds["cosine_mean"]:
        failures.append(f"mean cosine similarity {entry['cosine_mean']:.6f} < {thresholds['cosine_mean']}")
    if "max_map_diff" in thresholds and abs(entry["map_diff_points"]) > thresholds["max_map_diff"]:
        failures.append(f"mAP differs from the Keras model's by {entry['map_diff_points']:+.2f} points "
                        f"(allowed ±{thresholds['max_map_diff']})")
    return failures
