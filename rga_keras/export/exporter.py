"""`export_all`: build every artefact in a staging folder, check each against the Keras model, and publish
them (one rename each) only when complete and checked, so TF Serving never sees a half-written version."""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import keras
import numpy as np

from rga_keras.checks import check_choice
from rga_keras.data import load_dataset, load_images
from rga_keras.evaluation.feature_check import refuse_faulty
from rga_keras.export.formats import DEFAULT_FORMATS, FORMATS, BuildJob
from rga_keras.export.model import ParityError, check_percentile, reid_model_info
from rga_keras.export.parity import check_artefacts
from rga_keras.export.report import (describe_settings, failed_checks, format_table, is_published, report_paths,
                                     write_reports)
from rga_keras.export.saved_model import SERVING_DTYPES
from rga_keras.export.tflite import INT8_FLOAT_OPS
from rga_keras.files import output_target, publish, remove_stale_temps, staging_dir
from rga_keras.interrupts import deferred, raise_if_interrupted
from rga_keras.locks import writer_lock
from rga_keras.models import FEATURES, embedding_model

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def export_all(
    model: keras.Model,
    out_dir: str | os.PathLike,
    *,
    formats: Iterable[str] = DEFAULT_FORMATS,
    feature: str = "after_bn",
    model_name: str = "rga",
    version: int = 1,
    calibration_samples: Sequence | None = None,
    num_calibration: int = 200,
    eval_split: tuple[Sequence, Sequence] | None = None,
    eval_batch_size: int = 32,
    serving_dtype: str = "float32",
    serving_allow_unit_range: bool = False,
    int8_io: bool = False,
    int8_float_ops: Sequence[str] = INT8_FLOAT_OPS,
    int8_float_nodes: Sequence[str] | str = "auto",
    int8_range_percentile: float | str = "auto",
    check: bool = True,
    enforce: bool = True,
    latency_runs: int = 30,
    num_threads: int | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Export ``model`` in ``formats``, check each artefact against it, and publish them under ``out_dir``.

    Layout: ``out_dir/serving/<model_name>/<version>/`` (point TF Serving's model_base_path at
    ``out_dir/serving/<model_name>``), ``out_dir/tflite/<model_name>_v<version>_<kind>.tflite``,
    ``out_dir/onnx/<model_name>_v<version>.onnx`` and the report
    ``out_dir/<model_name>_v<version>_export_report.{json,md}``.

    formats: a subset of `FORMATS` (default `DEFAULT_FORMATS`).
    calibration_samples: images for int8 / int16x8 calibration, as (path, person_id, camera_id) samples or paths
        (``num_calibration`` of them, evenly spread); default: the synthetic dataset's training split.
    eval_split: (query, gallery) samples for the parity and retrieval checks; default: the synthetic
        dataset's query/gallery.
    int8_float_ops, int8_float_nodes, int8_range_percentile: see `convert_tflite` (``float_ops``,
        ``float_nodes``, ``range_percentile``).
    check: measure parity, retrieval and latency (False: only write the artefacts).
    enforce: a missed threshold raises `ParityError` and publishes nothing (False: report and publish anyway).
    overwrite: replace an existing version / files of the same name.
    serving_allow_unit_range: the SavedModel's serving_default accepts batches whose pixels are all <= 1
        (by default refused as images scaled to [0, 1]; see `write_saved_model`).

    Returns the report (also written as JSON/Markdown): "model", "settings", "reference" (Keras),
    "checks" (per artefact), "artefacts" ({name: path}), "passed".
    """
    formats = list(dict.fromkeys(formats))
    for fmt in formats:
        check_choice("format", fmt, FORMATS)
    if not formats:
        raise ValueError("formats is empty: nothing to export")
    check_choice("feature", feature, FEATURES)
    check_percentile("int8_range_percentile", int8_range_percentile)
    check_choice("serving_dtype", serving_dtype, SERVING_DTYPES)
    if not _NAME.match(model_name):
        raise ValueError(f"model_name must be letters, digits, '_', '.', '-' (a folder name), got {model_name!r}")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer (TF Serving's version folder), got {version!r}")
    info = reid_model_info(model)
    size = info["input_size"]
    check_embeddings(model, feature, size)
    out_dir = Path(out_dir).expanduser()
    with writer_lock(out_dir, inside=True):  # one export into a folder at a time, taken before anything is written
        targets = {fmt: FORMATS[fmt].target(out_dir, model_name, version) for fmt in formats}
        existing = [str(p) for p in targets.values() if p.exists()]
        published_report = report_paths(out_dir, model_name, version)[0]
        if is_published(published_report):  # the version exists even where its artefacts were other formats
            existing.append(str(published_report))
        if existing and not overwrite:
            raise FileExistsError(f"already exported: {', '.join(existing)} (use another version, or overwrite)")
        log = print if verbose else _quiet
        calibrated = any(FORMATS[fmt].calibrated for fmt in formats)
        needs_synthetic = (calibrated and calibration_samples is None) or (check and eval_split is None)
        synthetic = load_dataset("synthetic") if needs_synthetic else None

        remove_stale_temps(out_dir, ".export-")  # staging folders of killed exports, any name or version
        staging = staging_dir(out_dir, prefix=f".export-{model_name}-v{version}-")
        try:
            calibration = None
            if calibrated:
                samples = synthetic.train if calibration_samples is None else calibration_samples
                calibration = load_images(samples, size, num_calibration)
                log(f"calibration: {len(calibration)} images")
            options = {"serving_dtype": serving_dtype, "serving_allow_unit_range": serving_allow_unit_range,
                       "int8_io": int8_io, "int8_float_ops": int8_float_ops, "int8_float_nodes": int8_float_nodes,
                       "int8_range_percentile": int8_range_percentile}
            built = _build(formats, BuildJob(model, feature, model_name, version, staging, calibration, options, log))
            report = {
                "model": {"name": model_name, "version": version, "feature": feature, **info},
                "settings": describe_settings(formats, calibration, int8_io, int8_float_ops, int8_float_nodes,
                                              int8_range_percentile, serving_dtype, num_threads, latency_runs),
                "checks": {fmt: {"size_bytes": _size(path), **extra} for fmt, (path, extra) in built.items()},
            }
            if check:
                query, gallery = eval_split if eval_split is not None else (synthetic.query, synthetic.gallery)
                check_artefacts(model, feature, built, report, query, gallery, eval_batch_size, latency_runs,
                                num_threads, log)
            report["passed"] = all(c.get("passed", True) for c in report["checks"].values())
            failures = failed_checks(report)
            raise_if_interrupted()  # a Ctrl-C/SIGTERM swallowed on the way (e.g. inside a converter): publish nothing
            publishes = report["passed"] or not enforce
            report["artefacts"] = {fmt: str(targets[fmt]) for fmt in built} if publishes else {}
            report["published"] = publishes
            written = write_reports(report, out_dir, model_name, version)
            if publishes:
                _publish(built, targets, staging)
                report["artefacts"].update(report=str(written[1]))
            log(format_table(report))
            if failures:
                log(("published despite failed checks:\n  " if publishes else "") + "\n  ".join(failures))
            if not publishes:
                raise ParityError(
                    "export failed its parity checks, nothing was published (pass enforce=False / "
                    "--allow-failures to publish anyway):\n  " + "\n  ".join(failures)
                    + f"\nfull report: {written[1]}", report)
            return report
        finally:
            with deferred():
                shutil.rmtree(staging, ignore_errors=True)


def check_embeddings(model: keras.Model, feature: str, size: Sequence[int], count: int = 8) -> None:
    """Refuse a model whose embeddings of ``count`` random images cannot be used (NaN/Inf, all zero, collapsed:
    `rga_keras.evaluation.feature_check`) before anything is built: it would be exported and pass its parity
    checks, being compared with itself."""
    images = np.random.default_rng(0).uniform(0, 255, (count, *size, 3)).astype(np.float32)
    vectors = keras.ops.convert_to_numpy(embedding_model(model, feature)(images, training=False))
    refuse_faulty(vectors, "embeddings of random test images", hint="the model's weights are damaged or its "
                  "training diverged; nothing was exported")


def _build(formats: list[str], job: BuildJob) -> dict[str, tuple[Path, dict]]:
    """Every artefact written into the job's staging folder by its format's module; {format: (path, report
    entries)}, the build time among them."""
    built = {}
    for fmt in formats:
        start = time.perf_counter()
        path, extra = FORMATS[fmt].module().build(FORMATS[fmt], job)
        built[fmt] = (path, {"seconds_to_build": round(time.perf_counter() - start, 1), **extra})
        job.log(f"{fmt}: built in {built[fmt][1]['seconds_to_build']} s")
    return built


def _publish(built: dict, targets: dict, staging: Path) -> None:
    """Move each finished artefact into place (one rename each, through a link there, keeping the permission
    bits of what it replaces); an older version folder is moved into the staging folder first."""
    for fmt, (path, _) in built.items():
        old = staging / f"old-{fmt}"
        old.mkdir()
        output_target(targets[fmt]).parent.mkdir(parents=True, exist_ok=True)
        publish(path, targets[fmt], aside=old)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _quiet(*args: Any, **kwargs: Any) -> None:
    """The log function of a quiet export (a named function: AutoGraph cannot read a lambda's source here)."""
