"""Embed image files with an `Embedder`: decoded and resized as the evaluation pipeline does, in batches,
with optional flip test-time augmentation; unreadable files and corrupt JPEGs (`rga_keras.data.image_check`)
are skipped and reported, never fatal; embeddings that cannot be used are refused, never written."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rga_keras.evaluation.feature_check import refuse_faulty
from rga_keras.retrieval.models import Embedder
from rga_keras.retrieval.topk import unit_rows


def embed_images(
    embedder: Embedder,
    paths: Sequence[str],
    *,
    batch_size: int = 64,
    flip: bool = False,
    verbose: int = 1,
) -> tuple[np.ndarray, list[str], list[str]]:
    """Embed the images at ``paths``: returns ``(features, embedded, skipped)``.

    features: float32 (n, d), L2-normalised, one row per path of ``embedded`` (``paths`` in order, without
    the ``skipped`` ones: missing or undecodable files, and JPEGs that decode only with libjpeg's "Corrupt JPEG
    data" warning). flip=True: the normalised mean of the image's and its
    mirror's embeddings. Images are read and resized by parallel `tf.data` workers
    (`rga_keras.data.make_eval_dataset`); a ``keras.utils.Progbar`` counts images (``verbose=0`` hides it).
    ValueError when no image can be read, or when the embeddings are not usable (NaN/Inf or all-zero rows, a
    collapsed set: `rga_keras.evaluation.feature_check`), naming the first image of each fault.
    """
    import keras

    from rga_keras.data import CorruptImages, make_eval_dataset
    from rga_keras.data.image_check import find_corrupt

    if not paths:
        raise ValueError("no images to embed")
    corrupt = find_corrupt(paths)
    if len(corrupt) == len(paths):
        raise ValueError(f"none of the {len(paths)} images could be read (the first, {paths[0]}: {corrupt[paths[0]]})")
    dataset = make_eval_dataset([(p, 0, 0) for p in paths if p not in corrupt], image_size=embedder.input_size,
                                batch_size=batch_size, corrupt_log=CorruptImages())
    progbar = keras.utils.Progbar(len(paths), verbose=verbose, unit_name="image")
    position = {path: i for i, path in enumerate(paths)}  # progress counts skipped images as done
    features, embedded = [], []
    for images, meta in dataset:
        pixels = images.numpy()
        vectors = embedder(pixels)
        if flip:
            vectors = unit_rows(vectors + embedder(pixels[:, :, ::-1]))
        features.append(vectors)
        embedded.extend(p.decode() for p in meta["path"].numpy())
        progbar.update(position[embedded[-1]] + 1)
    if embedded and position[embedded[-1]] + 1 < len(paths):
        progbar.update(len(paths))
    if not embedded:
        raise ValueError(f"none of the {len(paths)} images could be read")
    features = np.concatenate(features)
    refuse_faulty(features, "embeddings", embedded, hint=f"the model {embedder.path} does not give usable "
                  "embeddings (damaged or diverged weights?); nothing was written")
    done = set(embedded)
    return features, embedded, [path for path in paths if path not in done]
