"""Importing official PyTorch RGA checkpoints and ImageNet backbones, checked against a NumPy reference."""
import h5py
import keras
import numpy as np
import pytest

import rga_keras
from rga_keras import weights
from tests import numpy_reference as ref
from tests.backend import to_numpy


def _rel_err(a, b):
    return float(np.max(np.abs(to_numpy(a).astype(np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def official():
    sd = ref.random_official_state_dict(input_hw=(256, 128), num_classes=12, seed=1)
    images = np.random.default_rng(2).uniform(0, 255, (2, 256, 128, 3)).astype(np.float32)
    return sd, images, ref.official_forward(sd, images)


def test_official_import_reproduces_numpy_reference(official):
    sd, images, (f_ref, fbn_ref, logits_ref) = official
    model = rga_keras.build_rga_resnet50(12, "sc")
    rga_keras.load_official_state_dict(model, sd)
    out = model(images, training=False)
    assert _rel_err(out["features"], f_ref) < 1e-4
    assert _rel_err(out["logits"], logits_ref) < 1e-4
    after = rga_keras.embedding_model(model, "after_bn")(images, training=False)
    assert _rel_err(after, fbn_ref) < 1e-4
    # The attention must matter in this test, or it would not check the RGA import.
    no_rga = {k: v for k, v in sd.items() if "rga_att" not in k}
    f_plain = ref.official_forward(no_rga, images)[0]
    assert _rel_err(f_plain, f_ref) > 1e-2


def test_official_import_from_npz_and_strictness(official, tmp_path):
    sd, images, (f_ref, _, _) = official
    path = tmp_path / "official.npz"
    np.savez(path, **{("module." + k): v for k, v in sd.items()})  # DataParallel prefix is accepted
    model = rga_keras.build_rga_resnet50(12, "sc")
    rga_keras.load_official_state_dict(model, path)
    assert _rel_err(model(images, training=False)["features"], f_ref) < 1e-4
    with pytest.raises(ValueError, match="not used"):
        rga_keras.load_official_state_dict(model, {**sd, "extra.weight": np.zeros(3)})
    with pytest.raises(KeyError, match="missing key 'cls.weight'"):
        rga_keras.load_official_state_dict(model, {k: v for k, v in sd.items() if k != "cls.weight"})


def test_official_import_rejects_wrong_model_and_size(official):
    sd = official[0]
    with pytest.raises(ValueError, match="RGA-SC module after every stage"):
        rga_keras.load_official_state_dict(rga_keras.build_rga_resnet50(12, "s"), sd)
    with pytest.raises(ValueError, match="RGA-SC module after every stage"):
        rga_keras.load_official_state_dict(rga_keras.build_rga_resnet50(12, "sc", rga_stages=(1, 2, 3)), sd)
    with pytest.raises(ValueError, match="expected shape"):
        rga_keras.load_official_state_dict(rga_keras.build_rga_resnet50(12, "sc", input_shape=(128, 64, 3)), sd)


def test_torchvision_backbone_npz(tmp_path):
    sd = ref.random_official_state_dict(input_hw=(64, 32), rga=False, prefix="", seed=3)
    tv = {k: v for k, v in sd.items() if not k.startswith(("feat_bn", "cls"))}
    tv["fc.weight"], tv["fc.bias"] = np.zeros((1000, 2048), np.float32), np.zeros(1000, np.float32)
    path = tmp_path / "resnet50-tv.npz"
    np.savez(path, **tv)
    model = rga_keras.build_rga_resnet50(5, None, input_shape=(64, 32, 3), backbone_weights=str(path))
    images = np.random.default_rng(4).uniform(0, 255, (2, 64, 32, 3)).astype(np.float32)
    official_keys = {("backbone." + k): v for k, v in tv.items() if not k.startswith("fc")}
    official_keys.update({k: sd[k] for k in sd if k.startswith(("feat_bn", "cls"))})
    official_keys["cls.weight"] = np.zeros((5, 2048), np.float32)
    f_ref = ref.official_forward(official_keys, images)[0]
    assert _rel_err(model(images, training=False)["features"], f_ref) < 1e-4


def _write_legacy_keras_h5(app: keras.Model, path):
    """Write keras.applications weights in the legacy *_notop.h5 layout Keras distributes."""
    with h5py.File(path, "w") as f:
        names = [layer.name for layer in app.layers if layer.weights]
        f.attrs["layer_names"] = [n.encode() for n in names]
        for layer in app.layers:
            if not layer.weights:
                continue
            group = f.create_group(layer.name)
            wnames = [f"{layer.name}/{w.name}:0".encode() for w in layer.weights]
            group.attrs["weight_names"] = wnames
            for wname, value in zip(wnames, layer.get_weights()):
                group.create_dataset(wname.decode(), data=value)


def test_keras_applications_h5(tmp_path):
    app = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 32, 3))
    rng = np.random.default_rng(5)
    for layer in app.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.0, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c),
                               rng.uniform(0.5, 1.5, c)])
        elif isinstance(layer, keras.layers.Conv2D):
            k, b = layer.get_weights()
            layer.set_weights([k, rng.normal(0, 1.0, b.shape)])  # non-zero biases must be folded into BN
    path = tmp_path / weights.KERAS_NOTOP_FILE
    _write_legacy_keras_h5(app, path)
    model = rga_keras.build_rga_resnet50(5, None, input_shape=(64, 32, 3), backbone_weights=str(path))
    images = np.random.default_rng(6).uniform(0, 255, (2, 64, 32, 3)).astype(np.float32)
    caffe = keras.applications.resnet50.preprocess_input(images.copy())
    # Stage 1's first block has stride 1 in both v1 and v1.5, so its output must agree; the remaining
    # difference is Caffe's mean (≤ 0.5 grey levels from ImageNet's mean × 255).
    expected = keras.Model(app.input, app.get_layer("conv2_block1_out").output)(caffe)
    got = keras.Model(model.input, model.backbone.get_layer("layer1_0_out").output)(images)
    assert _rel_err(got, to_numpy(expected)) < 1e-2


def test_imagenet_offline_error_names_the_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(ConnectionError, match=weights.KERAS_NOTOP_FILE):
        rga_keras.build_rga_resnet50(5, None, input_shape=(64, 32, 3), backbone_weights="imagenet")


def test_bad_weight_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at"):
        rga_keras.build_rga_resnet50(5, None, input_shape=(64, 32, 3), backbone_weights=str(tmp_path / "x.npz"))
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"123")
    with pytest.raises(ValueError, match="unsupported weights file"):
        rga_keras.build_rga_resnet50(5, None, input_shape=(64, 32, 3), backbone_weights=str(bad))


def test_official_import_needs_the_whole_network(official):
    backbone = rga_keras.build_rga_resnet50(12, "sc").backbone
    with pytest.raises(ValueError, match="expected an RGAReID model"):
        rga_keras.load_official_state_dict(backbone, official[0])
