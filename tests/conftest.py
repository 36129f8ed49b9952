"""Shared test set-up.

The suite runs on TensorFlow (the default). The backend-neutral tests (`BACKEND_NEUTRAL`: the model core)
also run on JAX and PyTorch: ``KERAS_BACKEND=jax python -m pytest`` collects only those (`test_backends.py`
does that from the default run). On TensorFlow: quiet logs and two logical CPU devices for the
distribution tests.
"""
import os
import signal
from pathlib import Path

import pytest

from rga_keras.cores import available_cores
from rga_keras.native_logs import quiet_native_stderr

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
    with quiet_native_stderr():  # TensorFlow's C++ start-up lines ("failed call to cuInit") end every run otherwise
        import tensorflow as tf

        _cpus = tf.config.list_physical_devices("CPU")
    # Under xdist each worker's TensorFlow splits an op over its share of the cores, not all of them: with every
    # worker's intra-op pool as wide as the machine, an op's threads wait for those another worker has preempted.
    # The demo's train step on 2 cores beside one busy process: 2.05 s with TensorFlow's default 2 intra-op
    # threads, 1.28 s with 1 (alone: 1.02 s and 0.95 s). JAX's CPU runtime showed no such effect.
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    try:  # must happen before TensorFlow initialises its devices
        tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
        if _workers > 1:
            tf.config.threading.set_intra_op_parallelism_threads(max(1, available_cores() // _workers))
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


@pytest.fixture(scope="session")
def jax_environment(tmp_path_factory) -> dict[str, str]:
    """The environment of a JAX process started by a test: CPU, quiet logs, and one persistent XLA compilation
    cache for the whole session (shared by the xdist workers) that keeps every compilation, not only those over
    JAX's default 1 s. Each fresh process otherwise compiles again the same hundreds of small programs (eager
    variable initialisers, layer calls, train and predict steps): a small rga-train run on JAX takes 26 s alone,
    10 s once they are cached. A damaged entry is recompiled (JAX warns), never used."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
            "JAX_COMPILATION_CACHE_DIR": str(Path(shared) / "xla-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            # LLVM's level 1 instead of 2 for XLA's CPU code: the same programs (the level changes how hard LLVM
            # optimises, not what is computed); JAX's share of the suite costs 14 % less CPU (test_models on JAX:
            # 148 → 126 user-s), and a few tiny trainings at these sizes run no slower. (Level 0 costs more.)
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=1".strip()}


def pytest_configure(config):
    config.addinivalue_line("markers", "long(seconds): a test that takes about that long in CI; the long ones are "
                                       "started first, spread over the xdist workers (see below)")


@pytest.hookimpl(trylast=True)  # after `-m` has deselected
def pytest_collection_modifyitems(config, items):
    """Under xdist, the long tests start first, one worker's share each (longest first, each to the share with the
    least so far), and the short ones fill in behind them. Long tests of one file that share a module-scoped
    fixture stay in one share, so the fixture is built once.

    xdist's worksteal hands worker i the i-th contiguous slice of the collection, and an idle worker then takes
    the tail of another's queue. In collection order the long end-to-end tests (the demo alone is a quarter of
    the suite) started wherever their file fell, and one worker was left running a few of them after the other
    had finished. Started first, spread this way, they leave the tails to the short tests, which even out."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    groups: dict[str, list] = {}
    for item in items:
        if item.get_closest_marker("long"):
            shares_fixture = any(d.scope == "module" for defs in item._fixtureinfo.name2fixturedefs.values()
                                 for d in defs)
            groups.setdefault(item.module.__name__ if shares_fixture else item.nodeid, []).append(item)
    if workers < 2 or not groups:
        return
    seconds = {key: sum(item.get_closest_marker("long").args[0] for item in group) for key, group in groups.items()}
    sizes = [len(items) // workers] * (workers - 1)  # as xdist's worksteal splits the collection
    sizes.append(len(items) - sum(sizes))
    shares, loads = [[] for _ in sizes], [0.0] * workers
    for key in sorted(groups, key=lambda key: -seconds[key]):
        room = [i for i in range(workers) if len(shares[i]) + len(groups[key]) <= sizes[i]]
        share = min(room or range(workers), key=lambda i: loads[i])
        shares[share] += groups[key]
        loads[share] += seconds[key]
    long_ones = {id(item) for group in groups.values() for item in group}
    short = iter([item for item in items if id(item) not in long_ones])
    for share, size in zip(shares, sizes):
        share.extend(next(short) for _ in range(max(0, size - len(share))))
    items[:] = [item for share in shares for item in share] + list(short)
