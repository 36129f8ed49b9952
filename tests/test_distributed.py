"""rga-train under tf.distribute: 2 logical CPU replicas in this process, 2 worker processes on localhost."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from rga_keras import experiment
from rga_keras.data import CorruptImages, load_dataset, make_train_dataset
from rga_keras.data.synthetic import generate
from rga_keras.training import distribute_pk_dataset, get_strategy
from train.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
# The smallest run that still trains, evaluates and checkpoints: 16 synthetic identities (8 to train), RGA-C on
# the last stage only, 32×32 input, P×K = 4×2 (2 identities per replica on 2 replicas), 2 steps per epoch.
TINY = ["--quiet", "-o", "dataset.num_ids=16", "-o", "dataset.images_per_id=4", "-o", "model.input_size=[32, 32]",
        "-o", "model.attention=c", "-o", "model.rga_stages=[4]", "-o", "sampler.num_ids_per_batch=4",
        "-o", "sampler.images_per_id=2", "-o", "training.steps_per_epoch=2", "-o", "training.tensorboard=false",
        "-o", "export.enabled=false", "-o", "eval.batch_size=32"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The synthetic dataset TINY trains on, generated once for the module (rga-train finds it by its size)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["RGA_KERAS_CACHE"] = str(path)
    yield path
    os.environ.pop("RGA_KERAS_CACHE", None)


def batches(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def test_replica_slices_are_the_global_batch(tmp_path):
    """Each replica's slice holds whole identities and equals its part of the global batch, augmentations
    included, whether built alone (one worker's replicas) or fed through distribute_pk_dataset."""
    generate(tmp_path, num_ids=16, images_per_id=4, num_cameras=2, image_size=(32, 16))
    samples = load_dataset("market1501", tmp_path).train
    kwargs = dict(num_ids_per_batch=4, images_per_id=2, image_size=(16, 8), num_replicas=2, first_batch=3)
    log = CorruptImages()
    whole = batches(make_train_dataset(samples, corrupt_log=log, **kwargs), 3)
    assert log.count == log.unexplained == 0  # a stream resumed at batch 3 reports nothing dropped
    both = batches(make_train_dataset(samples, replicas=(0, 2), **kwargs), 6)
    second = batches(make_train_dataset(samples, replicas=(1, 1), **kwargs), 3)
    for step, (x, y) in enumerate(whole):
        for r in range(2):
            np.testing.assert_array_equal(both[2 * step + r][0], x[4 * r:4 * r + 4])
            np.testing.assert_array_equal(both[2 * step + r][1], y[4 * r:4 * r + 4])
            assert sorted(np.unique(y[4 * r:4 * r + 4], return_counts=True)[1]) == [2, 2]
        np.testing.assert_array_equal(second[step][0], x[4:])
    strategy = get_strategy(devices=["/cpu:0", "/cpu:1"])
    fed = iter(distribute_pk_dataset(strategy, lambda r: make_train_dataset(samples, replicas=r, **kwargs)))
    for x, y in whole:
        local = strategy.experimental_local_results(next(fed)[1])
        np.testing.assert_array_equal(np.concatenate([v.numpy() for v in local]), y)
    with pytest.raises(ValueError, match=r"replicas=\(1, 2\) must lie within the num_replicas=2"):
        make_train_dataset(samples, replicas=(1, 2), **kwargs)


def test_global_batch_and_learning_rate_rule():
    config = experiment.load_config(None, ["sampler.num_ids_per_batch=32"])  # batch 128 = 2 × the paper's 64
    assert experiment.lr_factor(config) == 2.0
    line = experiment.distribution_line(config, 4, 2)
    assert line == ("global batch 128 images (32 identities × 4) over 4 replica(s) on 2 worker(s): 32 images "
                    "(8 identities) per replica; lr 0.0016 = base_lr 0.0008 (for batch 64) × 2 (linear scaling)")
    config["optimizer"]["lr_scaling"] = "sqrt"
    assert experiment.lr_factor(config) == pytest.approx(2 ** 0.5)
    with pytest.raises(ValueError, match=r"global batch of 48 images \(P=12 identities × K=4\) cannot be split "
                                         r"into 8 replicas .* multiple of replicas × K = 32"):
        experiment.check_config(experiment.load_config(None, ["sampler.num_ids_per_batch=12"]), num_replicas=8)
    with pytest.raises(ValueError, match="lr_scaling must be one of"):
        experiment.load_config(None, ["optimizer.lr_scaling=cubic"])


@pytest.mark.slow  # 3 runs: ≈ 2.5 min on 2 idle cores (7 min with the cores shared)
def test_rga_train_mirrored_matches_one_device_and_resumes(cache, tmp_path, monkeypatch, capsys):
    """rga-train on 2 logical CPU replicas, interrupted during epoch 3 and resumed, follows the one-device run
    with the same global batch (synchronised BatchNorm; the triplet loss mines inside each replica's slice)."""
    args = TINY + ["-o", "training.epochs=3", "-o", "training.eval_every=3", "-o", "training.sync_bn=true"]
    assert main(args + ["--run-dir", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    mirrored = args + ["--run-dir", str(tmp_path / "two"), "-o", "training.devices=[/cpu:0, /cpu:1]"]
    evaluate, calls = experiment.evaluate_model, []

    def interrupt_second(*a, **k):  # untrained, then Ctrl-C in epoch 3 (its evaluation, before its backup)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    monkeypatch.setattr(experiment, "evaluate_model", interrupt_second)
    assert main(mirrored) == 130
    monkeypatch.setattr(experiment, "evaluate_model", evaluate)
    assert main(mirrored) == 0
    out = capsys.readouterr().out
    assert "over 2 replica(s) on 1 worker(s): 4 images (2 identities) per replica" in out
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["replicas"] == 2 and two["untrained"] is None and two["final"]["after_bn"]["mAP"] > 0
    history = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    # Cross entropy follows the one-device run within 1 % (measured: 0.3 % at most); the triplet term does not
    # match by design: each replica mines its hardest negatives among its own 2 identities, not all 4, so it
    # reads lower (measured 2.95 vs 3.57 in epoch 1; docs/TRAINING.md).
    np.testing.assert_allclose([row["logits_loss"] for row in history], one["history"]["logits_loss"], rtol=0.01)
