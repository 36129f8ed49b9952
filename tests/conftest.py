"""Shared test set-up.

The suite runs on TensorFlow (the default). The backend-neutral tests (`BACKEND_NEUTRAL`: the model core)
also run on JAX and PyTorch: ``KERAS_BACKEND=jax python -m pytest`` collects only those (`test_backends.py`
does that from the default run). On TensorFlow: quiet logs and two logical CPU devices for the
distribution tests.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

BACKEND_NEUTRAL = ["test_layers.py", "test_models.py", "test_losses.py", "test_weights.py", "test_schemes.py"]

if os.environ["KERAS_BACKEND"] == "tensorflow":
    import tensorflow as tf

    _cpus = tf.config.list_physical_devices("CPU")
    try:  # must happen before TensorFlow initialises its devices
        tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    except RuntimeError:
        pass
else:
    collect_ignore_glob = [
        name for name in sorted(p.name for p in __import__("pathlib").Path(__file__).parent.glob("test_*.py"))
        if name not in BACKEND_NEUTRAL
    ]
    if os.environ["KERAS_BACKEND"] == "jax":  # the float64 checks of the layers need 64-bit JAX arrays
        import jax

        jax.config.update("jax_enable_x64", True)
