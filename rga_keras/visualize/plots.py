"""Pictures of re-id results, written as PNG: ranked lists, search results and training curves (what the network attends
to: `rga_keras.visualize.attention_maps`).

Files are written atomically (a temporary file in the target folder, then ``os.replace``), so a
half-written PNG never appears under the final name.
"""
from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from rga_keras.data.samples import spread_indices
from rga_keras.evaluation.metrics import rank_gallery
from rga_keras.files import atomic_write
from rga_keras.reading import read_json, read_text

GREEN = (0, 170, 0)  # frame of a true match
RED = (220, 0, 0)  # frame of a false match
BLUE = (40, 90, 220)  # frame of the query
GREY = (150, 150, 150)  # frame of a search result (no identity to judge it by)
BORDER = 4  # frame width, pixels
PAD = 4  # space around and between cells
GAP = 16  # extra space between the query and its ranked list
LABEL_HEIGHT = 14  # text strip under each cell
CURVE_PANEL_INCHES, CURVE_DPI = (4.0, 3.5), 100


def ranked_list_layout(num_rows: int, top_k: int, cell_size: tuple[int, int]) -> tuple[Callable, tuple[int, int]]:
    """Geometry of :func:`plot_ranked_lists`: ``(corner, (width, height))``.

    ``corner(row, column)`` is the top-left pixel (x, y) of a framed cell; column 0 is the query,
    column k ≥ 1 the rank-k gallery image. A framed cell is (cell_w + 2·BORDER) × (cell_h + 2·BORDER)
    pixels, the image sitting BORDER pixels inside the frame.
    """
    frame_w, frame_h = cell_size[0] + 2 * BORDER, cell_size[1] + 2 * BORDER
    row_h = frame_h + LABEL_HEIGHT + PAD

    def corner(row: int, column: int) -> tuple[int, int]:
        return PAD + column * (frame_w + PAD) + (GAP if column else 0), PAD + row * row_h

    return corner, (PAD + (top_k + 1) * (frame_w + PAD) + GAP, PAD + num_rows * row_h)


def _load_image(path: Any, cell_size: tuple[int, int]):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB").resize(cell_size)
    except UnidentifiedImageError as err:
        raise ValueError(f"cannot read image {path!s}: {err}") from None


def plot_ranked_lists(
    query_paths: Sequence[Any],
    gallery_paths: Sequence[Any],
    distances: Any,
    query_ids: Any,
    gallery_ids: Any,
    query_cams: Any,
    gallery_cams: Any,
    out_png: str | os.PathLike,
    *,
    top_k: int = 10,
    num_queries: int = 8,
    query_indices: Sequence[int] | None = None,
    cell_size: tuple[int, int] = (64, 128),
    junk_id: int | None = -1,
) -> Path:
    """One row per query: the query (blue frame) and its top-k gallery images, true matches framed
    green and false ones red, ranked as :func:`rga_keras.evaluation.evaluate` ranks them (same-id
    same-camera and ``junk_id`` images removed, ties in gallery order).

    ``distances`` is (num_query, num_gallery). Queries shown: ``query_indices`` if given, else
    ``num_queries`` spread evenly over the query set. Labels: the query's id and camera; each
    gallery image's rank and distance. ``cell_size`` is (width, height) of every image.
    Geometry: :func:`ranked_list_layout`. Returns the PNG path.
    """
    distances = np.asarray(distances, dtype=np.float32)
    nq, ng = len(query_paths), len(gallery_paths)
    if distances.shape != (nq, ng):
        raise ValueError(f"distances must be (num_query, num_gallery) = ({nq}, {ng}), got {distances.shape}")
    labels = [np.asarray(x) for x in (query_ids, query_cams, gallery_ids, gallery_cams)]
    for name, arr, n in zip(("query_ids", "query_cams", "gallery_ids", "gallery_cams"), labels, (nq, nq, ng, ng)):
        if arr.shape != (n,):
            raise ValueError(f"{name} must have {n} entries (one per path), got shape {arr.shape}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    rows = _shown_queries(nq, num_queries, query_indices)
    qid, qcam, gid, gcam = labels
    order, kept, match = rank_gallery(distances[rows], qid[rows], qcam[rows], gid, gcam, junk_id)
    lines = []
    for r, q in enumerate(rows):
        shown = order[r][kept[r]][:top_k]
        cells = [(gallery_paths[g], GREEN if true else RED, f"{k}: {distances[q, g]:.3f}")
                 for k, (g, true) in enumerate(zip(shown, match[r][kept[r]][:top_k]), start=1)]
        lines.append((query_paths[q], f"id {qid[q]} c{qcam[q]}", cells))
    return draw_ranked_rows(lines, out_png, top_k=top_k, cell_size=cell_size)


def plot_search_results(
    query_paths: Sequence[Any],
    gallery_paths: Sequence[Any],
    indices: Any,
    similarities: Any,
    out_png: str | os.PathLike,
    *,
    num_queries: int = 8,
    query_indices: Sequence[int] | None = None,
    cell_size: tuple[int, int] = (64, 128),
) -> Path:
    """One row per query: the query (blue frame) and its ranked gallery images as
    :func:`rga_keras.retrieval.search` returns them (``indices``, ``similarities``: (num_query, k)), framed
    grey (no identities: nothing to judge right or wrong) and labelled with rank and cosine similarity.
    Queries shown as in :func:`plot_ranked_lists`. Returns the PNG path."""
    indices, similarities = np.asarray(indices), np.asarray(similarities)
    nq = len(query_paths)
    if indices.ndim != 2 or indices.shape[0] != nq or similarities.shape != indices.shape:
        raise ValueError(f"indices and similarities must both be (num_query, k) with num_query = {nq}, got "
                         f"{indices.shape} and {similarities.shape}")
    rows = _shown_queries(nq, num_queries, query_indices)
    lines = [(query_paths[q], Path(str(query_paths[q])).name[:12],
              [(gallery_paths[g], GREY, f"{k}: {s:.3f}")
               for k, (g, s) in enumerate(zip(indices[q], similarities[q]), start=1)]) for q in rows]
    return draw_ranked_rows(lines, out_png, top_k=max(indices.shape[1], 1), cell_size=cell_size)


def _shown_queries(num_query: int, num_queries: int, query_indices: Sequence[int] | None) -> np.ndarray:
    """``query_indices`` checked, or ``num_queries`` indices spread over the queries."""
    if query_indices is None:
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        query_indices = spread_indices(num_query, num_queries)
    rows = np.asarray(query_indices, dtype=int)
    if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= num_query:
        raise ValueError(f"query_indices must be a non-empty list of indices below {num_query}, got {list(rows)}")
    return rows


def draw_ranked_rows(
    rows: Sequence[tuple[Any, str, Sequence[tuple[Any, tuple[int, int, int], str]]]],
    out_png: str | os.PathLike,
    *,
    top_k: int,
    cell_size: tuple[int, int] = (64, 128),
) -> Path:
    """Draw ranked lists as PNG: each row is ``(query_path, query_label, cells)`` and each cell
    ``(image_path, frame_colour, label)``, at most ``top_k`` of them; the query is framed blue.
    Geometry: :func:`ranked_list_layout`. Returns the PNG path."""
    from PIL import Image, ImageDraw

    corner, size = ranked_list_layout(len(rows), top_k, cell_size)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    frame = (cell_size[0] + 2 * BORDER - 1, cell_size[1] + 2 * BORDER - 1)

    def put(row, column, path, colour, text):
        x, y = corner(row, column)
        draw.rectangle([x, y, x + frame[0], y + frame[1]], fill=colour)
        canvas.paste(_load_image(path, cell_size), (x + BORDER, y + BORDER))
        draw.text((x, y + frame[1] + 2), text, fill="black")

    for r, (query_path, query_label, cells) in enumerate(rows):
        put(r, 0, query_path, BLUE, query_label)
        for k, (path, colour, text) in enumerate(cells[:top_k], start=1):
            put(r, k, path, colour, text)
    return atomic_write(out_png, lambda tmp: canvas.save(tmp, format="PNG"))


def read_history(history: dict | str | os.PathLike) -> dict[str, np.ndarray]:
    """Training log as ``{name: float array over epochs}``.

    Accepts a dict of lists (``keras.callbacks.History.history``), a JSON file holding such a dict
    or a list of per-epoch dicts, or a CSV file with a header row (``keras.callbacks.CSVLogger``).
    Missing or non-numeric entries become NaN.
    """
    if not isinstance(history, dict):
        path = Path(history)
        if path.suffix.lower() == ".json":
            history = read_json(path)
            if isinstance(history, list) and all(isinstance(rec, dict) for rec in history):
                records = history
                keys = dict.fromkeys(k for rec in records for k in rec)
                history = {k: [rec.get(k) for rec in records] for k in keys}
        elif path.suffix.lower() == ".csv":
            records = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
            history = {k: [rec.get(k) for rec in records] for k in (records[0] if records else {})}
        else:
            raise ValueError(f"training log must be a .json or .csv file, got {path}")
        if not isinstance(history, dict):
            raise ValueError(f"{path} must hold a dict of per-epoch lists or a list of per-epoch dicts")

    def number(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            return np.nan

    return {str(k): np.array([number(v) for v in np.atleast_1d(values)]) for k, values in history.items()}


def _normalise(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


# Panel title and which (normalised) log names it shows: "loss", "val_loss", "triplet_loss";
# "rank1", "val_rank-1", "top1"; "mAP", "val_mAP".
_PANELS = (
    ("Loss", lambda k: "loss" in k),
    ("Rank-1", lambda k: "rank1" in k or "top1" in k),
    ("mAP", lambda k: k.endswith("map")),
)


def plot_training_curves(history: dict | str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Loss, Rank-1 and mAP over epochs, one panel per kind present in the log (see :func:`read_history`).

    The x axis is the log's "epoch" column when present, else 1, 2, …. Values logged only on some
    epochs (NaN elsewhere) are drawn as points joined over the gaps. The PNG is
    (400 × panels) × 350 pixels. Raises ValueError when the log has none of the three kinds.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = read_history(history)
    panels = [(title, [k for k in series if k != "epoch" and wanted(_normalise(k))]) for title, wanted in _PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        raise ValueError(f"training log has no loss, Rank-1 or mAP entries; its keys are {sorted(series)}")
    length = max(len(v) for v in series.values())
    epochs = series.get("epoch", np.arange(1, length + 1))

    fig = Figure(figsize=(CURVE_PANEL_INCHES[0] * len(panels), CURVE_PANEL_INCHES[1]), dpi=CURVE_DPI,
                 layout="constrained")
    for ax, (title, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for key in keys:
            values = series[key]
            ok = np.isfinite(values)
            ax.plot(epochs[: len(values)][ok], values[ok], marker="." if ok.sum() < 30 else None, label=key)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=CURVE_DPI))
