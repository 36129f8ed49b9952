"""The RGA ResNet-50: sizes, parameter counts (paper Table 3), training with model.fit, saving, helpers."""
import keras
import numpy as np
import pytest

import rga_keras
from rga_keras.layers import RGA
from tests.backend import to_numpy
from tests.checks import fit_and_round_trip, small_rga_resnet

VARIANTS = [
    ("s", {}), ("c", {}), ("sc", {}), ("cs", {}), ("s//c", {}),
    ("sc", {"use_relation": False}), ("sc", {"use_original": False}),
    ("sc", {"embedding": "symmetric"}), ("sc", {"embedding": "none"}), ("sc", {"relation": "explicit"}),
]
# Two steps of a small model: faster eagerly on TensorFlow (no graph tracing), compiled on JAX and PyTorch
# (their eager modes dispatch, and JAX compiles, op by op).
EAGER = keras.backend.backend() == "tensorflow"
VARIANT_IDS = [m + "".join(f"-{k}={v}" for k, v in f.items()) for m, f in VARIANTS]
# On JAX and PyTorch (a subprocess of the default run, where every model compiles: ~15 s each) the
# model-level checks take the five modes; the ablation flags are layer code, checked there by test_layers.py.
MODEL_VARIANTS = VARIANTS if EAGER else [(m, f) for m, f in VARIANTS if not f]
MODEL_VARIANT_IDS = [i for (m, f), i in zip(VARIANTS, VARIANT_IDS) if (m, f) in MODEL_VARIANTS]


@pytest.mark.parametrize("attention, expected", [
    (None, 25_050_176),  # backbone 23,508,032 + BNNeck 4,096 + classifier 2048×751
    ("s", 28_273_976),
    ("c", 28_140_472),
    ("sc", 31_364_272),  # + RGA-SC modules 6,314,096 (docs/DESIGN.md §2)
])
def test_parameter_counts_match_paper(attention, expected):
    model = rga_keras.build_rga_resnet50(751, attention)
    count = rga_keras.count_parameters(model)
    assert count == expected
    # Paper Table 3, in millions, ±0.01 M.
    assert abs(count / 1e6 - {None: 25.05, "s": 28.27, "c": 28.14, "sc": 31.36}[attention]) <= 0.01


def test_stage_sizes_at_256x128():
    model = rga_keras.build_rga_resnet50(751, "sc")
    shapes = {layer.name: tuple(layer.output.shape[1:]) for layer in model.rga_layers}
    assert shapes == {"rga1": (64, 32, 256), "rga2": (32, 16, 512), "rga3": (16, 8, 1024), "rga4": (16, 8, 2048)}
    sizes = [(b.num_nodes, b.embed_dim, b.relation_dim) for layer in rga_keras.rga_layers(model)
             for b in (layer.spatial, layer.channel)]
    assert sizes[:2] == [(2048, 32, 256), (256, 256, 32)]  # stage 1: N, C', N' as docs/DESIGN.md §1
    assert sizes[6:] == [(128, 256, 16), (2048, 16, 256)]  # stage 4 (last stride 1)


@pytest.mark.parametrize("attention, flags", MODEL_VARIANTS, ids=MODEL_VARIANT_IDS)
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
    return x, y


@pytest.mark.parametrize("attention, flags", MODEL_VARIANTS, ids=MODEL_VARIANT_IDS)
def test_every_variant_trains_and_round_trips(attention, flags, tmp_path):
    x, y = _data(8, (32, 16, 3), 4)
    fit_and_round_trip(_small_model(attention, flags), x, y, tmp_path, run_eagerly=EAGER)


def test_rga_resnet_fits_and_round_trips(tmp_path):
    """The RGA ResNet (backbone and re-id task) with model.fit on (images, labels) and a plain Keras loss on
    "logits", saved and loaded. With one bottleneck per stage and a sixteenth of ResNet-50's widths: what this
    checks (fit, save, load on each backend) is the same code at any depth, and a ResNet-50 train step costs
    TensorFlow ~40 s of tracing on a CPU and XLA about a minute of compiling. The full-size network trains on
    TensorFlow in test_train's demo test (and every variant in the slow test below); on JAX it is checked by
    test_backends (the same embeddings as on TensorFlow) and test_every_variant_builds_with_expected_outputs."""
    x, y = _data(8, (64, 32, 3), 5)
    fit_and_round_trip(small_rga_resnet(5, stage_widths=(4, 8, 16, 32)), x, y, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("attention, flags", [(None, {})] + VARIANTS, ids=["baseline"] + VARIANT_IDS)
def test_every_resnet50_variant_fits_and_round_trips(attention, flags, tmp_path):
    x, y = _data(8, (64, 32, 3), 5)
    model = rga_keras.build_rga_resnet50(5, attention, input_shape=(64, 32, 3), **flags)
    fit_and_round_trip(model, x, y, tmp_path, run_eagerly=EAGER)


@pytest.mark.filterwarnings("error:The structure of `inputs`:UserWarning")  # they take a bare image tensor
def test_embedding_and_attention_models():
    model = rga_keras.build_rga_resnet50(5, "sc", input_shape=(64, 32, 3))
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 32, 3)).astype(np.float32)
    before = to_numpy(model.embedding_model("before_bn")(x, training=False))
    after = to_numpy(rga_keras.embedding_model(model, "after_bn")(x, training=False))
    np.testing.assert_allclose(before, to_numpy(model(x, training=False)["features"]), rtol=1e-5, atol=1e-6)
    bn = model.bnneck
    mean, var, gamma = (to_numpy(v) for v in (bn.moving_mean, bn.moving_variance, bn.gamma))
    np.testing.assert_allclose(after, (before - mean) / np.sqrt(var + 1e-5) * gamma, rtol=1e-4, atol=1e-5)
    assert not bn.beta.trainable and np.all(to_numpy(bn.beta) == 0)
    with pytest.raises(ValueError, match="feature must be one of"):
        rga_keras.embedding_model(model, "logits")

    maps = rga_keras.attention_model(model)(x, training=False)
    assert set(maps) == {"rga1", "rga2", "rga3", "rga4"}
    assert maps["rga1"]["spatial_attention"].shape == (2, 16, 8, 1)
    assert maps["rga4"]["channel_attention"].shape == (2, 1, 1, 2048)
    # The map of rga2 is exactly what rga2 multiplies its input by.
    rga2 = model.rga_layers[1]
    x_in, x_out = (to_numpy(t) for t in keras.Model(model.input, [rga2.input, rga2.output])(x, training=False))
    applied = x_in * to_numpy(maps["rga2"]["spatial_attention"]) * to_numpy(maps["rga2"]["channel_attention"])
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
    backbone = model.backbone
    last_bns = [layer for layer in backbone.layers if layer.name.endswith("_bn3")]
    assert len(last_bns) == 16 and all(np.all(to_numpy(layer.gamma) == 0) for layer in last_bns)
    x = np.random.default_rng(2).uniform(0, 255, (2, 64, 32, 3)).astype(np.float32)
    probe = keras.Model(backbone.input, [backbone.get_layer("layer2_1_conv1").input,
                                         backbone.get_layer("layer2_1_out").output])
    block_in, block_out = (to_numpy(t) for t in probe(x, training=False))
    np.testing.assert_allclose(block_out, np.maximum(block_in, 0), atol=1e-6)  # identity block: input already ≥ 0
    plain = rga_keras.build_rga_resnet50(5, None, input_shape=(64, 32, 3), zero_init_residual=False).backbone
    assert all(np.all(to_numpy(plain.get_layer(layer.name).gamma) == 1) for layer in last_bns)


def test_presets_name_the_paper_variants():
    assert {"baseline_resnet50", "rga_sc_resnet50", "rga_s_par_c_resnet50", "rga_sc_wo_rel_resnet50"} <= set(
        rga_keras.PRESETS)
    model = rga_keras.RGAReID.from_preset("rga_sc_wo_rel_resnet50", num_classes=3, input_shape=(64, 32, 3))
    assert model.backbone.attention == "sc" and not model.backbone.rga_options.use_relation
    assert model.num_classes == 3 and model.name == "rga_sc_resnet50"
    baseline = rga_keras.RGAResNetBackbone.from_preset("baseline_resnet50", input_shape=(64, 32, 3))
    assert baseline.rga_layers == [] and tuple(baseline.output.shape) == (None, 4, 2, 2048)
    with pytest.raises(ValueError, match="unknown preset 'rga_x'.*rga_sc_resnet50"):
        rga_keras.RGAReID.from_preset("rga_x", num_classes=3)


def test_model_family_config_round_trip(tmp_path):
    """Backbone and task are rebuilt from their constructor arguments (.keras files and from_config)."""
    model = rga_keras.build_rga_resnet50(3, "cs", input_shape=(64, 32, 3), last_stride=2, rga_stages=(2, 4),
                                         embedding="symmetric")
    clone = rga_keras.RGAReID.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    backbone = clone.backbone
    assert (backbone.attention, backbone.last_stride, backbone.rga_stages) == ("cs", 2, (2, 4))
    assert backbone.rga_options.embedding == "symmetric" and [l.name for l in backbone.rga_layers] == ["rga2", "rga4"]
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 32, 3)).astype(np.float32)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, rga_keras.RGAReID)
    np.testing.assert_array_equal(to_numpy(loaded(x)["logits"]), to_numpy(model(x)["logits"]))


def _legacy_functional(model):
    """The flat functional model rga-keras 0.1 saved: the backbone's layers and the head in one graph."""
    backbone = model.backbone
    features = keras.layers.Activation("linear", dtype="float32", name="features")(
        keras.layers.GlobalAveragePooling2D(name="pool")(backbone.output))
    bnneck = rga_keras.BNNeck(momentum=0.9, epsilon=1e-5, dtype="float32", name="bnneck")
    logits = keras.layers.Dense(model.num_classes, use_bias=False, name="classifier")(bnneck(features))
    old = keras.Model(backbone.input, {"features": features, "logits": logits}, name="rga_sc_resnet50")
    bnneck.set_weights(model.bnneck.get_weights())
    old.get_layer("classifier").set_weights(model.classifier.get_weights())
    return old


def test_version_0_1_files_load_as_the_task_model(tmp_path):
    rng = np.random.default_rng(3)
    model = rga_keras.build_rga_resnet50(4, "sc", input_shape=(64, 32, 3), rga_stages=(1, 3))
    for v in model.weights:  # every weight distinct, so a weight copied to the wrong place shows
        v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32") if "variance" in v.path
                 else rng.normal(0, 0.05, v.shape).astype("float32"))
    old = _legacy_functional(model)
    assert type(old) is keras.Model or type(old).__name__ == "Functional"
    old.save(tmp_path / "old.keras")
    loaded = rga_keras.load_reid_model(tmp_path / "old.keras")
    assert isinstance(loaded, rga_keras.RGAReID) and loaded.backbone.rga_stages == (1, 3)
    x = rng.uniform(0, 255, (2, 64, 32, 3)).astype(np.float32)
    for key in ("features", "logits"):
        np.testing.assert_allclose(to_numpy(loaded(x)[key]), to_numpy(model(x)[key]), rtol=1e-5, atol=1e-6)
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(tmp_path / "other.keras")
    with pytest.raises(ValueError, match="not an RGA re-id model"):
        rga_keras.load_reid_model(tmp_path / "other.keras")
    with pytest.raises(ValueError, match="is not an RGA re-id model.*rga_keras.load_reid_model"):
        rga_keras.embedding_model(old)


def test_feature_map_model_is_what_the_head_pools():
    model = rga_keras.build_rga_resnet50(3, "s", input_shape=(64, 32, 3))
    x = np.random.default_rng(4).uniform(0, 255, (2, 64, 32, 3)).astype(np.float32)
    out = model.feature_map_model()(x)
    np.testing.assert_allclose(to_numpy(out["feature_map"]).mean(axis=(1, 2)), to_numpy(model(x)["features"]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(out["logits"]), to_numpy(model(x)["logits"]), rtol=1e-6)


def test_dtype_policy_survives_saving_under_another_global_policy(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = rga_keras.build_rga_resnet50(3, "s", input_shape=(64, 32, 3), rga_stages=(4,))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for _ in range(2):  # saved, loaded under float32, saved again
        model.save(tmp_path / "m.keras")
        model = keras.models.load_model(tmp_path / "m.keras")
    assert model.backbone.dtype_policy.name == "mixed_bfloat16"
    assert model.backbone.get_layer("conv1").dtype_policy.name == "mixed_bfloat16"
    assert model.pool.dtype_policy.name == "mixed_bfloat16" and model.bnneck.dtype_policy.name == "float32"


def test_preset_options_are_changed_not_replaced():
    backbone = rga_keras.RGAResNetBackbone.from_preset("rga_sc_wo_rel_resnet50", input_shape=(64, 32, 3),
                                                       rga_options={"relation": "explicit"}, rga_stages=(4,))
    assert backbone.rga_options == rga_keras.RGAOptions(use_relation=False, relation="explicit")
    restored = rga_keras.RGAResNetBackbone.from_preset("rga_sc_wo_rel_resnet50", input_shape=(64, 32, 3),
                                                       rga_options={"use_relation": True}, rga_stages=(4,))
    assert restored.rga_options == rga_keras.RGAOptions()  # a key set back to its default is kept too
    assert rga_keras.RGAOptions(s1=8.0).s1 == 8 and isinstance(rga_keras.RGAOptions(s1=8.0).s1, int)
