"""The model core on every Keras backend, from the default (TensorFlow) run.

The backend is fixed when Keras is imported, so other backends run in subprocesses: the backend-neutral
test files (`conftest.BACKEND_NEUTRAL`) under JAX (in CI) and PyTorch (when torch is installed), an import
that must not load TensorFlow, and the same weights giving the same embeddings on TensorFlow and JAX.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import rga_keras
from tests.checks import randomise_batchnorms
from tests.conftest import BACKEND_NEUTRAL

ROOT = Path(__file__).resolve().parent.parent
SIZE = (64, 32)


def _run(env: dict[str, str], args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _suite(env: dict[str, str], name: str) -> None:
    result = _run(env, ["-m", "pytest", "-q", "-o", "addopts=", "-m", "not slow", "-p", "no:cacheprovider",
                        f"tests/{name}"], timeout=1500)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout.splitlines()[-1]


# One test per file, so the default run's workers share the backend suites out between them.
# CI seconds of each file on JAX (tests/conftest.py starts the long ones first)
JAX_SECONDS = {"test_models.py": 130, "test_layers.py": 110, "test_weights.py": 35, "test_schemes.py": 35}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.long(JAX_SECONDS[name]))
                                  if name in JAX_SECONDS else name for name in BACKEND_NEUTRAL])
def test_backend_neutral_suite_on_jax(name, jax_environment):
    _suite(jax_environment, name)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("name", BACKEND_NEUTRAL)
def test_backend_neutral_suite_on_torch(name):
    _suite({**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "3"}, name)


@pytest.mark.long(28)
def test_import_build_and_train_load_no_tensorflow_on_jax(jax_environment):
    script = """
import sys
import numpy as np, keras, rga_keras
model = rga_keras.build_rga_resnet50(3, "sc", input_shape=(64, 32, 3), rga_stages=(4,))
model.compile("adam", loss={"logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True)})
x = np.random.default_rng(0).uniform(0, 255, (4, 64, 32, 3)).astype("float32")
loss = model.train_on_batch(x, np.array([0, 1, 2, 0]))
assert np.isfinite(loss), loss
print("tensorflow loaded:", "tensorflow" in sys.modules)
"""
    result = _run(jax_environment, ["-c", script], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("tensorflow loaded: False")


@pytest.mark.long(29)
def test_same_weights_give_the_same_embeddings_on_tensorflow_and_jax(tmp_path, jax_environment):
    """A model saved on TensorFlow, loaded on JAX: both embeddings agree to 1e-5 (relative, float32)."""
    rng = np.random.default_rng(0)
    # Seeded: on some draws of the initial weights the random network's embeddings differ between images by less
    # than float32's rounding (5e-7 of 0.2), and the spread check below could not hold.
    keras.utils.set_random_seed(0)
    model = rga_keras.build_rga_resnet50(5, "sc", input_shape=(*SIZE, 3))
    randomise_batchnorms(model, rng, spread=0.1)  # BatchNorm statistics of a trained model, not the identity
    images = rng.uniform(0, 255, (4, *SIZE, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    model.save(tmp_path / "model.keras")
    expected = {f: np.asarray(model.embedding_model(f)(images, training=False)) for f in ("after_bn", "before_bn")}
    script = f"""
import numpy as np, rga_keras
model = rga_keras.load_reid_model({str(tmp_path / "model.keras")!r})
images = np.load({str(tmp_path / "images.npy")!r})
for feature in ("after_bn", "before_bn"):
    np.save({str(tmp_path)!r} + f"/{{feature}}.npy", np.asarray(model.embedding_model(feature)(images, training=False)))
"""
    result = _run(jax_environment, ["-c", script], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for feature, want in expected.items():
        got = np.load(tmp_path / f"{feature}.npy")
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-5, feature
        # A random network gives nearly the same embedding to every image: the part that differs between
        # images must agree too, or a mix-up of images would pass.
        spread = want - want.mean(axis=0)
        assert np.max(np.abs(spread)) >= 1e-4 * np.max(np.abs(want)), feature  # this draw has a spread to check
        assert np.max(np.abs((got - got.mean(axis=0)) - spread)) <= 0.05 * np.max(np.abs(spread)), feature
