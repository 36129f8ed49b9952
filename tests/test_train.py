"""The train/ program: configs, command-line errors, and an end-to-end run that must learn."""
import json
from pathlib import Path

import pytest

from rga_keras import experiment
from train.__main__ import CONFIG_DIR, main


def test_every_bundled_config_loads_and_is_consistent():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"market1501_rga_sc", "market1501_baseline", "cuhk03_labeled_rga_sc", "cuhk03_detected_rga_sc",
            "msmt17_rga_sc", "market1501_rga_sc_wo_rel", "market1501_rga_sc_wo_ori"} <= set(names)
    for name in names:
        config = experiment.load_config(CONFIG_DIR / f"{name}.yaml")
        assert config["sampler"]["num_ids_per_batch"] * config["sampler"]["images_per_id"] == 64
    paper = experiment.load_config(CONFIG_DIR / "market1501_rga_sc.yaml")
    assert paper["optimizer"]["milestones"] == [80, 120, 160, 200, 240, 280, 320, 360]
    assert experiment.load_config(CONFIG_DIR / "market1501_baseline.yaml")["model"]["attention"] is None
    assert experiment.load_config(CONFIG_DIR / "cuhk03_detected_rga_sc.yaml")["dataset"]["split"] == "detected"


def test_overrides_parse_numbers_and_reject_typos():
    config = experiment.load_config(None, ["optimizer.base_lr=1e-3", "model.input_size=[64, 32]"])
    assert config["optimizer"]["base_lr"] == pytest.approx(1e-3) and config["model"]["input_size"] == [64, 32]
    with pytest.raises(KeyError, match="unknown config key 'optimizer.base_lrr'"):
        experiment.load_config(None, ["optimizer.base_lrr=1"])
    with pytest.raises(ValueError, match="expects a number"):
        experiment.load_config(None, ["optimizer.base_lr=fast"])
    with pytest.raises(ValueError, match="cannot be split into 4 replicas"):
        experiment.check_config(experiment.load_config(None, ["sampler.num_ids_per_batch=6"]), num_replicas=4)


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


def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """A tiny demo on the synthetic dataset: trains, evaluates before/after, writes every artefact."""
    monkeypatch.setenv("RGA_KERAS_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    code = main(["--demo", "--quiet", "--run-dir", str(run_dir), "-o", "dataset.num_ids=16",
                 "-o", "dataset.images_per_id=8", "-o", "model.input_size=[64, 32]", "-o", "training.epochs=2",
                 "-o", "training.steps_per_epoch=2", "-o", "training.eval_every=1", "-o", "sampler.num_ids_per_batch=4",
                 "-o", "training.tensorboard=false", "-o", "export.formats=[tflite_float32]"])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and len(summary["history"]["loss"]) == 2
    assert summary["eval_feature"] == "after_bn"
    for key in ("untrained", "final"):  # both retrieval features, eval.feature first
        assert list(summary[key]) == ["after_bn", "before_bn"]
        for m in summary[key].values():
            assert 0.0 <= m["mAP"] <= 1.0 and m["rank1"] <= m["rank10"]
    history = json.loads((run_dir / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[-1]["val_mAP"] == pytest.approx(summary["final"]["after_bn"]["mAP"], abs=1e-4)  # monitored
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


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    """Ctrl-C during epoch 2 → exit 130 with how to resume; the same command then continues after epoch 1,
    its training stream starting at the batch the uninterrupted run would have reached."""
    from rga_keras import data as data_module

    monkeypatch.setenv("RGA_KERAS_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    args = ["--demo", "--quiet", "--run-dir", str(run_dir), "-o", "dataset.num_ids=16", "-o", "dataset.images_per_id=8",
            "-o", "model.input_size=[64, 32]", "-o", "training.epochs=2", "-o", "training.steps_per_epoch=2",
            "-o", "training.eval_every=1", "-o", "sampler.num_ids_per_batch=4", "-o", "training.tensorboard=false",
            "-o", "export.enabled=false"]
    evaluate, calls, first_batches = experiment.evaluate_model, [], []

    def interrupt_third(*a, **k):  # untrained, epoch 1, then Ctrl-C in epoch 2's evaluation
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    make_train_dataset = data_module.make_train_dataset
    monkeypatch.setattr(data_module, "make_train_dataset",
                        lambda *a, **k: first_batches.append(k["first_batch"]) or make_train_dataset(*a, **k))
    monkeypatch.setattr(experiment, "evaluate_model", interrupt_third)
    assert main(args) == 130
    assert "interrupted; re-run the same command to resume" in capsys.readouterr().err
    monkeypatch.setattr(experiment, "evaluate_model", evaluate)
    assert main(args) == 0
    assert first_batches == [0, 2]  # resumed after 1 epoch of 2 steps
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["untrained"] is None and summary["epochs"] == 2
    assert [row["epoch"] for row in json.loads((run_dir / "history.json").read_text())] == [1, 2]


def test_the_demo_learns(tmp_path, monkeypatch):
    """The README's demo as it runs (RGA-SC from scratch, 300 steps on CPU), minus export and TensorBoard:
    retrieval on the unseen query/gallery identities must end far above the untrained network's."""
    monkeypatch.setenv("RGA_KERAS_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    assert main(["--demo", "--quiet", "--run-dir", str(run_dir), "-o", "export.enabled=false",
                 "-o", "training.tensorboard=false", "-o", "training.eval_every=12"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    untrained, trained = summary["untrained"]["after_bn"], summary["final"]["after_bn"]
    assert trained["mAP"] >= 2 * untrained["mAP"] and trained["mAP"] - untrained["mAP"] >= 0.05, (untrained, trained)
    assert trained["rank1"] >= 2 * untrained["rank1"], (untrained, trained)


def test_a_failed_export_is_reported_and_recorded(monkeypatch, capsys):
    """An export error after training becomes a line of output and a summary entry, not a traceback."""
    from rga_keras import export

    def fail(*args, **kwargs):
        raise export.ParityError("tflite_int8: mean cosine similarity 0.5 < 0.98", {})

    monkeypatch.setattr(export, "export_all", fail)
    data = type("Data", (), {"train": [], "query": [], "gallery": []})()
    record = experiment.export_model(None, data, experiment.demo_config(), Path("unused"))
    assert record == {"passed": False, "error": "tflite_int8: mean cosine similarity 0.5 < 0.98", "artefacts": {}}
    assert "export FAILED, nothing was published: tflite_int8" in capsys.readouterr().out

    # enforce=False (the demo): published despite a failed check, which is named under the table
    check = {"size_bytes": 1, "failures": ["mean cosine similarity 0.5 < 0.98"], "passed": False}
    report = {"checks": {"tflite_int8": check}, "passed": False, "artefacts": {"tflite_int8": "x.tflite"}}
    monkeypatch.setattr(export, "export_all", lambda *args, **kwargs: report)
    record = experiment.export_model(None, data, experiment.demo_config(), Path("unused"))
    assert not record["passed"] and record["artefacts"] == {"tflite_int8": "x.tflite"}
    out = capsys.readouterr().out
    assert "SOME CHECKS FAILED" in out and out.rstrip().endswith("tflite_int8: mean cosine similarity 0.5 < 0.98")
