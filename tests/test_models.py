"""The RGA ResNet-50: sizes, parameter counts (paper Table 3), training with model.fit, saving, helpers."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import rga_keras
from rga_keras.layers import RGA

VARIANTS = [
    ("s", {}), ("c", {}), ("sc", {}), ("cs", {}), ("s//c", {}),
    ("sc", {"use_relation": False}), ("sc", {"use_original": False}),
    ("sc", {"embedding": "symmetric"}), ("sc", {"embedding": "none"}), ("sc", {"relation": "explicit"}),
]
VARIANT_IDS = [m + "".join(f"-{k}={v}" for k, v in f.items()) for m, f in VARIANTS]


@pytest.mark.parametrize("attention, expected", [
    (None, 25_050_176),  # backbone 23,508,032 + BNNeck 4,096 + classifier 2048×751
    ("s", 28_273_976),
    ("c", 28_140_472),
    ("sc", 31_364_272),  # + RGA-SC modules 6,314,096 (DESIGN.md §1)
])
def test_parameter_counts_match_paper(attention, expected):
    model = rga_keras.build_rga_resnet50(751, attention)
    count = rga_keras.count_parameters(model)
    assert count == expected
    # Paper Table 3, in millions, ±0.01 M.
    assert abs(count / 1e6 - {None: 25.05, "s": 28.27, "c": 28.14, "sc": 31.36}[attention]) <= 0.01


def test_stage_sizes_at_256x128():
    model = rga_keras.build_rga_resnet50(751, "sc")
    shapes = {layer.name: tuple(layer.output.shape[1:]) for layer in rga_keras.rga_layers(model)}
    assert shapes == {"rga1": (64, 32, 256), "rga2": (32, 16, 512), "rga3": (16, 8, 1024), "rga4": (16, 8, 2048)}
    sizes = [(b.num_nodes, b.embed_dim, b.relation_dim) for layer in rga_keras.rga_layers(model)
             for b in (layer.spatial, layer.channel)]
    assert sizes[:2] == [(2048, 32, 256), (256, 256, 32)]  # stage 1: N, C', N' as DESIGN.md's table
    assert sizes[6:] == [(128, 256, 16), (2048, 16, 256)]  # stage 4 (last stride 1)


@pytest.mark.parametrize("attention, flags", VARIANTS, ids=VARIANT_IDS)
def test_every_variant_builds_with_expected_outputs(attention, flags):
    model = rga_keras.build_rga_resnet50(7, attention, input_shape=(64, 32, 3), **flags)
    assert len(rga_keras.rga_layers(model)) == 4
    out = model(np.zeros((2, 64, 32, 3), np.float32), training=False)
    assert out["features"].shape == (2, 2048) and out["logits"].shape == (2, 7)


def _small_model(attention, flags):
    """A small functional model around RGA layers, so every variant can be trained and saved quickly."""
    images = keras.Input((32, 16, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(images)
    x = RGA(attention, **flags)(x)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = RGA(attention, **flags)(x)
    f = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(images, {"features": f, "logits": keras.layers.Dense(4)(f)})


def _data(n, shape, classes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (n,) + shape).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    return x, y, tf.data.Dataset.from_tensor_slices((x, y)).batch(4)


def _fit_and_round_trip(model, x, ds, tmp_path, **compile_kw):
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss={"logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}, **compile_kw)
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(ds, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0])
    changed = [not np.allclose(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
    assert sum(changed) >= 0.9 * len(changed)  # the step updated (nearly) every weight, RGA's included
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    a, b = model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("attention, flags", VARIANTS, ids=VARIANT_IDS)
def test_every_variant_trains_and_round_trips(attention, flags, tmp_path):
    x, _, ds = _data(8, (32, 16, 3), 4)
    _fit_and_round_trip(_small_model(attention, flags), x, ds, tmp_path, run_eagerly=True)


def test_rga_resnet50_fits_and_round_trips(tmp_path):
    """The real network with model.fit on (images, labels) and a plain Keras loss on "logits"."""
    x, _, ds = _data(8, (64, 32, 3), 5)
    _fit_and_round_trip(rga_keras.build_rga_resnet50(5, "sc", input_shape=(64, 32, 3)), x, ds, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("attention, flags", [(None, {})] + VARIANTS, ids=["baseline"] + VARIANT_IDS)
def test_every_resnet50_variant_fits_and_round_trips(attention, flags, tmp_path):
    x, _, ds = _data(8, (64, 32, 3), 5)
    model = rga_keras.build_rga_resnet50(5, attention, input_shape=(64, 32, 3), **flags)
    _fit_and_round_trip(model, x, ds, tmp_path, run_eagerly=True)


@pytest.mark.filterwarnings("error:The structure of `inputs`:UserWarning")  # they take a bare image tensor
def test_embedding_and_attention_models():
    model = rga_keras.build_rga_resnet50(5, "sc", input_shape=(64, 32, 3))
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 32, 3)).astype(np.float32)
    before = rga_keras.embedding_model(model, "before_bn")(x, training=False).numpy()
    after = rga_keras.embedding_model(model, "after_bn")(x, training=False).numpy()
    np.testing.assert_allclose(before, model(x, training=False)["features"], rtol=1e-5, atol=1e-6)
    bn = model.get_layer("bnneck")
    expected = (before - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + 1e-5) * bn.gamma.numpy()
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-5)
    assert not bn.beta.trainable and np.all(bn.beta.numpy() == 0)
    with pytest.raises(ValueError, match="feature must be one of"):
        rga_keras.embedding_model(model, "logits")

    maps = rga_keras.attention_model(model)(x, training=False)
    assert set(maps) == {"rga1", "rga2", "rga3", "rga4"}
    assert maps["rga1"]["spatial_attention"].shape == (2, 16, 8, 1)
    assert maps["rga4"]["channel_attention"].shape == (2, 1, 1, 2048)
    # The map of rga2 is exactly what rga2 multiplies its input by.
    probe = keras.Model(model.input, [model.get_layer("rga2").input, model.get_layer("rga2").output])
    x_in, x_out = (t.numpy() for t in probe(x, training=False))
    applied = x_in * maps["rga2"]["spatial_attention"].numpy() * maps["rga2"]["channel_attention"].numpy()
    np.testing.assert_allclose(x_out, applied, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no RGA layers"):
        rga_keras.attention_model(rga_keras.build_rga_resnet50(5, None, input_shape=(64, 32, 3)))
    # "w/o Rel." has attention maps but no relation matrices.
    no_rel = rga_keras.build_rga_resnet50(5, "sc", input_shape=(64, 32, 3), rga_stages=(4,), use_relation=False)
    maps = rga_keras.attention_model(no_rel)(x, training=False)["rga4"]
    assert set(maps) == {"spatial_attention", "channel_attention"}


def test_wrong_input_size_is_a_clear_error():
    model = rga_keras.build_rga_resnet50(5, "sc", input_shape=(64, 32, 3))
    with pytest.raises(ValueError, match=r"expected shape=\(None, 64, 32, 3\), found shape=\(1, 128, 64, 3\)"):
        model(np.zeros((1, 128, 64, 3), np.float32))


def test_invalid_builder_arguments():
    with pytest.raises(ValueError, match="attention must be None or one of"):
        rga_keras.build_rga_resnet50(5, "sx")
    with pytest.raises(ValueError, match="rga_stages"):
        rga_keras.build_rga_resnet50(5, "sc", rga_stages=(0, 5))
    with pytest.raises(ValueError, match="input_shape"):
        rga_keras.build_rga_resnet50(5, "sc", input_shape=(256, 128))
    with pytest.raises(ValueError, match="num_classes"):
        rga_keras.build_rga_resnet50(0)


def test_zero_init_residual_starts_each_block_as_identity():
    """γ = 0 on each residual branch's last BN: a block's output is then ReLU(shortcut) exactly."""
    model = rga_keras.build_rga_resnet50(5, None, input_shape=(64, 32, 3))
    last_bns = [layer for layer in model.layers if layer.name.endswith("_bn3")]
    assert len(last_bns) == 16 and all(np.all(layer.gamma.numpy() == 0) for layer in last_bns)
    x = np.random.default_rng(2).uniform(0, 255, (2, 64, 32, 3)).astype(np.float32)
    probe = keras.Model(model.input, [model.get_layer("layer2_1_conv1").input, model.get_layer("layer2_1_out").output])
    block_in, block_out = (t.numpy() for t in probe(x, training=False))
    np.testing.assert_allclose(block_out, np.maximum(block_in, 0), atol=1e-6)  # identity block: input already ≥ 0
    plain = rga_keras.build_rga_resnet50(5, None, input_shape=(64, 32, 3), zero_init_residual=False)
    assert all(np.all(plain.get_layer(layer.name).gamma.numpy() == 1) for layer in last_bns)
