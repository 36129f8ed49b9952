"""What the RGA network looks at, as PNG: spatial attention (paper Fig. 1), relations (Fig. 4), Grad-CAM (Fig. 5).

Each picture is computed in two steps so that it can be checked: a function returns the maps as arrays
(`attention_maps`, `relation_to_target`, `grad_cam`), taken from the model's own layers and weights in
inference mode; a ``plot_*`` function draws them. The spatial attention shown is the exact tensor the RGA
module multiplies its features by, and the relation map is a row/column of the module's R = θφᵀ
(returned by ``RGA(..., return_maps=True)``, which forms R explicitly even on the fused path).

Every map is shown the same way (`heat_overlay`): min–max normalised over the map (each cell's label gives
the raw range), bilinearly upsampled to the image size (``tf.image.resize``, half-pixel centres), coloured by
a matplotlib colour map and blended with the image. Grids are laid out as the ranked lists are
(:func:`rga_keras.visualize.plots.ranked_list_layout`: the image, a gap, then the maps) and written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from rga_keras.files import atomic_write
from rga_keras.models import RGAReID, attention_model
from rga_keras.visualize.plots import BORDER, ranked_list_layout

MARK = (255, 255, 255)  # outline of the relation target


def _as_images(images) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch (n, height, width, 3) of RGB pixels 0-255, "
                         f"got shape {images.shape}")
    return images


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return image.clip(0, 255).round().astype(np.uint8)


def _check_model_input(model: keras.Model, images: np.ndarray) -> None:
    expected = tuple(model.input.shape[1:3])
    if tuple(images.shape[1:3]) != expected:
        raise ValueError(f"model '{model.name}' takes {expected[0]}x{expected[1]} images (a built RGA model is tied "
                         f"to its input size), got {images.shape[1]}x{images.shape[2]}")


# --------------------------------------------------------------------------- maps as arrays


def attention_maps(model: keras.Model, images) -> dict[str, dict[str, np.ndarray]]:
    """Every RGA module's maps for a batch of raw RGB images (n, H, W, 3), in inference mode.

    ``{"rga1": {"spatial_attention": (n, h, w, 1), "spatial_relation": (n, h·w, h·w), "channel_attention":
    (n, 1, 1, C), "channel_relation": (n, C, C)}, ...}`` (the keys a module's mode has), computed by
    :func:`rga_keras.models.attention_model`, i.e. by the model's own layers and weights.
    """
    images = _as_images(images)
    _check_model_input(model, images)
    maps = attention_model(model)(images, training=False)
    return {stage: {k: np.asarray(v) for k, v in stage_maps.items() if v is not None}
            for stage, stage_maps in maps.items()}


def target_node(target: Sequence[int], image_size: Sequence[int], grid: Sequence[int]) -> tuple[int, int]:
    """The (row, column) of the ``grid`` (h, w) cell holding image pixel ``target`` (row, column) of an
    image of ``image_size`` (H, W): (row·h // H, column·w // W)."""
    (row, col), (height, width), (h, w) = target, image_size, grid
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f"target must be a pixel (row, column) inside the {height}x{width} image, got {tuple(target)}")
    return int(row) * h // height, int(col) * w // width


def relation_to_target(relation, grid: Sequence[int], node: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Affinities of one node with every position (paper Fig. 4), from spatial relations R (n, N, N).

    Returns ``(outgoing, incoming)``, each (n, h, w): ``outgoing = R[t, :]`` (θ_t·φ_j, the target's relation
    to each position j) and ``incoming = R[:, t]`` (θ_j·φ_t), with t = row·w + column (raster order).
    """
    relation = np.asarray(relation)
    h, w = grid
    if relation.ndim != 3 or relation.shape[1:] != (h * w, h * w):
        raise ValueError(f"relation must be (n, {h * w}, {h * w}) for a {h}x{w} grid, got shape {relation.shape}")
    t = node[0] * w + node[1]
    return relation[:, t, :].reshape(-1, h, w), relation[:, :, t].reshape(-1, h, w)


def grad_cam(model: keras.Model, images, class_ids: Sequence[int] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grad-CAM (Selvaraju et al., ICCV 2017) on the last stage's feature map A, as in paper Fig. 5.

    The score is the identity logit y_c of class c: ``class_ids`` if given, else the predicted (arg-max)
    training identity — a query person is not a training identity, so the predicted one is the natural
    choice. Weights α_k = mean over positions of ∂y_c/∂A_k; map = ReLU(Σ_k α_k A_k), where A is the
    input of the global pooling (after the last RGA module). Returns ``(maps (n, h, w), class_ids (n,),
    scores (n,))``.
    """
    images = _as_images(images)
    _check_model_input(model, images)
    if not isinstance(model, RGAReID):
        raise ValueError(f"Grad-CAM needs an RGA re-id model (rga_keras.RGAReID), got {type(model).__name__}")
    cam_model = model.feature_map_model()
    num_classes = model.num_classes
    if class_ids is not None:
        class_ids = np.asarray(class_ids, dtype=np.int64)
        if class_ids.shape != (len(images),) or class_ids.min() < 0 or class_ids.max() >= num_classes:
            raise ValueError(f"class_ids must hold one class in [0, {num_classes}) per image, got {class_ids}")
    with tf.GradientTape() as tape:
        outputs = cam_model(tf.constant(images), training=False)
        fmap, out = outputs["feature_map"], outputs["logits"]
        fmap, out = tf.cast(fmap, tf.float32), tf.cast(out, tf.float32)
        chosen = tf.argmax(out, axis=-1) if class_ids is None else tf.constant(class_ids)
        scores = tf.gather(out, chosen, batch_dims=1)
    # Each image's score depends only on its own map, so one gradient of the sum gives all of them.
    grads = tape.gradient(scores, fmap)
    alpha = tf.reduce_mean(grads, axis=(1, 2))  # (n, C)
    maps = tf.nn.relu(tf.einsum("bhwc,bc->bhw", fmap, alpha))
    return maps.numpy(), chosen.numpy().astype(np.int64), scores.numpy()


# --------------------------------------------------------------------------- pictures


def heat_overlay(image, values, *, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """A low-resolution map (h, w) over an image (H, W, 3) as uint8 (H, W, 3).

    The map is min–max normalised (a constant map shows as 0), upsampled bilinearly to H×W
    (``tf.image.resize``), coloured with the matplotlib colour map ``cmap`` and blended:
    round((1 − alpha)·image + alpha·colour).
    """
    import matplotlib

    image, values = np.asarray(image, dtype=np.float32), np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or image.ndim != 3:
        raise ValueError(f"expected an (H, W, 3) image and an (h, w) map, got {image.shape} and {values.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    heat = tf.image.resize(scaled[:, :, None], image.shape[:2], method="bilinear").numpy()[:, :, 0]
    colour = matplotlib.colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    return np.rint((1.0 - alpha) * image + alpha * colour).clip(0, 255).astype(np.uint8)


def _range_label(name: str, values: np.ndarray) -> str:
    def short(v: float) -> str:
        return f"{v:.2g}" if abs(v) < 1000 else f"{v:.0f}"

    return f"{name} {short(values.min())}-{short(values.max())}"


def _write_grid(rows: list[list[tuple[np.ndarray, str]]], out_png, cell_size) -> Path:
    """Rows of (uint8 picture, label) cells; column 0 is set apart as in the ranked lists."""
    from PIL import Image, ImageDraw

    cell_size = tuple(cell_size or (rows[0][0][0].shape[1], rows[0][0][0].shape[0]))
    corner, size = ranked_list_layout(len(rows), len(rows[0]) - 1, cell_size)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, (picture, label) in enumerate(row):
            x, y = corner(r, c)
            cell = Image.fromarray(picture)
            canvas.paste(cell if cell.size == cell_size else cell.resize(cell_size), (x + BORDER, y + BORDER))
            draw.text((x, y + cell_size[1] + 2 * BORDER + 1), label, fill="black")
    return atomic_write(out_png, lambda tmp: canvas.save(tmp, format="PNG"))


def _stages_with(maps: dict, key: str) -> list[str]:
    stages = [stage for stage, stage_maps in maps.items() if key in stage_maps]
    if not stages:
        found = "; ".join(f"{stage}: {', '.join(sorted(m))}" for stage, m in maps.items()) or "none"
        raise ValueError(f"no RGA module has a '{key}' map (maps found: {found})")
    return stages


def plot_attention_maps(images, maps: dict, out_png: str | os.PathLike, *, cmap: str = "jet", alpha: float = 0.5,
                        cell_size: tuple[int, int] | None = None) -> Path:
    """Spatial attention of each RGA stage over the image (paper Fig. 1): one row per image,
    ``image | rga1 | rga2 | …`` for the stages with spatial attention.

    ``maps`` is :func:`attention_maps` of the same images. Each label gives the map's raw range (sigmoid
    outputs in (0, 1)); colours are min–max normalised per map (:func:`heat_overlay`). ``cell_size`` is
    (width, height) of a cell, default the image size.
    """
    images = _as_images(images)
    stages = _stages_with(maps, "spatial_attention")
    rows = []
    for i, image in enumerate(images):
        row = [(_to_uint8(image), "image")]
        for stage in stages:
            a = maps[stage]["spatial_attention"][i, :, :, 0]
            row.append((heat_overlay(image, a, cmap=cmap, alpha=alpha), _range_label(stage, a)))
        rows.append(row)
    return _write_grid(rows, out_png, cell_size)


def _outline(picture: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(picture)
    ImageDraw.Draw(canvas).rectangle(box, outline=MARK)
    return np.asarray(canvas)


def node_box(node: Sequence[int], grid: Sequence[int], image_size: Sequence[int]) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), inclusive, covered by grid cell ``node`` of an ``image_size`` image."""
    (i, j), (h, w), (height, width) = node, grid, image_size
    return j * width // w, i * height // h, (j + 1) * width // w - 1, (i + 1) * height // h - 1


def plot_relation_maps(images, maps: dict, target: Sequence[int], out_png: str | os.PathLike, *,
                       cmap: str = "jet", alpha: float = 0.5, cell_size: tuple[int, int] | None = None) -> Path:
    """Relations of one target position with all positions (paper Fig. 4): one row per image,
    ``image | rga1 t→all | rga1 all→t | rga2 …`` for the stages with spatial relations.

    ``target`` is a pixel (row, column) of the image; in each stage it selects the grid cell holding it
    (:func:`target_node`), outlined in white. "t→all" is R[t, :], "all→t" is R[:, t]
    (:func:`relation_to_target`), with ``maps`` from :func:`attention_maps` of the same images.
    """
    images = _as_images(images)
    size = images.shape[1:3]
    target_node(target, size, size)  # checks the target lies in the image
    columns = []  # (stage, node, box, outgoing, incoming) per stage
    for stage in _stages_with(maps, "spatial_relation"):
        grid = maps[stage]["spatial_attention"].shape[1:3]
        node = target_node(target, size, grid)
        outgoing, incoming = relation_to_target(maps[stage]["spatial_relation"], grid, node)
        columns.append((stage, node_box(node, grid, size), outgoing, incoming))
    rows = []
    for i, image in enumerate(images):
        row = [(_outline(_to_uint8(image),
                         (target[1] - 1, target[0] - 1, target[1] + 1, target[0] + 1)), f"target {tuple(target)}")]
        for stage, box, outgoing, incoming in columns:
            for name, values in ((f"{stage} t>all", outgoing[i]), (f"{stage} all>t", incoming[i])):
                row.append((_outline(heat_overlay(image, values, cmap=cmap, alpha=alpha), box),
                            _range_label(name, values)))
        rows.append(row)
    return _write_grid(rows, out_png, cell_size)


def plot_grad_cam(images, cams, out_png: str | os.PathLike, *, labels: Sequence[str] | None = None,
                  cmap: str = "jet", alpha: float = 0.5, cell_size: tuple[int, int] | None = None) -> Path:
    """Grad-CAM of the last stage over each image (paper Fig. 5): ``image | Grad-CAM`` per row.

    ``cams`` (n, h, w) is :func:`grad_cam`'s first output; ``labels`` (one per image) go under the
    Grad-CAM cells, e.g. the class and its logit.
    """
    images = _as_images(images)
    cams = np.asarray(cams)
    if cams.ndim != 3 or len(cams) != len(images):
        raise ValueError(f"cams must be (n, h, w) with n = {len(images)} images, got shape {cams.shape}")
    labels = list(labels) if labels is not None else ["Grad-CAM"] * len(images)
    rows = [[(_to_uint8(image), "image"),
             (heat_overlay(image, cam, cmap=cmap, alpha=alpha), label)]
            for image, cam, label in zip(images, cams, labels)]
    return _write_grid(rows, out_png, cell_size)
