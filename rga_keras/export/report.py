"""The export report: settings and versions, the text table the programs print, and the JSON/Markdown files."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import keras
import tensorflow as tf

from rga_keras.export.formats import FORMATS
from rga_keras.cores import available_cores
from rga_keras.export.tflite import INT8_MAX_STEP_ERROR
from rga_keras.files import write_text_atomic


def describe_settings(formats, calibration, int8_io, int8_float_ops, int8_float_nodes, int8_range_percentile,
                      serving_dtype, num_threads, latency_runs) -> dict:
    """The export's settings, machine and package versions, for the report."""
    import importlib.metadata as metadata

    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {
        "formats": formats, "serving_dtype": serving_dtype,
        "calibration_images": None if calibration is None else len(calibration),
        "int8_io": int8_io, "int8_float_ops": list(int8_float_ops),
        "int8_float_nodes": int8_float_nodes if isinstance(int8_float_nodes, str) else list(int8_float_nodes),
        "int8_range_percentile": int8_range_percentile,
        "latency": {"batch": 1, "runs": latency_runs, "tflite_threads": num_threads or available_cores(),
                    "statistic": "median", "interleaved": True},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": available_cores()},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "ai-edge-litert": version("ai-edge-litert"),
                     "tf2onnx": version("tf2onnx"), "onnxruntime": version("onnxruntime")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def report_paths(out_dir: Path, name: str, version: int, failed: bool = False) -> tuple[Path, Path]:
    """The JSON and Markdown report of ``name`` version ``version`` (``failed``: of a rejected re-export)."""
    stem = f"{name}_v{version}_export_report" + (".failed" if failed else "")
    return out_dir / f"{stem}.json", out_dir / f"{stem}.md"


def is_published(report_json: Path) -> bool:
    """Whether ``report_json`` is the report of an export that published its artefacts."""
    try:
        return json.loads(report_json.read_text(encoding="utf-8")).get("published") is True
    except (OSError, ValueError, AttributeError):
        return False


def write_reports(report: dict, out_dir: Path, name: str, version: int) -> tuple[Path, Path]:
    """The report as JSON and Markdown (`report_paths`), each written atomically. The report of an export that
    published nothing never replaces a published version's: it goes to the ``.failed`` names then, and a
    publishing export removes a stale ``.failed`` report."""
    paths = report_paths(out_dir, name, version)
    if report["published"]:
        for stale in report_paths(out_dir, name, version, failed=True):
            stale.unlink(missing_ok=True)
    elif is_published(paths[0]):
        paths = report_paths(out_dir, name, version, failed=True)
    for path, text in zip(paths, (json.dumps(report, indent=2), report_markdown(report))):
        write_text_atomic(path, text)
    return paths


def _rows(report: dict) -> list[list[str]]:
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}"

    ref = report.get("reference")
    rows = []
    if ref:
        rows.append(["keras (float32)", "–", "–", "–", pct(ref["rank1"]), f"{100 * ref['mAP']:.2f}", "–",
                     f"{ref['latency_ms']['median_ms']:.1f}", "1.00×", "reference"])
    for fmt, c in report["checks"].items():
        checked = "cosine_mean" in c
        rows.append([
            fmt, f"{c['size_bytes'] / 2**20:.1f}",
            f"{c['cosine_mean']:.5f}" if checked else "–", f"{c['cosine_min']:.5f}" if checked else "–",
            pct(c.get("rank1")), f"{100 * c['mAP']:.2f}" if checked else "–",
            f"{c['map_diff_points']:+.2f}" if checked else "–",
            f"{c['latency_ms']['median_ms']:.1f}" if checked else "–",
            f"{c['speedup_vs_keras']:.2f}×" if checked else "–",
            ("ok" if c["passed"] else "FAILED") if checked else "not checked",
        ])
    return rows


_HEADER = ["artefact", "size MiB", "cos mean", "cos min", "Rank-1", "mAP", "ΔmAP", "latency ms", "speed-up", "check"]


def format_table(report: dict) -> str:
    """The report as a fixed-width text table (latency: median at batch 1, CPU)."""
    rows = [_HEADER] + _rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _range_text(check: dict, setting: float | str) -> str:
    if "range_percentile" not in check:
        return str(setting)
    tried = ", ".join(f"{p:g}: {c:.4f}" for p, c in check["calibration_cosine"].items())
    return (f"percentile {check['range_percentile']:g} of the per-image extremes"
            + (f" (chosen by mean cosine on the calibration images: {tried})" if tried else ""))


def _counts(ops: dict) -> str:
    return ", ".join(f"{name} ×{count}" for name, count in ops.items()) or "none"


def _calibration_lines(report: dict) -> list[str]:
    """What each calibrated artefact was calibrated on, its activation ranges and what it keeps in float32."""
    s, lines = report["settings"], []
    for fmt, check in report["checks"].items():
        if fmt == "tflite_int16x8":
            lines += ["", f"{fmt}: calibrated on {s['calibration_images']} images (TFLite's min/max ranges, int16 "
                          f"activations); ops computing float32: {', '.join(check['float_ops']) or 'none'}."]
        if fmt == "tflite_dynamic" and "float_weight_ops" in check:
            ops, error = check["float_weight_ops"], check["calibration_error"]
            lines += ["", f"{fmt}: int8 weights; ops given their float32 weights back, chosen by their gain on the "
                          f"{check['calibration_worst_images']} of {s['calibration_images']} calibration images "
                          f"furthest from the float32 model (mean 1 - cosine {error['before']:.5f} -> "
                          f"{error['after']:.5f}; size budget {check['size_budget_bytes']} bytes): "
                          f"{len(ops) or 'none'}"]
            lines += [f"- `{o['tensor']}` ({o['op']}, {o['weights']} weights, gain {o['gain']:.2e})" for o in ops]
        if fmt not in ("tflite_int8", "tflite_int8_full"):
            continue
        lines += ["", f"{fmt}: calibrated on {s['calibration_images']} images; activation ranges: "
                      f"{_range_text(check, s['int8_range_percentile'])}; ops computing float32: "
                      f"{', '.join(check['float_ops']) or 'none'}; integer input/output: "
                      f"{fmt == 'tflite_int8_full' or s['int8_io']}; ops XNNPACK leaves to LiteRT's own kernels: "
                      f"{_counts(check.get('outside_xnnpack', {}))}."]
        if fmt == "tflite_int8":
            nodes = check.get("float_nodes", [])
            lines += [f"Ops kept in float32 by type: {', '.join(s['int8_float_ops']) or 'none'}. Nodes kept in "
                      f"float32 by their own error (QuantizationDebugger on the calibration images, RMSE above "
                      f"{INT8_MAX_STEP_ERROR} int8 steps): {len(nodes) or 'none'}"]
            lines += [f"- `{n['tensor']}` ({n['op']}, {n['step_error']:.2f} steps)" if n["step_error"] is not None
                      else f"- `{n['tensor']}` (given)" for n in nodes]
    return lines


def failed_checks(report: dict) -> list[str]:
    """Every missed threshold of the report, one "artefact: what" line each, in artefact order."""
    return [f"{fmt}: {msg}" for fmt, check in report["checks"].items() for msg in check.get("failures", [])]


def report_markdown(report: dict) -> str:
    """The report as Markdown: model, settings, the table, thresholds and failures."""
    m, s = report["model"], report["settings"]
    lines = [
        f"# Export report: {m['name']} v{m['version']}", "",
        f"Model `{m['keras_name']}`, input {m['input_size'][0]}×{m['input_size'][1]}, feature `{m['feature']}` "
        f"(L2-normalised, {m['embedding_dim']}-d), RGA {m['rga'] or 'none (baseline)'}, relation path "
        f"`{m['relation']}`, {m['parameters']:,} parameters.", "",
        f"Created {s['created']} on {s['machine']['platform']} ({s['machine']['cpus']} CPUs); TensorFlow "
        f"{s['versions']['tensorflow']}, Keras {s['versions']['keras']}, LiteRT {s['versions']['ai-edge-litert']}.",
    ]
    if "eval_images" in s:
        lines += ["", f"Parity and retrieval on {s['eval_images']['query']} query / {s['eval_images']['gallery']} "
                      f"gallery images; latency: median of {s['latency']['runs']} runs at batch 1 on the CPU, "
                      f"interleaved across artefacts (TFLite and ONNX Runtime with "
                      f"{s['latency']['tflite_threads']} threads)."]
    lines += _calibration_lines(report)
    lines += ["", "| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    lines += ["", "Thresholds: " + "; ".join(
        f"{fmt} " + ", ".join(f"{k} {v}" for k, v in FORMATS[fmt].thresholds.items()) for fmt in report["checks"])
        + "."]
    failures = [f"- {line}" for line in failed_checks(report)]
    lines += ["", "**Failed checks:**", *failures] if failures else []
    if report.get("artefacts"):
        lines += ["", "Artefacts:", *[f"- {k}: `{v}`" for k, v in report["artefacts"].items()]]
    return "\n".join(lines) + "\n"
