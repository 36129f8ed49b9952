"""rga-train on the JAX backend (CPU), each run in a fresh process as a user starts it: a config run, the demo resumed
after a kill, and the same run on two devices and on two processes, whose losses follow the one-device run.

The runs share the session's persistent XLA compilation cache (conftest.jax_environment), so what one run compiled
the next one reads."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rga_keras.data.synthetic import generate
from tests.checks import SMALL_RESNET
from tests.test_distributed import free_ports

ROOT = Path(__file__).resolve().parent.parent
# The smallest run that still trains, evaluates and checkpoints (tests/test_distributed.py's TINY: a small ResNet),
# two epochs of two steps, one evaluation at the end.
TINY = ["--quiet", "-o", "model.input_size=[32, 32]", "-o", "model.attention=c", "-o", "model.rga_stages=[4]",
        *SMALL_RESNET,
        "-o", "model.backbone_weights=null", "-o", "sampler.num_ids_per_batch=4", "-o", "sampler.images_per_id=2",
        "-o", "training.steps_per_epoch=2", "-o", "training.epochs=2",
        "-o", "training.eval_every=2", "-o", "training.tensorboard=false", "-o", "eval.batch_size=32"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, jax_environment):
    """The environment of the runs (JAX on CPU, the session's compilation cache) and a synthetic dataset folder."""
    root = tmp_path_factory.mktemp("jax")
    env = {**jax_environment, "PYTHONPATH": str(ROOT), "RGA_KERAS_CACHE": str(root / "cache")}
    data = generate(root / "synthetic", num_ids=16, images_per_id=4)  # the demo's dataset at -o dataset.num_ids=16
    return env, data, root


def start(env, args, log: Path, **extra_env) -> subprocess.Popen:
    """``rga-train ARGS`` in a fresh process, its output into ``log``."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rga_keras.cli.train", *args], cwd=ROOT,
                                env={**env, **extra_env}, stdout=out, stderr=subprocess.STDOUT)
    proc.log_path = log
    return proc


def finish(procs, timeout=900) -> list[str]:
    """Wait for the processes; every one must exit 0. Their output."""
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [p.log_path.read_text(errors="replace") for p in procs]
    assert codes == [0] * len(procs), "\n\n".join(log[-3000:] for log in logs)
    return logs


def config_run(data: Path) -> list[str]:
    """A bundled recipe at TINY's size on the synthetic folder, its batches built in the training process."""
    return ["--config", "market1501_rga_sc", "--data-root", str(data), *TINY, "-o", "sampler.workers=0"]


def history(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["history"]


@pytest.fixture(scope="module")
def one_device(setup):
    """The config run on one device: the reference of the distributed runs."""
    env, data, root = setup
    run_dir = root / "one"
    log = finish([start(env, [*config_run(data), "--run-dir", str(run_dir)], root / "one.log")])[0]
    return run_dir, log


@pytest.mark.long(26)
def test_a_config_run_on_jax(one_device):
    run_dir, log = one_device
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["replicas"] == 1 and len(summary["history"]["loss"]) == 2
    assert summary["untrained"] is not None and 0 <= summary["final"]["after_bn"]["mAP"] <= 1
    assert [row["epoch"] for row in json.loads((run_dir / "history.json").read_text())] == [1, 2]
    for name in ("config.yaml", "last.keras", "best.keras", "training_curves.png", "history.csv"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "backup").exists() and "trained model" in log


def children(pid: int) -> dict[int, str]:
    """The processes ``pid`` started, with their command lines (Linux /proc)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                found[int(child)] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                pass  # already gone
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie nobody reaps has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def backup_epoch(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "backup" / "training_metadata.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.long(45)
def test_the_demo_on_jax_resumes_after_a_kill(setup):
    """--demo (with Grain's worker processes, and the export, which says how to run it on TensorFlow later), killed
    with SIGKILL once an epoch is backed up, then run again: it resumes after that epoch and finishes. The killed
    run's worker processes end with it instead of staying behind, idle, holding their memory."""
    env, _, root = setup
    run_dir = root / "demo"
    args = ["--demo", "--run-dir", str(run_dir), "-o", "dataset.num_ids=16", "-o", "dataset.images_per_id=4", *TINY]
    proc = start(env, args, root / "demo-killed.log")
    try:
        deadline = time.monotonic() + 900
        while not backup_epoch(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, (root / "demo-killed.log").read_text()[-3000:]
            time.sleep(0.2)
        started = children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert backup_epoch(run_dir) == 1
    assert any("multiprocessing.spawn" in line for line in started.values()), started  # Grain's workers
    deadline = time.monotonic() + 30
    while any(map(running, started)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: line for pid, line in started.items() if running(pid)}
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, left
    log = finish([start(env, args, root / "demo.log")])[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["untrained"] is None and len(summary["history"]["loss"]) == 1  # only epoch 2 ran again
    assert [row["epoch"] for row in json.loads((run_dir / "history.json").read_text())] == [1, 2]
    assert "export: skipped, it needs the TensorFlow backend (this run trained on jax)" in log
    assert f"KERAS_BACKEND=tensorflow rga-export --model {run_dir / 'last.keras'}" in log
    assert "export" not in summary and not (run_dir / "export").exists()


@pytest.mark.long(61)
def test_two_devices_and_two_processes_follow_one_device(setup, one_device):
    """The config run on two logical CPU devices (DataParallel) and on two processes (TF_CONFIG): the losses stay
    within 1 % of the one-device run (measured: 1e-5; XLA computes the losses and the BatchNorm statistics over
    the whole global batch, so only the order of the sums differs)."""
    env, data, root = setup
    reference, _ = one_device
    config = config_run(data)
    two_devices = start(env, [*config, "--run-dir", str(root / "devices"), "-o", "training.devices=[/cpu:0, /cpu:1]"],
                        root / "devices.log",
                        XLA_FLAGS=f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count=2")
    finish([two_devices])
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    processes = [start(env, [*config, "--run-dir", str(root / f"process{i}")], root / f"process{i}.log",
                       TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
                 for i in range(2)]
    logs = finish(processes)
    assert "over 2 replica(s) on 2 worker(s)" in logs[0] and "the chief (worker 0) evaluates" in logs[1]
    assert os.listdir(root / "process1") == []
    for run in ("devices", "process0"):
        summary = json.loads((root / run / "summary.json").read_text())
        assert summary["replicas"] == 2 and summary["workers"] == (2 if run == "process0" else 1)
        for key in ("loss", "logits_loss", "features_loss"):
            np.testing.assert_allclose(history(root / run)[key], history(reference)[key], rtol=0.01, err_msg=run)
