"""The export formats, one record each: the artefact's file name, the module that builds and runs it, the
thresholds it is checked against, and whether it is calibrated on images (docs/EXPORT.md).

Every format belongs to a file format — ``saved_model``, ``tflite``, ``onnx`` — whose module under
``rga_keras.export`` provides ``build(fmt, job) -> (path, report entries)``, writing the artefact into the job's
staging folder, and ``load(path, num_threads) -> Runner``, which the parity checks, the report and the retrieval
programs all run artefacts with. Adding a format is one line in `FORMATS` (and, for a new file format, one module).
The modules are imported when a format is built or loaded: this table, which configs and programs check names
against, needs neither TensorFlow nor a runtime.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np

FILE_FORMATS = ("saved_model", "tflite", "onnx")

# Parity thresholds per artefact: per-image cosine similarity to the Keras embedding and, for quantised
# artefacts, the largest allowed |mAP - Keras mAP| in points. Every artefact is judged on its worst image
# ("cosine_min"): a mean can hide images whose embedding is useless. Quantised artefacts are also judged on
# the mean (their typical error) and on mAP. Their worst-image bar, 0.95, keeps each embedding within 18° of
# the Keras one (docs/EXPORT.md, "Parity report", says why this value). A float artefact whose every
# embedding is within its cosine bar can change a ranking only where two gallery distances nearly tie; on a
# small split of a barely trained model (distances within 1e-3 of each other) float32 rounding alone then
# moved mAP by more than a point, so for float artefacts mAP is reported, not judged.
FLOAT32 = {"cosine_min": 0.9999}
QUANTISED = {"cosine_mean": 0.98, "cosine_min": 0.95, "max_map_diff": 1.0}


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One export format: ``name`` (what programs and configs say), its ``file_format`` (the module that builds
    and runs it), the ``variant`` that module makes (TFLite's kind), the artefact's ``path`` under the export
    folder ({name} and {version} filled in), its ``thresholds``, and whether it is ``calibrated`` on images."""

    name: str
    file_format: str
    path: str
    thresholds: dict[str, float]
    description: str
    variant: str | None = None
    calibrated: bool = False

    def target(self, out_dir: str | os.PathLike, model_name: str, version: int) -> Path:
        """Where the published artefact goes."""
        return Path(out_dir) / self.path.format(name=model_name, version=version)

    def module(self) -> ModuleType:
        """The module that builds and loads this format (imported now: it needs TensorFlow or a runtime)."""
        return file_format_module(self.file_format)


def _tflite(kind: str, thresholds: dict, description: str, calibrated: bool = False) -> ExportFormat:
    return ExportFormat(f"tflite_{kind}", "tflite", f"tflite/{{name}}_v{{version}}_{kind}.tflite", thresholds,
                        description, variant=kind, calibrated=calibrated)


FORMATS: dict[str, ExportFormat] = {fmt.name: fmt for fmt in (
    ExportFormat("saved_model", "saved_model", "serving/{name}/{version}", FLOAT32,
                 "TF Serving SavedModel: serving_default (images) and serve_image_bytes (JPEG/PNG) signatures"),
    _tflite("float32", FLOAT32, "TFLite, float32"),
    _tflite("float16", {"cosine_min": 0.999}, "TFLite, float16 weights"),
    _tflite("dynamic", QUANTISED, "TFLite, int8 weights and float activations; the ops that help most keep "
                                  "float32 weights", calibrated=True),
    _tflite("int8", QUANTISED, "TFLite, int8 weights and activations, selected ops in float32", calibrated=True),
    _tflite("int8_full", QUANTISED, "TFLite, full-integer int8 (no float op: for edge accelerators)",
            calibrated=True),
    _tflite("int16x8", QUANTISED, "TFLite, int16 activations and int8 weights", calibrated=True),
    ExportFormat("onnx", "onnx", "onnx/{name}_v{version}.onnx", FLOAT32,
                 "ONNX, opset 17, for ONNX Runtime and TensorRT"),
)}
# What an export makes unless told otherwise: the formats that pass their checks on the README demo model
# (docs/EXPORT.md); the other quantised models are made on request.
DEFAULT_FORMATS = ("saved_model", "tflite_float32", "tflite_float16", "tflite_dynamic", "onnx")


@dataclasses.dataclass
class BuildJob:
    """What every format's ``build`` gets: the model, the export's settings, a staging folder, the calibration
    images (raw pixels, or None), and the intermediates several formats share, made once (`once`)."""

    model: Any
    feature: str
    model_name: str
    version: int
    staging: Path
    calibration: np.ndarray | None
    options: dict[str, Any]
    log: Callable[[str], None]
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``'s result, computed on the first call for ``key`` and reused after."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]


@dataclasses.dataclass(frozen=True)
class Runner:
    """A loaded artefact: ``run(images)`` maps raw RGB pixels 0–255 (n, H, W, 3) float32 to embeddings (n, d).

    ``input_size`` (H, W) and ``feature`` where the artefact says (None otherwise); ``uint8_input``: it takes its
    pixels as uint8, so it sees them rounded (its reference is the Keras model on the same rounded pixels)."""

    run: Callable[[np.ndarray], np.ndarray]
    input_size: tuple[int, int] | None
    feature: str | None
    uint8_input: bool = False


def file_format_module(file_format: str) -> ModuleType:
    """The module of a file format (`FILE_FORMATS`): ``build`` and ``load``."""
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file format must be one of {FILE_FORMATS}, got {file_format!r}")
    return importlib.import_module(f"rga_keras.export.{file_format}")


def file_format_of(path: str | os.PathLike) -> str | None:
    """The file format of an artefact at ``path`` by its name (a SavedModel is a folder holding saved_model.pb),
    or None for anything else."""
    path = Path(path)
    if path.is_dir():
        return "saved_model" if (path / "saved_model.pb").is_file() else None
    suffix = path.suffix.lower()[1:]
    return suffix if suffix in ("tflite", "onnx") else None
