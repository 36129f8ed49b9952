"""Shared test set-up.

The suite runs on TensorFlow (the default). The backend-neutral tests (`BACKEND_NEUTRAL`: the model core)
also run on JAX and PyTorch: ``KERAS_BACKEND=jax python -m pytest`` collects only those (`test_backends.py`
does that from the default run). On TensorFlow: quiet logs and two logical CPU devices for the
distribution tests.
"""
import os
import signal

# The signal tests expect what a terminal gives a program. A shell's background job starts with SIGINT and SIGQUIT
# ignored (nohup adds SIGHUP), which the programs rightly keep ignoring (docs/RELIABILITY.md): a test run started
# that way saw no signal arrive and waited for ever. Every test process, and the programs it starts, begin from
# the defaults instead.
for _signum in (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM):
    if signal.getsignal(_signum) is signal.SIG_IGN:
        signal.signal(_signum, signal.SIG_DFL)
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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
