"""The comparison schemes of Table 2 against NumPy references written here, their parameter counts (Table 3),
training, saving and export in the model family."""
import keras
import numpy as np
import pytest

import rga_keras
from rga_keras.attention import ATTENTIONS, attention_slug
from tests.backend import BACKEND, to_numpy
from tests.checks import fit_and_round_trip

EPS = 1e-5
SCHEMES = {name: spec for name, spec in ATTENTIONS.items() if spec.table == 2}  # the Table 2 designs
NAMES = list(SCHEMES)


# --------------------------------------------------------------------------- NumPy references

def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _relu(x):
    return np.maximum(x, 0)


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _w(variable):
    return to_numpy(variable).astype(np.float64)


def _dense(layer, x):
    return x @ _w(layer.kernel) + (_w(layer.bias) if layer.use_bias else 0)


def _bn(bn, x, training):
    """BatchNorm over the last axis: batch statistics (biased variance) in training, moving ones otherwise."""
    axes = tuple(range(x.ndim - 1))
    mean, var = (x.mean(axes), x.var(axes)) if training else (_w(bn.moving_mean), _w(bn.moving_variance))
    return (x - mean) / np.sqrt(var + EPS) * _w(bn.gamma) + _w(bn.beta)


def _conv_same(x, kernel):
    """k×k convolution, stride 1, zero "same" padding, by summing shifted copies: (B, H, W, I) → (B, H, W, O)."""
    k = kernel.shape[0]
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    return sum(padded[:, i:i + h, j:j + w] @ kernel[i, j] for i in range(k) for j in range(k))


def ref_se(layer, x, training):
    pools = {"avg": x.mean(axis=(1, 2)), "max": x.max(axis=(1, 2))}
    score = sum(_dense(layer.excite, _relu(_dense(layer.squeeze, pools[p]))) for p in layer.pooling)
    return x * _sigmoid(score)[:, None, None, :]


def ref_cbam(layer, x, training):
    if layer.channel is not None:
        x = ref_se(layer.channel, x, training)
    if layer.spatial_conv is not None:
        pooled = np.stack([x.mean(-1), x.max(-1)], axis=-1)
        x = x * _sigmoid(_bn(layer.spatial_bn, _conv_same(pooled, _w(layer.spatial_conv.kernel)), training))
    return x


def ref_fc(layer, x, training):
    out = x
    b, h, w, c = x.shape
    for gate in layer.gates:
        e = _relu(_bn(gate.embed_bn, x @ _w(gate.embed.kernel)[0, 0], training))
        if gate.axis == "spatial":
            score = e.mean(-1).reshape(b, h * w)
            score = _dense(gate.fcs[1], _relu(_dense(gate.fcs[0], score)))
            out = out * _sigmoid(score).reshape(b, h, w, 1)
        else:
            out = out * _sigmoid(_dense(gate.fcs[0], e.mean(axis=(1, 2)))).reshape(b, 1, 1, c)
    return out


def ref_nl(layer, x, training):
    b, h, w, c = x.shape
    theta, phi, g = (_dense(f, x).reshape(b, h * w, -1) for f in (layer.theta, layer.phi, layer.g))
    affinity = _softmax(np.einsum("bid,bjd->bij", theta, phi), axis=-1)
    y = np.einsum("bij,bjd->bid", affinity, g).reshape(b, h, w, -1)
    return x + _bn(layer.out_bn, _dense(layer.out, y), training)


def ref_snl(layer, x, training):
    b, h, w, c = x.shape
    weights = _softmax(_dense(layer.key, x).reshape(b, h * w), axis=-1)
    context = np.einsum("bj,bjc->bc", weights, x.reshape(b, h * w, c))
    return x + _dense(layer.value, context)[:, None, None, :]


REFERENCES = {"se": ref_se, "cbam_c": ref_cbam, "cbam_s": ref_cbam, "cbam_cs": ref_cbam, "fc_s": ref_fc,
              "fc_c": ref_fc, "fc_s/c": ref_fc, "nl": ref_nl, "snl": ref_snl}


def _randomise(layer, rng):
    """Every weight random (BN variances positive), so zero-initialised parts and biases all count."""
    for v in layer.weights:
        values = rng.uniform(0.5, 2.0, v.shape) if "variance" in v.path else rng.normal(0, 0.3, v.shape)
        v.assign(values.astype("float32"))


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", NAMES)
def test_scheme_matches_numpy_reference(name, training):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (3, 6, 4, 32)).astype(np.float32)
    layer = SCHEMES[name].make(name="scheme")
    layer(x)
    _randomise(layer, rng)
    expected = REFERENCES[name](layer, x.astype(np.float64), training)
    got = to_numpy(layer(x, training=training)).astype(np.float64)
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) < 1e-5
    assert np.max(np.abs(got - x)) > 1e-2  # the module does something
    assert got.shape == layer.compute_output_shape(x.shape)


# --------------------------------------------------------------------------- parameter counts (Table 3)

BASELINE = 25_050_176  # ResNet-50 + BNNeck + classifier 2048×751 (tests/test_models.py)
CHANNELS = (256, 512, 1024, 2048)
POSITIONS = (64 * 32, 32 * 16, 16 * 8, 16 * 8)  # stage maps at 256×128, last stride 1
BLOCKS = (3, 4, 6, 3)


def _mlp(c, r):  # FC c → c/r → c, with biases
    return c * (c // r) + c // r + (c // r) * c + c


def _embed(c):  # 1×1 conv c → c/8 without bias, BN γ and β
    return c * (c // 8) + 2 * (c // 8)


CBAM_S = 7 * 7 * 2 + 2  # 7×7 conv over [mean, max], BN γ and β
ADDED = {
    "se": sum(n * _mlp(c, 16) for n, c in zip(BLOCKS, CHANNELS)),  # in every bottleneck
    "cbam_c": sum(_mlp(c, 8) for c in CHANNELS),
    "cbam_s": 4 * CBAM_S,
    "cbam_cs": sum(_mlp(c, 8) + CBAM_S for c in CHANNELS),
    "fc_s": sum(_embed(c) + n * (n // 8) + n // 8 + (n // 8) * n + n for c, n in zip(CHANNELS, POSITIONS)),
    "fc_c": sum(_embed(c) + (c // 8) * c + c for c in CHANNELS),
    "nl": sum(3 * (c * (c // 4) + c // 4) + (c // 4) * c + c + 2 * c for c in CHANNELS),
    "snl": sum(c + 1 + c * c + c for c in CHANNELS),
}
ADDED["fc_s/c"] = ADDED["fc_s"] + ADDED["fc_c"]
# Table 3, millions; CBAM-S is the one no natural design reaches (docs/SCHEMES.md): ours adds 400 weights.
PAPER = {"se": 27.6, "cbam_c": 26.4, "cbam_s": 26.1, "fc_s": 26.9, "fc_c": 26.4, "nl": 30.6}


@pytest.mark.skipif(BACKEND != "tensorflow", reason="counts do not depend on the backend; built once, on TF")
@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts(name):
    model = rga_keras.build_rga_resnet50(751, name)
    count = rga_keras.count_parameters(model)
    assert count == BASELINE + ADDED[name]
    assert len(model.backbone.attention_layers) == (16 if SCHEMES[name].in_blocks else 4)
    if name in PAPER:
        assert (round(count / 1e6, 1) == PAPER[name]) == (name != "cbam_s")


def test_se_sits_inside_every_bottleneck_before_the_addition():
    """SE-ResNet: the SE gate scales the residual branch (bn3's output), then the shortcut is added."""
    backbone = rga_keras.RGAResNetBackbone("se", input_shape=(64, 32, 3), stage_blocks=(1, 2, 1, 1))
    assert [layer.name for layer in backbone.attention_layers] == [
        "layer1_0_se", "layer2_0_se", "layer2_1_se", "layer3_0_se", "layer4_0_se"]
    se = backbone.attention_layers[2]
    bn3 = backbone.get_layer("layer2_1_bn3")
    assert se.input is bn3.output
    add = se._outbound_nodes[0].operation
    assert isinstance(add, keras.layers.Add)


# --------------------------------------------------------------------------- in the model family

def _tiny(name, **kwargs):
    backbone = rga_keras.RGAResNetBackbone(name, input_shape=(64, 32, 3), stage_blocks=(1, 1, 1, 1),
                                           stage_widths=(4, 8, 16, 32), zero_init_residual=False, **kwargs)
    return rga_keras.RGAReID(backbone, 5)


def _train_step_and_round_trip(model, x, y, tmp_path, trained_layers):
    """One training step (finite loss, the schemes' weights change), then .keras save/load: same outputs."""
    fit_and_round_trip(model, x, y, tmp_path, watched=trained_layers, min_changed=0.0, learning_rate=1e-2,
                       run_eagerly=BACKEND == "tensorflow")


def _all_schemes_model():
    """Every scheme layer in sequence in one small model, so one train step or export covers them all."""
    images = keras.Input((16, 8, 3))
    x = keras.layers.Conv2D(16, 3, padding="same")(images)
    layers = [scheme.make(name=attention_slug(name)) for name, scheme in SCHEMES.items()]
    for layer in layers:
        x = layer(x)
    f = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(images, {"features": f, "logits": keras.layers.Dense(5)(f)}), layers


def test_all_attention_layers_train_a_step_and_round_trip(tmp_path):
    """Every scheme layer in one small model (cheap): trained one step and saved as .keras."""
    model, layers = _all_schemes_model()
    rng = np.random.default_rng(1)
    _train_step_and_round_trip(model, rng.uniform(-1, 1, (4, 16, 8, 3)).astype(np.float32), np.arange(4) % 5,
                               tmp_path, layers)


@pytest.mark.parametrize("name", ["se", *[pytest.param(n, marks=pytest.mark.slow) for n in NAMES if n != "se"]])
def test_every_scheme_network_trains_a_step_and_round_trips(name, tmp_path):
    model = _tiny(name)
    assert model.name == f"{attention_slug(name)}_resnet50"
    x = np.random.default_rng(1).uniform(0, 255, (4, 64, 32, 3)).astype(np.float32)
    _train_step_and_round_trip(model, x, np.arange(4) % 5, tmp_path, model.backbone.attention_layers)


def test_presets_and_bad_names():
    backbone = rga_keras.RGAResNetBackbone.from_preset("fc_s_c_resnet50", input_shape=(64, 32, 3),
                                                       stage_blocks=(1, 1, 1, 1), rga_stages=(2, 4))
    assert backbone.attention == "fc_s/c" and [layer.name for layer in backbone.attention_layers] == ["fc_s_c2", "fc_s_c4"]
    assert backbone.rga_layers == []
    with pytest.raises(ValueError, match="no RGA layers .*Table 2 scheme"):
        rga_keras.RGAReID(backbone, 3).attention_model()
    assert {f"{attention_slug(name)}_resnet50" for name in SCHEMES} <= set(rga_keras.PRESETS)
    with pytest.raises(ValueError, match=r"attention must be None or one of \(.*'se'.*'snl'\), got 'sse'"):
        rga_keras.RGAResNetBackbone("sse")
    with pytest.raises(ValueError, match="mode must be one of"):
        rga_keras.schemes.CBAM("sc")
    with pytest.raises(ValueError, match="needs .* inputs with a fixed size"):
        rga_keras.schemes.NonLocal(name="nl").build((None, None, None, 8))


# --------------------------------------------------------------------------- export

@pytest.mark.skipif(BACKEND != "tensorflow", reason="SavedModel and TFLite export run on TensorFlow")
def test_schemes_export_to_saved_model_and_builtin_tflite(tmp_path):
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from rga_keras.export.tflite import tflite_ops

    full, _ = _all_schemes_model()
    model = keras.Model(full.input, full.output["features"])
    rng = np.random.default_rng(2)
    for layer in model.layers:
        _randomise(layer, rng)
    x = rng.uniform(-1, 1, (2, 16, 8, 3)).astype(np.float32)
    expected = to_numpy(model(x, training=False))
    model.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "saved"))  # kept: its functions need the object alive
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), expected, rtol=1e-4, atol=1e-5)

    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "saved"))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    flatbuffer = converter.convert()
    assert tflite_ops(flatbuffer)["builtin_only"]
    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="TFLite export runs on TensorFlow")
@pytest.mark.parametrize("name", NAMES)
def test_every_scheme_model_exports_with_the_exporter(name, tmp_path):
    from rga_keras.export.model import write_float_saved_model
    from rga_keras.export.tflite import TFLiteEmbedder, convert_tflite, tflite_ops

    model = _tiny(name)
    rng = np.random.default_rng(3)
    for layer in model.backbone.attention_layers:  # not the identity the zero-initialised NL and SNL start as
        _randomise(layer, rng)
    source = write_float_saved_model(model, tmp_path / "source")
    flatbuffer = convert_tflite(source, "float32")
    assert tflite_ops(flatbuffer)["builtin_only"]
    x = rng.uniform(0, 255, (2, 64, 32, 3)).astype(np.float32)
    expected = to_numpy(model.embedding_model("after_bn")(x, training=False))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)  # the exported embedding is L2-normalised
    np.testing.assert_allclose(TFLiteEmbedder(flatbuffer)(x), expected, rtol=1e-4, atol=1e-5)
