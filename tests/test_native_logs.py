"""TensorFlow's C++ start-up lines stay off stderr when TF_CPP_MIN_LOG_LEVEL asks for it (the programs set 2)."""
import os
import subprocess
import sys

from rga_keras.native_logs import quiet_native_stderr


def test_using_the_package_writes_nothing_to_stderr_at_log_level_2():
    """The first use of the package's names imports Keras and TensorFlow with native stderr quiet."""
    code = ("import sys, rga_keras; rga_keras.RGA; import tensorflow as tf; tf.reduce_sum(tf.ones(3)).numpy(); "
            "print('python still reaches stderr', file=sys.stderr)")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stderr == "python still reaches stderr\n", run.stderr


def test_a_program_starting_tensorflow_says_only_its_own_line(tmp_path):
    """A program (which sets level 2 itself) imports TensorFlow inside `starting`: its only stderr line is its
    own answer to the bad input."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    run = subprocess.run([sys.executable, "-m", "rga_keras.cli.export", "--model", str(tmp_path / "missing.keras"),
                          "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [f"rga-export: error: model file {tmp_path / 'missing.keras'} does not exist"]


def test_the_quiet_block_drops_native_writes_only_inside_and_only_when_asked(monkeypatch, capfd):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_native_stderr():
        os.write(2, b"native noise\n")
    os.write(2, b"after\n")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    with quiet_native_stderr():
        os.write(2, b"asked for\n")
    assert capfd.readouterr().err == "after\nasked for\n"
