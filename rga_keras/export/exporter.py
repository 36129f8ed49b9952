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

from rga_keras.cli import raise_if_interrupted
from rga_keras.export.model import ExportError, ParityError, check_choice, check_percentile, reid_model_info
from rga_keras.export.onnx import convert_onnx, onnx_ops
from rga_keras.export.parity import check_artefacts
from rga_keras.export.report import (describe_settings, failed_checks, format_table, is_published, report_paths,
                                     write_reports)
from rga_keras.export.serving import SERVING_DTYPES, write_saved_model
from rga_keras.export.tflite import INT8_FLOAT_OPS, convert_tflite, tflite_ops, write_tflite_source
from rga_keras.files import remove_stale_temps, staging_dir
from rga_keras.models import FEATURES

FORMATS = ("saved_model", "tflite_float32", "tflite_float16", "tflite_dynamic", "tflite_int8", "tflite_int8_full",
           "tflite_int16x8", "onnx")
# What an export makes unless told otherwise: the formats that pass their checks on the README demo model
# (docs/EXPORT.md); the other quantised models are made on request.
DEFAULT_FORMATS = ("saved_model", "tflite_float32", "tflite_float16", "tflite_dynamic", "onnx")
_CALIBRATED = ("tflite_dynamic", "tflite_int8", "tflite_int8_full", "tflite_int16x8")  # formats calibrated on images
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def load_images(samples: Sequence, image_size: Sequence[int], limit: int | None = None) -> np.ndarray:
    """Up to ``limit`` images (evenly spread over ``samples``) as raw-pixel float32 (n, H, W, 3)."""
    from rga_keras.data import make_eval_dataset
    from rga_keras.visualize import spread_indices

    samples = list(samples)
    if limit is not None:
        samples = [samples[i] for i in spread_indices(len(samples), limit)]
    samples = [s if isinstance(s, (tuple, list)) else (str(s), 0, 0) for s in samples]
    dataset = make_eval_dataset(samples, image_size=tuple(image_size), batch_size=32)
    return np.concatenate([images.numpy() for images, _ in dataset])


def default_synthetic_dataset():
    """The built-in synthetic dataset (generated once into the cache, as the training demo uses it)."""
    from rga_keras.data import load_dataset
    from rga_keras.data.synthetic import ensure_synthetic

    return load_dataset("market1501", ensure_synthetic())


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
    out_dir = Path(out_dir).expanduser()
    targets = _targets(out_dir, formats, model_name, version)
    existing = [str(p) for p in targets.values() if p.exists()]
    published_report = report_paths(out_dir, model_name, version)[0]
    if is_published(published_report):  # the version exists even where its artefacts were other formats
        existing.append(str(published_report))
    if existing and not overwrite:
        raise FileExistsError(f"already exported: {', '.join(existing)} (use another version, or overwrite)")
    log = print if verbose else _quiet
    calibrated = any(fmt in _CALIBRATED for fmt in formats)
    needs_synthetic = (calibrated and calibration_samples is None) or (check and eval_split is None)
    synthetic = default_synthetic_dataset() if needs_synthetic else None

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir, ".export-")  # staging folders of killed exports, any name or version
    staging = staging_dir(out_dir, prefix=f".export-{model_name}-v{version}-")
    try:
        calibration = None
        if calibrated:
            samples = synthetic.train if calibration_samples is None else calibration_samples
            calibration = load_images(samples, size, num_calibration)
            log(f"calibration: {len(calibration)} images")
        built = _build(model, formats, staging, feature=feature, model_name=model_name, version=version,
                       serving_dtype=serving_dtype, allow_unit_range=serving_allow_unit_range,
                       calibration=calibration, int8_io=int8_io, int8_float_ops=int8_float_ops,
                       int8_float_nodes=int8_float_nodes, int8_range_percentile=int8_range_percentile, log=log)
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
        publish = report["passed"] or not enforce
        report["artefacts"] = {fmt: str(targets[fmt]) for fmt in built} if publish else {}
        report["published"] = publish
        written = write_reports(report, out_dir, model_name, version)
        if publish:
            _publish(built, targets, staging)
            report["artefacts"].update(report=str(written[1]))
        log(format_table(report))
        if failures:
            log(("published despite failed checks:\n  " if publish else "") + "\n  ".join(failures))
        if not publish:
            raise ParityError(
                "export failed its parity checks, nothing was published (pass enforce=False / "
                "--allow-failures to publish anyway):\n  " + "\n  ".join(failures)
                + f"\nfull report: {written[1]}", report)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _targets(out_dir: Path, formats: list[str], name: str, version: int) -> dict[str, Path]:
    return {fmt: (out_dir / "serving" / name / str(version) if fmt == "saved_model"
                  else out_dir / "onnx" / f"{name}_v{version}.onnx" if fmt == "onnx"
                  else out_dir / "tflite" / f"{name}_v{version}_{fmt[len('tflite_'):]}.tflite") for fmt in formats}


def _build(model, formats, staging, *, feature, model_name, version, serving_dtype, allow_unit_range, calibration,
           int8_io, int8_float_ops, int8_float_nodes, int8_range_percentile, log) -> dict[str, tuple[Path, dict]]:
    """Write every artefact into ``staging``; returns {format: (path, extra report entries)}."""
    built = {}
    if "saved_model" in formats:
        start = time.perf_counter()
        path = write_saved_model(model, staging / "saved_model", feature=feature, model_name=model_name,
                                 serving_dtype=serving_dtype, allow_unit_range=allow_unit_range,
                                 metadata={"version": version})
        built["saved_model"] = (path, {"seconds_to_build": round(time.perf_counter() - start, 1)})
        log(f"saved_model: written in {built['saved_model'][1]['seconds_to_build']} s")
    kinds = [fmt[len("tflite_"):] for fmt in formats if fmt.startswith("tflite_")]
    if kinds or "onnx" in formats:  # the float32 SavedModel both are converted from
        source = write_tflite_source(model, staging / "tflite_source", feature)
        float32 = None  # the float32 conversion, reused by the float16 and dynamic-range models
        for kind in sorted(kinds, key=lambda k: k != "float32"):
            start = time.perf_counter()
            chosen = {}
            flatbuffer = convert_tflite(source, kind, representative_images=calibration,
                                        int8_io=int8_io and kind == "int8", float_ops=int8_float_ops,
                                        float_nodes=int8_float_nodes, range_percentile=int8_range_percentile,
                                        info=chosen, log=log, float32=float32)
            float32 = flatbuffer if kind == "float32" else float32
            path = staging / f"{kind}.tflite"
            path.write_bytes(flatbuffer)
            ops = tflite_ops(path)
            if not ops["builtin_only"]:
                raise ExportError(f"tflite_{kind} needs ops beyond LiteRT's builtins: {ops['ops']}")
            extra = {"seconds_to_build": round(time.perf_counter() - start, 1), **chosen, **ops}
            built[f"tflite_{kind}"] = (path, extra)
            log(f"tflite_{kind}: converted in {extra['seconds_to_build']} s")
        if "onnx" in formats:
            start = time.perf_counter()
            path = staging / "model.onnx"
            path.write_bytes(convert_onnx(source, feature))
            built["onnx"] = (path, {"seconds_to_build": round(time.perf_counter() - start, 1), **onnx_ops(path)})
            log(f"onnx: converted in {built['onnx'][1]['seconds_to_build']} s")
        shutil.rmtree(source, ignore_errors=True)
    return {fmt: built[fmt] for fmt in formats}


def _publish(built: dict, targets: dict, staging: Path) -> None:
    """Move each finished artefact into place (one rename each); an older one is replaced only after."""
    for fmt, (path, _) in built.items():
        target = targets[fmt]
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():  # overwrite=True: move the old version out first (a rename cannot replace it)
            os.replace(target, staging / f"old-{fmt}")
        os.replace(path, target)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _quiet(*args: Any, **kwargs: Any) -> None:
    """The log function of a quiet export (a named function: AutoGraph cannot read a lambda's source here)."""
