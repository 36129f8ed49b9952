"""Training helpers: distribution equivalence, resume after a crash, atomic checkpoints, errors."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import tensorflow as tf
import keras

from rga_keras import build_rga_resnet50
from rga_keras.optimizers import SGDL2, WarmupMultiStepSchedule, make_optimizer
from rga_keras.training import callbacks
from rga_keras.training.callbacks import AtomicBackupAndRestore, AtomicCheckpoint, completed_epochs, make_callbacks
from rga_keras.memory import explain_oom
from rga_keras.training.cluster import is_chief
from rga_keras.training.distribution import get_strategy
from rga_keras.training.model import compile_reid, set_precision, to_reid_targets, use_sync_batchnorm

from tests.numpy_reference import ref_batch_hard, ref_label_smoothing_ce

NUM_CLASSES = 6


def tiny_reid_model(seed=0):
    """Stand-in for the RGA model: images → {"features" (pre-BN), "logits"}."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 4, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    f = keras.layers.Dense(8, name="feat")(x)
    bn = keras.layers.BatchNormalization(name="bnneck")(f)
    logits = keras.layers.Dense(NUM_CLASSES, use_bias=False, name="cls")(bn)
    return keras.Model(inp, {"features": f, "logits": logits})


def reid_data(n_ids=4, k=2, seed=0):
    """Identity-contiguous images; the second half of the batch is shifted far from the first."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_ids), k)
    x = rng.normal(size=(n_ids * k, 8, 4, 3)).astype(np.float32)
    x[len(x) // 2:] += 3.0
    return x, labels


def dataset(x, y, batch):
    return to_reid_targets(tf.data.Dataset.from_tensor_slices((x, y)).batch(batch))


def one_step(strategy, weights, x, y):
    with strategy.scope():
        model = tiny_reid_model()
        model.set_weights(weights)
        assert use_sync_batchnorm(model) == 1
        compile_reid(model, optimizer=make_optimizer("sgd", learning_rate=0.1, weight_decay=0.1))
    hist = model.fit(dataset(x, y, len(x)), epochs=1, verbose=0, shuffle=False)
    return hist.history["loss"][0], model.get_weights()


def test_sync_batchnorm_survives_saving(tmp_path):
    """Every BatchNorm, the RGA modules' own included, is still synchronised after a .keras round trip."""
    model = build_rga_resnet50(4, "sc", input_shape=(64, 32, 3), rga_stages=(4,))

    def flags(m):
        return [layer.synchronized for layer in m._flatten_layers(include_self=False, recursive=True)
                if isinstance(layer, keras.layers.BatchNormalization)]

    count = use_sync_batchnorm(model)
    assert count == len(flags(model)) > 53 and all(flags(model))  # 53 in the backbone and BNNeck
    model.save(tmp_path / "m.keras")
    loaded = flags(keras.models.load_model(tmp_path / "m.keras"))
    assert len(loaded) == count and all(loaded)


def test_mirrored_two_replicas_match_one_device():
    """2 CPU replicas on identity-contiguous halves = one device on the global batch.

    SGD (not Adam) so any gradient scaling error shows; large L2 so a decay term added once per
    replica would show; synchronised BN so the batch statistics are the global ones."""
    x, y = reid_data()
    init = tiny_reid_model()
    weights = init.get_weights()
    # Setup check: each anchor's hardest negative lies in its own half, so per-replica mining
    # equals global mining; then the expected loss from the NumPy references.
    out = {k: v.numpy() for k, v in init(x, training=True).items()}
    half = len(x) // 2
    d = np.linalg.norm(out["features"][:, None] - out["features"][None], axis=-1)
    d[y[:, None] == y[None]] = np.inf
    assert np.all((d.argmin(1) < half) == (np.arange(len(x)) < half))
    want = ref_label_smoothing_ce(y, out["logits"], 0.1).mean() + ref_batch_hard(y, out["features"], 0.3).mean()

    loss1, w1 = one_step(tf.distribute.get_strategy(), weights, x, y)
    loss2, w2 = one_step(get_strategy(devices=["/cpu:0", "/cpu:1"]), weights, x, y)
    np.testing.assert_allclose(loss1, want, rtol=1e-5)
    np.testing.assert_allclose(loss2, want, rtol=1e-5)
    for a, b, w0 in zip(w1, w2, weights):
        assert not np.allclose(a, w0)  # every weight (and BN moving stat) changed
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_precision_and_xla_switches_train():
    """One step under XLA / mixed precision matches the plain float32 step."""
    x, y = reid_data()
    weights = tiny_reid_model().get_weights()
    loss_ref, w_ref = one_step(tf.distribute.get_strategy(), weights, x, y)
    for policy, jit, tol in [("float32", True, 1e-5), ("mixed_bfloat16", False, 3e-2),
                             ("mixed_float16", False, 1e-2)]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                set_precision(policy)
            model = tiny_reid_model()
            model.set_weights(weights)
            use_sync_batchnorm(model)
            compile_reid(model, optimizer=make_optimizer("sgd", learning_rate=0.1, weight_decay=0.1),
                         jit_compile=jit)
            loss = model.fit(dataset(x, y, len(x)), epochs=1, verbose=0, shuffle=False).history["loss"][0]
        finally:
            set_precision("float32")
        np.testing.assert_allclose(loss, loss_ref, rtol=tol, err_msg=policy)
        if policy == "mixed_float16":  # dynamic loss scaling may skip the first step: wrapper only
            assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
            assert isinstance(model.optimizer.inner_optimizer, SGDL2)
            continue
        for a, b in zip(model.get_weights(), w_ref):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=policy)


class Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("simulated crash")


def compiled_model(seed, weights=None):
    model = tiny_reid_model(seed)
    if weights is not None:
        model.set_weights(weights)
    sched = WarmupMultiStepSchedule(1e-2, 1e-3, warmup_epochs=1, milestones=(2, 3),
                                    steps_per_epoch=2)
    return compile_reid(model, optimizer=make_optimizer("adam", learning_rate=sched))


def test_resume_after_crash_continues_training(tmp_path):
    x, y = reid_data(n_ids=4, k=4)
    data = dataset(x, y, 8)  # 2 steps per epoch, no shuffling
    weights = tiny_reid_model(1).get_weights()
    reference = compiled_model(1, weights)
    reference.fit(data, epochs=4, verbose=0, shuffle=False)

    run = str(tmp_path / "run")
    crashed = compiled_model(1, weights)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit(data, epochs=4, verbose=0, shuffle=False, callbacks=make_callbacks(run) + [Crash()])
    assert json.load(open(os.path.join(run, "backup", "training_metadata.json")))["epoch"] == 2
    assert completed_epochs(run) == 2 and completed_epochs(str(tmp_path / "fresh")) == 0
    assert [r["epoch"] for r in json.load(open(os.path.join(run, "history.json")))] == [1, 2]
    assert os.path.isdir(os.path.join(run, "tensorboard"))

    resumed = compiled_model(2)  # fresh process stand-in: different initial weights
    hist = resumed.fit(data, epochs=4, verbose=0, shuffle=False,
                       callbacks=make_callbacks(run, checkpoint_best_monitor="loss"))
    assert hist.epoch == [2, 3] and int(resumed.optimizer.iterations) == 8
    for a, b in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    rows = json.load(open(os.path.join(run, "history.json")))
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert not os.path.exists(os.path.join(run, "backup"))  # removed once fit completed
    last = keras.saving.load_model(os.path.join(run, "last.keras"))
    for a, b in zip(last.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert json.load(open(os.path.join(run, "best.keras.json")))["value"] == min(
        r["loss"] for r in rows[2:])


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = compiled_model(0)
    path = str(tmp_path / "last.keras")
    cb = AtomicCheckpoint(path)
    cb.set_model(model)
    cb.on_epoch_end(0)
    good = open(path, "rb").read()

    def broken_save(filepath, **kw):
        with open(filepath, "wb") as f:
            f.write(good[: len(good) // 2])  # half a file, then the "kill"
        raise OSError("disk full")

    monkeypatch.setattr(model, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cb.on_epoch_end(1)
    assert open(path, "rb").read() == good
    assert os.listdir(tmp_path) == ["last.keras"]  # no temp file left behind
    keras.saving.load_model(path, compile=False)


def test_failed_backup_keeps_previous_backup(tmp_path, monkeypatch):
    model = compiled_model(0)
    cb = AtomicBackupAndRestore(str(tmp_path))
    cb.set_model(model)
    cb.on_epoch_end(0)
    files = {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path)}
    assert set(files) == {"latest.weights.h5", "training_metadata.json"}

    def broken(filepath, **kw):
        open(filepath, "wb").write(b"\x89HDF")
        raise OSError("killed")

    monkeypatch.setattr(model, "save_weights", broken)
    with pytest.raises(OSError):
        cb.on_epoch_end(1)
    assert {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path)} == files


def test_an_epochs_state_is_written_once_and_linked(tmp_path, monkeypatch):
    """last.keras is serialised; best.keras and the backup of the same epoch are the same file (a hard link),
    and stay that epoch's state when the next epoch replaces last.keras. Without hard links, a copy."""
    model = compiled_model(0)
    run = tmp_path / "run"
    callbacks = make_callbacks(str(run), tensorboard=False, checkpoint_best_monitor="loss", best_mode="min")
    for cb in callbacks:
        cb.set_model(model)
    last, best, backup = run / "last.keras", run / "best.keras", run / "backup" / "latest.keras"
    for cb in callbacks:
        cb.on_epoch_end(0, {"loss": 1.0})
    assert os.path.samefile(last, best) and os.path.samefile(last, backup)
    epoch1, weights1 = last.read_bytes(), model.get_weights()
    model.set_weights([w + 1 for w in weights1])
    for cb in callbacks:
        cb.on_epoch_end(1, {"loss": 2.0})  # not the best: best.keras stays epoch 1's
    assert os.path.samefile(last, backup) and not os.path.samefile(last, best)
    assert best.read_bytes() == epoch1 and last.read_bytes() != epoch1
    for a, b in zip(keras.saving.load_model(best, compile=False).get_weights(), weights1):
        np.testing.assert_array_equal(a, b)

    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    for cb in callbacks:
        cb.on_epoch_end(2, {"loss": 0.5})
    assert best.read_bytes() == last.read_bytes() == backup.read_bytes() and not os.path.samefile(last, best)
    assert sorted(p.name for p in run.iterdir()) == ["backup", "best.keras", "best.keras.json", "history.csv",
                                                     "history.json", "last.keras"]  # no temporaries left


def test_a_backup_of_the_other_kind_resumes(tmp_path):
    """The chief's backup is a link to last.keras (latest.keras); other workers', and backups written before links,
    are Keras' latest.weights.h5. Either resumes with the other kind of callback, weights, optimizer step and epoch."""
    trained = compiled_model(0)
    trained.optimizer.build(trained.trainable_variables)
    trained.optimizer.iterations.assign(8)
    last = AtomicCheckpoint(str(tmp_path / "last.keras"))
    for copy_of, other in ((None, last), (last, None)):
        backup_dir = tmp_path / f"backup-{copy_of is None}"
        for cb in [c for c in (copy_of, AtomicBackupAndRestore(str(backup_dir), copy_of=copy_of)) if c]:
            cb.set_model(trained)
            cb.on_epoch_end(1)
        fresh = compiled_model(1)
        backup = AtomicBackupAndRestore(str(backup_dir), copy_of=other)
        backup.set_model(fresh)
        backup.on_train_begin()
        assert fresh._initial_epoch == 2 and int(fresh.optimizer.iterations) == 8
        for a, b in zip(fresh.get_weights(), trained.get_weights()):
            np.testing.assert_array_equal(a, b)


def test_best_checkpoint_follows_monitor_across_restarts(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(callbacks, "save_model_atomic", lambda m, p: saved.append(p))
    path = str(tmp_path / "best.keras")
    cb = AtomicCheckpoint(path, monitor="val_mAP")  # auto mode: maximise
    cb.set_model(None)
    for epoch, value in enumerate([0.3, 0.2, None, 0.5]):
        cb.on_epoch_end(epoch, {} if value is None else {"val_mAP": value})
    assert len(saved) == 2 and json.load(open(path + ".json"))["epoch"] == 4
    again = AtomicCheckpoint(path, monitor="val_mAP")
    again.on_train_begin()
    again.on_epoch_end(4, {"val_mAP": 0.4})
    assert len(saved) == 2 and again.best == 0.5
    assert AtomicCheckpoint(path, monitor="val_loss").mode == "min"


def test_use_sync_batchnorm_reaches_nested_layers():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.BatchNormalization()(inner(inp)))
    assert use_sync_batchnorm(model) == 2
    assert all(l.synchronized for l in model._flatten_layers()
               if isinstance(l, keras.layers.BatchNormalization))


def test_strategy_choice_and_chief(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = get_strategy(devices=["/cpu:0", "/cpu:1"])
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 2
    if not tf.config.list_physical_devices("GPU"):
        assert get_strategy() is tf.distribute.get_strategy()
    assert is_chief()
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    for task, chief in [({"type": "worker", "index": 0}, True), ({"type": "worker", "index": 1}, False)]:
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
        assert is_chief() == chief
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        get_strategy()
    with pytest.raises(ValueError, match="strategy kind"):
        get_strategy("tpu")


def test_precision_and_input_errors():
    try:
        with pytest.raises(ValueError, match="mixed_float16"):
            set_precision("float16")
        if not tf.config.list_physical_devices("GPU"):
            with pytest.warns(UserWarning, match="slower"):
                set_precision("mixed_float16")
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
    finally:
        set_precision("float32")
    with pytest.raises(ValueError, match="'features' and 'logits'"):
        compile_reid(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]),
                     optimizer=make_optimizer())
    with pytest.raises(ValueError, match=r"\(images, labels\)"):
        to_reid_targets(tf.data.Dataset.range(3))
    with pytest.raises(MemoryError, match=r"^out of memory while training \(OOM when allocating tensor\); lower it$"):
        with explain_oom("while training", "lower it"):
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")


WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    import keras
    from rga_keras.optimizers import make_optimizer
    from rga_keras.training.callbacks import make_callbacks
    from rga_keras.training.distribution import get_strategy
    from rga_keras.training.model import compile_reid, use_sync_batchnorm
    from tests.test_training import tiny_reid_model

    strategy = get_strategy()
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    with strategy.scope():
        model = tiny_reid_model()
        use_sync_batchnorm(model)  # else each worker keeps its own BN moving statistics
        compile_reid(model, optimizer=make_optimizer("adam", 1e-3))

    def per_replica(ctx):  # each replica draws its own identity-contiguous P x K batch
        rng = np.random.default_rng(ctx.input_pipeline_id)
        y = np.repeat(np.arange(2) + 2 * ctx.input_pipeline_id, 2)
        x = rng.normal(size=(4, 8, 4, 3)).astype(np.float32)
        ds = tf.data.Dataset.from_tensors((x, {"logits": y, "features": y}))
        return ds.repeat()

    data = strategy.distribute_datasets_from_function(per_replica)
    callbacks = make_callbacks(sys.argv[2])  # only the chief (worker 0) writes files
    hist = model.fit(data, epochs=1, steps_per_epoch=3, verbose=0, shuffle=False, callbacks=callbacks)

    # What rga-train feeds fit: the plain P x K pipeline, which tf.distribute shards over the workers.
    from rga_keras.data import load_dataset, make_train_dataset
    train = make_train_dataset(load_dataset("market1501", sys.argv[3]).train, num_ids_per_batch=4,
                               images_per_id=2, image_size=(16, 8), augment=False, num_replicas=2)
    batches = iter(strategy.experimental_distribute_dataset(train))
    labels = [strategy.experimental_local_results(next(batches)[1])[0].numpy() for _ in range(3)]
    np.savez(sys.argv[1], *model.get_weights(), loss=hist.history["loss"], labels=np.stack(labels))
""")


def test_multi_worker_two_processes(tmp_path):
    """Two processes on 127.0.0.1 via TF_CONFIG (~20 s: two TensorFlow start-ups): fit trains both workers
    to the same weights, and the P x K pipeline gives each worker whole identities of the global batch."""
    from rga_keras.data import load_dataset, make_train_dataset
    from rga_keras.data.synthetic import generate

    generate(tmp_path / "data", num_ids=16, images_per_id=4, num_cameras=2, image_size=(32, 16))
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=root,
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / f"out{i}.npz"),
                                       str(tmp_path / "run"), str(tmp_path / "data")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    outs = [np.load(tmp_path / f"out{i}.npz") for i in range(2)]
    init = tiny_reid_model().get_weights()
    assert len(outs[0].files) == len(init) + 2
    for o in outs:
        assert o["loss"].shape == (1,) and np.isfinite(o["loss"]).all()
    for i, w0 in enumerate(init):  # both workers trained, and hold identical weights and BN stats
        assert not np.allclose(outs[0][f"arr_{i}"], w0)
        np.testing.assert_allclose(outs[1][f"arr_{i}"], outs[0][f"arr_{i}"], rtol=1e-6, atol=1e-7)
    assert sorted(os.listdir(tmp_path / "run")) == ["history.csv", "history.json", "last.keras",
                                                    "tensorboard"]
    # Each step, worker w gets slice w of the single-process global batch: whole identities, K=2 images each.
    train = make_train_dataset(load_dataset("market1501", tmp_path / "data").train, num_ids_per_batch=4,
                               images_per_id=2, image_size=(16, 8), augment=False, num_replicas=2)
    expected = np.stack([labels.numpy() for _, labels in train.take(3)])
    np.testing.assert_array_equal(np.concatenate([o["labels"] for o in outs], axis=1), expected)
    for o in outs:
        assert all(sorted(np.unique(step, return_counts=True)[1]) == [2, 2] for step in o["labels"])
