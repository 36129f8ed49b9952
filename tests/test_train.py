"""rga-train (rga_keras.cli.train over rga_keras.training): configs, command-line errors, and an end-to-end run that
must learn."""
import json
import os
from pathlib import Path

import pytest

from rga_keras.cli.train import main
from rga_keras.evaluation import features
from rga_keras.training import config as training_config
from rga_keras.training import run as training_run
from rga_keras.training.config import CONFIG_DIR
from tests.checks import SMALL_RESNET


def test_every_bundled_config_loads_and_is_consistent():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"market1501_rga_sc", "market1501_baseline", "cuhk03_labeled_rga_sc", "cuhk03_detected_rga_sc",
            "msmt17_rga_sc", "market1501_rga_sc_wo_rel", "market1501_rga_sc_wo_ori"} <= set(names)
    for name in names:
        config = training_config.load_config(CONFIG_DIR / f"{name}.yaml")
        assert config["sampler"]["num_ids_per_batch"] * config["sampler"]["images_per_id"] == 64
    paper = training_config.load_config(CONFIG_DIR / "market1501_rga_sc.yaml")
    assert paper["optimizer"]["milestones"] == [80, 120, 160, 200, 240, 280, 320, 360]
    assert training_config.load_config(CONFIG_DIR / "market1501_baseline.yaml")["model"]["attention"] is None
    assert training_config.load_config(CONFIG_DIR / "cuhk03_detected_rga_sc.yaml")["dataset"]["split"] == "detected"


def test_overrides_parse_numbers_and_reject_typos():
    config = training_config.load_config(None, ["optimizer.base_lr=1e-3", "model.input_size=[64, 32]"])
    assert config["optimizer"]["base_lr"] == pytest.approx(1e-3) and config["model"]["input_size"] == [64, 32]
    with pytest.raises(KeyError, match="unknown config key 'optimizer.base_lrr'"):
        training_config.load_config(None, ["optimizer.base_lrr=1"])
    with pytest.raises(ValueError, match="expects a number"):
        training_config.load_config(None, ["optimizer.base_lr=fast"])
    with pytest.raises(ValueError, match="cannot be split into 4 replicas"):
        training_config.check_replica_split(training_config.load_config(None, ["sampler.num_ids_per_batch=6"]), 4)


def test_command_line_errors_are_clear(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--no-such-option"])
    assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    assert main(["--config", "no_such_recipe"]) == 2
    assert "neither a file nor a bundled config" in capsys.readouterr().err
    assert main(["--config", "market1501_rga_sc"]) == 2  # no --data-root
    assert "dataset.root is not set" in capsys.readouterr().err
    assert main(["--config", "market1501_rga_sc", "--data-root", str(tmp_path / "missing"),
                 "--run-dir", str(tmp_path / "run")]) == 2
    assert "market1501" in capsys.readouterr().err.lower() and not (tmp_path / "run").exists()  # nothing written
    assert main(["--demo", "-o", "sampler.images_per_id=1"]) == 2
    assert "images_per_id >= 2" in capsys.readouterr().err
    assert main(["--demo", "--epochs", "0"]) == 2
    assert "training.epochs must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--demo", "--config", "market1501_rga_sc"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.long(55)
def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's stop) during epoch 2 → exit 143 with how to resume, the backup of epoch 1 kept;
    the same command then continues after epoch 1, its training stream starting at the batch the
    uninterrupted run would have reached, and removes the temporary a killed checkpoint write left."""
    import os
    import signal
    import socket
    import subprocess

    monkeypatch.setenv("RGA_KERAS_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    args = ["--demo", "--quiet", "--run-dir", str(run_dir), "-o", "dataset.num_ids=16", "-o", "dataset.images_per_id=8",
            "-o", "model.input_size=[64, 32]", "-o", "training.epochs=2", "-o", "training.steps_per_epoch=2",
            "-o", "training.eval_every=1", "-o", "sampler.num_ids_per_batch=4", "-o", "training.tensorboard=false",
            "-o", "export.enabled=false", *SMALL_RESNET]  # resuming is logic, not the network's size
    evaluate, calls, first_batches = features.evaluate_model, [], []

    def interrupt_third(*a, **k):  # untrained, epoch 1, then SIGTERM in epoch 2's evaluation
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*a, **k)

    from rga_keras.data import pipeline

    make_train_dataset = pipeline.make_train_dataset
    monkeypatch.setattr(pipeline, "make_train_dataset",
                        lambda *a, **k: first_batches.append(k["first_batch"]) or make_train_dataset(*a, **k))
    monkeypatch.setattr(features, "evaluate_model", interrupt_third)
    assert main(args) == 143
    assert "interrupted by SIGTERM; re-run the same command to resume" in capsys.readouterr().err
    assert json.loads((run_dir / "backup" / "training_metadata.json").read_text())["epoch"] == 1
    killed = subprocess.Popen(["true"])
    killed.wait()
    partial = run_dir / f".last.{killed.pid}@{socket.gethostname()}~x.tmp.keras"  # kill -9 while saving
    partial.write_bytes(b"half a checkpoint")
    monkeypatch.setattr(features, "evaluate_model", evaluate)
    assert main(args) == 0
    assert not partial.exists()
    assert first_batches == [0, 2]  # resumed after 1 epoch of 2 steps
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["untrained"] is None and summary["epochs"] == 2
    assert [row["epoch"] for row in json.loads((run_dir / "history.json").read_text())] == [1, 2]


@pytest.mark.long(460)
def test_the_demo_runs_end_to_end_and_learns(tmp_path, monkeypatch, capsys):
    """The README's demo (RGA-SC from scratch on CPU; TensorBoard off, one evaluation at the end, TFLite float32 as
    the only export), its first 8 of 12 epochs: its learning rate is constant after the first epoch, so these are
    the demo's first 200 steps exactly. It writes every artefact, evaluates before and after, exports with its
    parity checks passing, and retrieval on the unseen identities ends far above the untrained network's
    (the demo run in docs/TRAINING.md had mAP 15.1 after epoch 8, 3.4 untrained)."""
    monkeypatch.setenv("RGA_KERAS_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    epochs = 8
    assert training_config.demo_config()["optimizer"]["milestones"] == []  # no rate change in the last 4 epochs
    assert main(["--demo", "--quiet", "--run-dir", str(run_dir), "-o", "export.formats=[tflite_float32]",
                 "-o", "training.tensorboard=false", "-o", f"training.epochs={epochs}",
                 "-o", f"training.eval_every={epochs}"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == epochs and len(summary["history"]["loss"]) == epochs
    assert summary["eval_feature"] == "after_bn"
    for key in ("untrained", "final"):  # both retrieval features, eval.feature first
        assert list(summary[key]) == ["after_bn", "before_bn"]
        for m in summary[key].values():
            assert 0.0 <= m["mAP"] <= 1.0 and m["rank1"] <= m["rank10"]
    untrained, trained = summary["untrained"]["after_bn"], summary["final"]["after_bn"]
    assert trained["mAP"] >= 2 * untrained["mAP"] and trained["mAP"] - untrained["mAP"] >= 0.05, (untrained, trained)
    assert trained["rank1"] >= 2 * untrained["rank1"], (untrained, trained)

    history = json.loads((run_dir / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))
    assert history[-1]["val_mAP"] == pytest.approx(trained["mAP"], abs=1e-4)  # the monitored value
    assert history[-1]["val_mAP_before_bn"] == pytest.approx(summary["final"]["before_bn"]["mAP"], abs=1e-4)
    for name in ("last.keras", "best.keras", "history.json", "training_curves.png", "config.yaml"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "backup").exists()  # removed once fit completed
    assert set(summary["artefacts"]) == {"last", "best", "curves", "export"}  # no TensorBoard logs were asked for
    out = capsys.readouterr().out
    assert "trained model" in out and "tflite_float32" in out
    assert "after_bn   Rank-1" in out and "before_bn  Rank-1" in out and "(eval.feature: selects best.keras" in out
    export = summary["export"]  # the demo exports the trained model and checks it against Keras
    assert export["passed"] and (run_dir / "export" / "tflite" / "rga_v1_float32.tflite").is_file()
    assert set(export["artefacts"]) == {"tflite_float32", "report"}


def test_a_failed_export_is_reported_and_recorded(monkeypatch, capsys):
    """An export error after training becomes a line of output and a summary entry, not a traceback."""
    from rga_keras import export

    def fail(*args, **kwargs):
        raise export.ParityError("tflite_int8: mean cosine similarity 0.5 < 0.98", {})

    monkeypatch.setattr(export, "export_all", fail)
    data = type("Data", (), {"train": [], "query": [], "gallery": []})()
    record = training_run.export_model(None, data, training_config.demo_config(), Path("unused"))
    assert record == {"passed": False, "error": "tflite_int8: mean cosine similarity 0.5 < 0.98", "artefacts": {}}
    assert "export FAILED, nothing was published: tflite_int8" in capsys.readouterr().out

    # enforce=False (the demo): published despite a failed check, which is named under the table
    check = {"size_bytes": 1, "failures": ["mean cosine similarity 0.5 < 0.98"], "passed": False}
    report = {"checks": {"tflite_int8": check}, "passed": False, "artefacts": {"tflite_int8": "x.tflite"}}
    monkeypatch.setattr(export, "export_all", lambda *args, **kwargs: report)
    record = training_run.export_model(None, data, training_config.demo_config(), Path("unused"))
    assert not record["passed"] and record["artefacts"] == {"tflite_int8": "x.tflite"}
    out = capsys.readouterr().out
    assert "SOME CHECKS FAILED" in out and out.rstrip().endswith("tflite_int8: mean cosine similarity 0.5 < 0.98")


def _tiny_reid_model(constant_features: bool = False):
    """images (4,) → {"features", "logits"}; with ``constant_features`` every input gives the same features."""
    import keras

    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, name="hidden")(keras.ops.zeros_like(inputs) if constant_features else inputs)
    model = keras.Model(inputs, {"features": hidden, "logits": keras.layers.Dense(3, name="logits")(hidden)})
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss={"features": "mse", "logits": "mse"})
    return model


def test_a_diverging_fit_stops_and_keeps_nothing_of_that_epoch(tmp_path):
    """An exploding loss stops fit with a message that says so, and the epoch is neither checkpointed as last
    nor as best; NaN features and collapsed features stop it at the epoch's end."""
    import numpy as np

    from rga_keras.training.callbacks import DivergenceGuard, TrainingDiverged, make_callbacks

    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32") * 10
    targets = {"features": np.zeros((64, 8), "float32"), "logits": np.ones((64, 3), "float32")}
    model = _tiny_reid_model()
    model.optimizer.learning_rate.assign(10.0)  # SGD on this quadratic loss at lr 10: |error| × ~100 per step
    callbacks = [DivergenceGuard(x[:8])] + make_callbacks(str(tmp_path), backup=True, tensorboard=False,
                                                          checkpoint_best_monitor="loss", best_mode="min")
    with pytest.raises(TrainingDiverged, match=r"training diverged in epoch 1: the loss is .* over 100× its first"):
        model.fit(x, targets, batch_size=8, epochs=2, callbacks=callbacks, verbose=0)
    assert not any((tmp_path / name).exists() for name in ("last.keras", "best.keras", "history.json"))

    guard = DivergenceGuard(x[:8])
    guard.set_model(_tiny_reid_model(constant_features=True))
    with pytest.raises(TrainingDiverged, match="features collapsed: all 8 probe images give the same vector"):
        guard.on_epoch_end(0)
    kernel = model.get_layer("hidden").kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))  # as an overflowed update leaves them
    guard.set_model(model)
    with pytest.raises(TrainingDiverged, match="the features hold NaN or infinite values"):
        guard.on_epoch_end(0)
    guard.set_model(_tiny_reid_model())
    guard.on_epoch_end(0)  # a healthy model passes
    with pytest.raises(TrainingDiverged, match="the loss is nan at step 3"):
        guard.on_train_batch_end(2, {"loss": float("nan")})


def test_a_non_finite_epoch_is_never_the_best_checkpoint(tmp_path):
    from rga_keras.training.callbacks import AtomicCheckpoint

    best = AtomicCheckpoint(str(tmp_path / "best.keras"), monitor="val_mAP")
    best.set_model(_tiny_reid_model())
    best.on_train_begin()
    best.on_epoch_end(0, {"loss": float("inf"), "val_mAP": 0.9})  # a diverged epoch that still scored
    assert not (tmp_path / "best.keras").exists()
    best.on_epoch_end(1, {"loss": 3.0, "val_mAP": 0.2})
    assert json.loads((tmp_path / "best.keras.json").read_text())["epoch"] == 2


def test_fresh_deletes_only_the_runs_own_files(tmp_path):
    from rga_keras.training.run_folder import check_run_folder, clear_run_folder

    config = training_config.demo_config(str(tmp_path))
    for name in ("config.yaml", "last.keras", "summary.json", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "backup").mkdir()
    with pytest.raises(FileExistsError, match="no config.yaml|finished run"):
        check_run_folder(tmp_path, config, resumable=True)
    assert check_run_folder(tmp_path, config, resumable=True, fresh=True) == "new"
    clear_run_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # the user's file stays


def test_a_run_recorded_before_an_option_existed_resumes(tmp_path):
    """A key the recorded config.yaml lacks (an older version wrote it) counts as a difference only where the new
    config sets it to something other than its default."""
    import yaml

    from rga_keras.training.run_folder import check_run_folder

    config = training_config.demo_config(str(tmp_path))
    recorded = yaml.safe_load(yaml.safe_dump(config))
    del recorded["model"]["stage_widths"], recorded["model"]["stage_blocks"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    (tmp_path / "last.keras").write_text("x")
    assert check_run_folder(tmp_path, config, resumable=True) == "resume"
    config["model"]["stage_widths"] = [4, 8, 16, 32]
    with pytest.raises(ValueError, match=r"model.stage_widths: '\(absent\)' → \[4, 8, 16, 32\]"):
        check_run_folder(tmp_path, config, resumable=True)


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    """Temporaries of a killed writer go at the next write in the same place; a live writer's stay."""
    import os
    import socket
    import subprocess
    import time

    from rga_keras.files import STALE_AFTER_S, write_text_atomic

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".history.{dead.pid}@{host}~abc.tmp.json"
    live = tmp_path / f".history.{os.getppid()}@{host}~def.tmp.json"  # our parent: alive
    elsewhere = tmp_path / ".history.123@another-host~ghi.tmp.json"  # cannot be checked: kept for a day
    untagged_old = tmp_path / ".history.jkl.tmp.json"  # from before the tag, days old
    other = tmp_path / ".notes.txt"
    for path in (stale, live, elsewhere, untagged_old, other):
        path.write_text("partial")
    old = time.time() - STALE_AFTER_S - 60
    os.utime(untagged_old, (old, old))
    write_text_atomic(tmp_path / "history.json", "[]")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (live, elsewhere, other, tmp_path / "history.json"))


@pytest.mark.slow  # two tiny trainings in fresh processes: about 3 minutes on the shared 2-core machine
def test_deterministic_runs_give_identical_losses(tmp_path):
    """training.deterministic: two rga-train processes of the same tiny config give bit-identical losses (without
    the option they differ in the last digits from the first step on, docs/TRAINING.md)."""
    import subprocess
    import sys

    losses = []
    for run in ("one", "two"):
        argv = [sys.executable, "-m", "rga_keras.cli.train", "--demo", "--quiet", "--run-dir", str(tmp_path / run)]
        for setting in ("dataset.num_ids=8", "dataset.images_per_id=4", "sampler.num_ids_per_batch=2",
                        "sampler.images_per_id=2", "training.epochs=2", "training.steps_per_epoch=3",
                        "training.eval_every=2", "training.tensorboard=false", "export.enabled=false",
                        "training.deterministic=true"):
            argv += ["-o", setting]
        env = {**os.environ, "RGA_KERAS_CACHE": str(tmp_path / "cache"), "TF_CPP_MIN_LOG_LEVEL": "3"}
        subprocess.run(argv, check=True, env=env, capture_output=True)
        losses.append(json.loads((tmp_path / run / "summary.json").read_text())["history"]["loss"])
    assert losses[0] == losses[1] and len(losses[0]) == 2, losses


def test_determinism_is_refused_once_tensorflow_runs(capsys):
    """Ops one at a time can only be chosen before TensorFlow's first op: asked for later, one clear error,
    and op determinism (process-wide, for good) is not switched on."""
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    tf.constant(1.0) + 1.0  # TensorFlow has run an op
    with pytest.raises(ValueError, match="can only be chosen before TensorFlow runs its first operation: start "
                                         "the run in a fresh process"):
        training_run.set_determinism(0, True)
    assert not tf_config.is_op_determinism_enabled()
