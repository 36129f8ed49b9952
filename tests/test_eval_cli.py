"""rga-eval and rga-visualize: results against a brute-force reference, the files written, clear errors."""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import rga_keras
from rga_keras.data import load_dataset
from rga_keras.data.synthetic import ensure_synthetic
from rga_keras.visualize import ranked_list_layout
from train import evaluate as rga_eval
from train import visualize as rga_visualize

SIZE = (64, 32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny synthetic dataset at the model's input size and an untrained RGA-SC model saved as .keras."""
    tmp = tmp_path_factory.mktemp("cli")
    root = ensure_synthetic(tmp / "synth", num_ids=8, images_per_id=6, num_cameras=3, image_size=SIZE)
    data = load_dataset("market1501", root)
    keras.utils.set_random_seed(0)
    model = rga_keras.build_rga_resnet50(data.num_train_ids, "sc", input_shape=(*SIZE, 3))
    model.save(tmp / "model.keras")
    return tmp, root, data, model


def reference_metrics(model, data, flip):
    """Features straight from the model, then Rank-1 / mAP / mINP query by query (DESIGN.md §4)."""
    embed = rga_keras.embedding_model(model, "after_bn")

    def features(samples):
        x = np.stack([tf.io.decode_image(tf.io.read_file(s.path), channels=3).numpy() for s in samples])
        x = x.astype(np.float32)
        f = embed(x, training=False).numpy()
        return (f + embed(x[:, :, ::-1], training=False).numpy()) / 2 if flip else f

    qf, gf = features(data.query), features(data.gallery)
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    rank1, ap, inp = [], [], []
    for i, q in enumerate(data.query):
        kept = [j for j, g in enumerate(data.gallery)
                if not (g.person_id == q.person_id and g.camera_id == q.camera_id)]
        ranked = sorted(kept, key=lambda j: (1.0 - qf[i] @ gf[j], j))
        hits = [r for r, j in enumerate(ranked, start=1) if data.gallery[j].person_id == q.person_id]
        if hits:
            rank1.append(hits[0] == 1)
            ap.append(np.mean([k / r for k, r in enumerate(hits, start=1)]))
            inp.append(len(hits) / hits[-1])
    return {"rank1": np.mean(rank1), "mAP": np.mean(ap), "mINP": np.mean(inp), "num_valid_queries": len(ap)}


def test_rga_eval_matches_a_brute_force_reference(setup, capsys):
    tmp, root, data, model = setup
    out = tmp / "results" / "eval.json"
    code = rga_eval.main([str(tmp / "model.keras"), "--dataset", "market1501", "--data-root", str(root),
                          "--flip", "--json", str(out), "--batch-size", "7", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    result = json.loads(out.read_text())
    expected = reference_metrics(model, data, flip=True)
    for key in ("rank1", "mAP", "mINP"):
        assert result[key] == pytest.approx(expected[key], abs=1e-6), key
    assert result["num_valid_queries"] == expected["num_valid_queries"] == len(data.query)
    assert result["flip"] is True and result["feature"] == "after_bn" and result["input_size"] == list(SIZE)
    assert len(result["cmc"]) == 50 and result["cmc"][0] == pytest.approx(result["rank1"])
    lines = [line.split() for line in printed.splitlines()]
    row = lines[lines.index(["Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"]) + 1]
    assert [float(v) for v in row] == pytest.approx(
        [100 * result[k] for k in ("rank1", "rank5", "rank10", "mAP", "mINP")], abs=0.05)
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # written atomically, nothing left over


def test_rga_visualize_writes_every_picture(setup, capsys):
    tmp, root, data, model = setup
    run_dir = tmp / "run"
    run_dir.mkdir()
    (run_dir / "history.json").write_text(json.dumps([{"epoch": 1, "loss": 5.0, "val_rank1": 0.1, "val_mAP": 0.05},
                                                      {"epoch": 2, "loss": 4.0, "val_rank1": 0.2, "val_mAP": 0.1}]))
    out = tmp / "pictures"
    code = rga_visualize.main([str(tmp / "model.keras"), "--dataset", "market1501", "--data-root", str(root),
                               "--out", str(out), "--num-queries", "3", "--run-dir", str(run_dir), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    cell = (128, 256)  # the 32-pixel-wide input enlarged 4× to reach 128 pixels
    expected_sizes = {
        "ranked_lists.png": ranked_list_layout(3, 10, (64, 128))[1],
        "attention.png": ranked_list_layout(3, 4, cell)[1],  # image | rga1..rga4
        "relations.png": ranked_list_layout(3, 8, cell)[1],  # image | (t→all, all→t) × 4 stages
        "grad_cam.png": ranked_list_layout(3, 1, cell)[1],
        "training_curves.png": (1200, 350),
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(expected_sizes)
    umask = os.umask(0)
    os.umask(umask)
    for name, size in expected_sizes.items():
        assert Image.open(out / name).size == size, name
        assert str(out / name) in printed
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's 0600


def _error(capsys, argv, main=rga_eval.main) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_clear_errors(setup, capsys, tmp_path):
    tmp, root, data, model = setup
    good = str(tmp / "model.keras")
    assert "does not exist" in _error(capsys, [str(tmp_path / "none.keras"), "--data-root", str(root)])
    not_reid = tmp_path / "other.keras"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(not_reid)
    assert "is not an RGA re-id model" in _error(capsys, [str(not_reid), "--data-root", str(root)])
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model")
    assert "could not load" in _error(capsys, [str(junk), "--data-root", str(root)])
    assert "dataset root" in _error(capsys, [good, "--data-root", str(tmp_path / "missing")])
    message = _error(capsys, [good, "--data-root", str(root), "--image-size", "128", "64"])
    assert "built for 64x32 images, but --image-size is 128x64" in message
    history = _error(capsys, [good, "--data-root", str(root), "--out", str(tmp_path / "p"), "--run-dir", str(tmp_path)],
                     main=rga_visualize.main)
    assert "holds no history.json or history.csv" in history
    assert "outside the model's 64x32 input" in _error(
        capsys, [good, "--data-root", str(root), "--out", str(tmp_path / "p"), "--target", "64", "0"],
        main=rga_visualize.main)
    for argv in ([good], [good, "--data-root", str(root), "--split", "detected"]):  # argparse's own errors
        with pytest.raises(SystemExit) as exc:
            rga_eval.main(argv)
        assert exc.value.code == 2
    assert "--data-root is required" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
