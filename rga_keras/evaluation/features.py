"""Embeddings of a dataset's query and gallery images, and a model's retrieval metrics on them.

`extract_features` runs any inference model over an evaluation dataset (tf.data or Grain); `evaluate_model` is
what training (periodic evaluation), rga-eval and the export checks use: both retrieval features from one forward
pass, each ranked by `rga_keras.evaluation.metrics.evaluate` (docs/DESIGN.md §4). The images come through tf.data
on the TensorFlow backend and through Grain on the others.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

import keras
import numpy as np

from rga_keras.evaluation.metrics import evaluate
from rga_keras.models import FEATURES, embedding_model
from rga_keras.undistributed import undistributed

def extract_features(model: Any, dataset: Any, *, flip: bool = False, verbose: int = 1,
                     num_batches: int | None = None) -> tuple[np.ndarray | dict[str, np.ndarray], dict]:
    """Run an inference model (images → embeddings) over an evaluation dataset.

    ``dataset`` (a ``tf.data.Dataset`` or any iterable, e.g. `rga_keras.data.make_grain_eval_dataset`'s) yields
    ``(images, {"person_id", "camera_id", "path"})`` batches. A model with a dict of embedding outputs (e.g.
    ``{"after_bn": ..., "before_bn": ...}``) gives a dict of features keyed the same, all from one forward pass
    per batch. With ``flip=True`` the feature is the mean of the image's and its horizontal mirror's, the usual
    flip test-time augmentation. A ``keras.utils.Progbar`` shows progress (``verbose=0`` hides it); its length is
    the dataset's cardinality or, where that is unknown (e.g. after the pipeline's corrupt-image filter),
    ``num_batches``.

    Returns ``(features (n, d) float32 (or a dict of them), {"person_id": int64 (n,), "camera_id": int64 (n,),
    "path": str (n,)})``.
    """
    spec = getattr(dataset, "element_spec", None)
    if spec is not None:  # tf.data: its structure is known before the first batch
        if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict)):
            raise TypeError("dataset must be an evaluation dataset yielding (images, {'person_id', 'camera_id', "
                            f"'path'}}), got element_spec {spec!r}")
        if len(spec[0].shape) != 4:
            raise ValueError(f"dataset images must be batched (batch, height, width, channels), got {spec[0].shape}")
    cardinality = int(dataset.cardinality()) if spec is not None else -1
    progbar = keras.utils.Progbar(cardinality if cardinality >= 0 else num_batches, verbose=verbose,
                                  unit_name="batch")

    def embed(images) -> dict:
        out = model.predict_on_batch(images)  # Keras compiles and caches the inference step
        named = out if isinstance(out, dict) else {None: out}
        for value in named.values():
            if not (isinstance(value, np.ndarray) and value.ndim == 2):
                raise ValueError(
                    "model must map a batch of images to (batch, dim) embedding tensors (one, or a dict of them), "
                    f"got {type(value).__name__} {getattr(value, 'shape', '')}"
                )
        return {k: v.astype(np.float32, copy=False) for k, v in named.items()}

    batches, ids, cams, paths = [], [], [], []
    for images, meta in dataset:
        missing = {"person_id", "camera_id", "path"} - set(meta)
        if missing:
            raise ValueError(f"dataset metadata lacks keys {sorted(missing)}; it has {sorted(meta)}")
        images = np.asarray(images)
        feature = embed(images)
        if flip:
            mirror = embed(images[:, :, ::-1])
            feature = {k: (v + mirror[k]) / 2.0 for k, v in feature.items()}
        batches.append(feature)
        ids.append(np.asarray(meta["person_id"]))
        cams.append(np.asarray(meta["camera_id"]))
        paths.extend(p.decode() if isinstance(p, bytes) else str(p) for p in np.asarray(meta["path"]))
        progbar.add(1)
    progbar.update(len(batches), finalize=True)
    if not batches:
        raise ValueError("dataset is empty: no images to extract features from")
    meta = {
        "person_id": np.concatenate(ids).astype(np.int64),
        "camera_id": np.concatenate(cams).astype(np.int64),
        "path": np.asarray(paths, dtype=str),
    }
    features = {k: np.concatenate([batch[k] for batch in batches]) for k in batches[0]}
    return features.get(None, features), meta  # a single-output model: the array itself


def eval_dataset(samples, image_size: tuple[int, int], batch_size: int, workers: int | None = None) -> Any:
    """Evaluation batches of ``samples`` (`rga_keras.data.make_eval_dataset`'s) through tf.data on the TensorFlow
    backend, through Grain with ``workers`` processes (default: one per core) on the others."""
    if keras.backend.backend() == "tensorflow":
        from rga_keras.data.pipeline import make_eval_dataset

        return make_eval_dataset(samples, image_size=image_size, batch_size=batch_size)
    from rga_keras.data.grain_pipeline import make_grain_eval_dataset

    return make_grain_eval_dataset(samples, image_size=image_size, batch_size=batch_size, workers=workers)


@contextlib.contextmanager
def on_one_device(model: keras.Model) -> Iterator[keras.Model]:
    """The model to run inference with: ``model`` itself, or, while a Keras distribution is set (several devices
    or processes on JAX), a copy of it with the same weights, run with no distribution set
    (`rga_keras.undistributed`). So any batch size runs, in this process alone, and nothing of the training model
    changes. The copy is made once per model; its weights are refreshed at each use."""
    if keras.distribution.distribution() is None:
        yield model
        return
    with undistributed():
        copy = _ONE_DEVICE.get(model)
        if copy is None:
            copy = _ONE_DEVICE[model] = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
        yield copy


_ONE_DEVICE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INFERENCE_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def eval_features(config: dict, feature: str | None = None) -> tuple[str, ...]:
    """The retrieval features to evaluate: ``feature`` alone if given, else both with the config's
    ``eval.feature`` (the one that selects best.keras and is exported) first."""
    if feature is not None:
        return (feature,)
    first = config["eval"]["feature"]
    return (first, *(f for f in FEATURES if f != first))



def query_gallery_features(model: keras.Model, dataset, config: dict, verbose: int = 0,
                           features: tuple[str, ...] | None = None) -> tuple:
    """Retrieval features of the query and gallery images as the config's eval section says:
    ``((query_features, query_meta), (gallery_features, gallery_meta))``, meta as `extract_features` gives.

    The features are the config's ``eval.feature`` as an (n, d) array, or with ``features`` (names from
    ``after_bn``, ``before_bn``) a dict {name: (n, d) array}, all from one forward pass per batch."""
    ev = config["eval"]
    # One inference model per (model, features), reused by every evaluation of a training run: Keras traces
    # its predict step once per batch shape instead of on every evaluation (TF warned about the retracing).
    cached = _INFERENCE_MODELS.setdefault(model, {})
    key = features if features is not None else ev["feature"]
    if key not in cached:
        cached[key] = embedding_model(model, key) if features is None else keras.Model(
            model.input, {f: embedding_model(model, f).output for f in features}, name=f"{model.name}_embeddings")
    size = tuple(config["model"]["input_size"])

    def extract(embed, samples):
        batch = min(int(ev["batch_size"]), len(samples))  # a larger batch only costs memory
        ds = eval_dataset(samples, size, batch, workers=config.get("sampler", {}).get("workers"))
        return extract_features(embed, ds, flip=ev["flip"], verbose=verbose, num_batches=-(-len(samples) // batch))

    dataset.require(("query", "gallery"), "evaluation")
    with on_one_device(cached[key]) as embed:
        return extract(embed, dataset.query), extract(embed, dataset.gallery)



def evaluate_model(model: keras.Model, dataset, config: dict, verbose: int = 0,
                   features: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Rank-1/5/10, mAP and mINP of ``model`` on the dataset's query/gallery split (docs/DESIGN.md §4), per
    retrieval feature: ``{feature: evaluate()'s dict}`` for ``features`` (default `eval_features`: both,
    ``eval.feature`` first). One forward pass serves every feature; each costs only its ranking. Each result also
    counts the images evaluated (``num_query_images``, ``num_gallery_images``: unreadable ones are left out)."""
    ev = config["eval"]
    features = features or eval_features(config)
    (qf, q), (gf, g) = query_gallery_features(model, dataset, config, verbose, features)
    results = {}
    for name in features:
        result = evaluate(qf[name], gf[name], q["person_id"], g["person_id"], q["camera_id"], g["camera_id"],
                          metric=ev["metric"], rerank=ev["rerank"])
        results[name] = {k: (float(v) if np.isscalar(v) else v) for k, v in result.items()}
        results[name].update(num_query_images=len(q["path"]), num_gallery_images=len(g["path"]))
    return results

