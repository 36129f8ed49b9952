"""Checks and set-ups several test files share, so each is written once."""
from __future__ import annotations

import keras
import numpy as np

from rga_keras import RGAReID, RGAResNetBackbone
from tests.backend import to_numpy

# rga-train options for a small ResNet (one bottleneck per stage, widths 8–64): for tests whose subject is the
# program's logic (resuming, distribution, bad input), not the full-size network's numbers.
SMALL_RESNET = ["-o", "model.stage_blocks=[1, 1, 1, 1]", "-o", "model.stage_widths=[8, 16, 32, 64]"]


def small_rga_resnet(num_classes: int, attention: str | None = "sc", input_shape=(64, 32, 3), *,
                     stage_widths=(8, 16, 32, 64), name: str | None = None, **backbone_options) -> RGAReID:
    """`SMALL_RESNET` in code: the re-id network over the RGA ResNet with one bottleneck per stage, for tests of
    logic (programs, formats, saving) rather than of the full-size network's numbers. ``backbone_options`` go to
    `RGAResNetBackbone` (e.g. ``rga_stages``); ``name`` names the task and, with "_backbone", its backbone."""
    backbone = RGAResNetBackbone(attention, input_shape, stage_blocks=(1, 1, 1, 1), stage_widths=stage_widths,
                                 **({"name": f"{name}_backbone"} if name else {}), **backbone_options)
    return RGAReID(backbone, num_classes, **({"name": name} if name else {}))


def unit(x) -> np.ndarray:
    """Rows scaled to unit length, in float64."""
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def randomise_batchnorms(model: keras.layers.Layer, rng: np.random.Generator, spread: float = 0.2) -> None:
    """Every BatchNorm inside ``model`` given random parameters and moving statistics, as a trained network
    has (a fresh one computes the identity, which hides mistakes)."""
    for bn in model._flatten_layers():
        if isinstance(bn, keras.layers.BatchNormalization):
            c = bn.gamma.shape[0]
            bn.gamma.assign(rng.uniform(0.5, 1.5, c))
            bn.beta.assign(rng.normal(0, spread, c))
            bn.moving_mean.assign(rng.normal(0, spread, c))
            bn.moving_variance.assign(rng.uniform(0.5, 2.0, c))


def fit_and_round_trip(model: keras.Model, x: np.ndarray, y: np.ndarray, tmp_path, *, watched=(),
                       min_changed: float = 0.9, learning_rate: float = 1e-3, **compile_kw) -> None:
    """``model`` ({"features", "logits"} outputs) fitted one epoch on (x, y) by cross-entropy on the logits, batch 4:
    the loss is finite, at least ``min_changed`` of the trainable weights and some of each ``watched`` layer's
    changed; then saved as .keras and loaded: the same layer configs and exactly the same outputs."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss={"logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}, **compile_kw)
    before = [to_numpy(w).copy() for w in model.trainable_weights]
    watched_before = [[to_numpy(w).copy() for w in layer.trainable_weights] for layer in watched]
    history = model.fit(x, {"logits": y}, batch_size=4, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0])
    changed = [not np.allclose(b, to_numpy(w)) for b, w in zip(before, model.trainable_weights)]
    assert sum(changed) >= min_changed * len(changed)
    for layer, old in zip(watched, watched_before):
        assert any(np.any(to_numpy(w) != b) for w, b in zip(layer.trainable_weights, old)), layer.name
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert [layer.get_config() for layer in loaded.layers] == [layer.get_config() for layer in model.layers]
    a, b = model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
