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
from rga_keras.evaluation import evaluate
from rga_keras.evaluation import features as model_features
from rga_keras.models import FEATURES
from rga_keras.visualize.plots import ranked_list_layout
from rga_keras.cli import evaluate as rga_eval
from rga_keras.cli import visualize as rga_visualize
from tests.checks import small_rga_resnet

SIZE = (64, 32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny synthetic dataset at the model's input size and an untrained RGA-SC model saved as .keras (the RGA
    ResNet with one bottleneck per stage: these tests are about the programs, not the network's size).

    Its BNNeck gets the moving statistics of the training images' features, as training would give it: with
    the initial ones (mean 0, variance 1) after_bn is a multiple of before_bn and both rank alike."""
    tmp = tmp_path_factory.mktemp("cli")
    root = ensure_synthetic(tmp / "synth", num_ids=8, images_per_id=6, num_cameras=3, image_size=SIZE)
    data = load_dataset("market1501", root)
    keras.utils.set_random_seed(0)
    model = small_rga_resnet(data.num_train_ids, "sc", (*SIZE, 3))
    f = rga_keras.embedding_model(model, "before_bn")(read_images(data.train[:32]), training=False).numpy()
    bnneck = model.bnneck
    bnneck.moving_mean.assign(f.mean(axis=0))
    bnneck.moving_variance.assign(f.var(axis=0) + 1e-4)
    model.save(tmp / "model.keras")
    return tmp, root, data, model


def read_images(samples):
    return np.stack([tf.io.decode_image(tf.io.read_file(s.path), channels=3).numpy() for s in samples]).astype(
        np.float32)


def reference_features(model, data, flip, feature):
    """Query and gallery features straight from the model (one feature model per feature)."""
    embed = rga_keras.embedding_model(model, feature)

    def features(samples):
        x = read_images(samples)
        f = embed(x, training=False).numpy()
        return (f + embed(x[:, :, ::-1], training=False).numpy()) / 2 if flip else f

    return features(data.query), features(data.gallery)


def reference_metrics(model, data, flip, feature):
    """Rank-1 / mAP / mINP query by query (docs/DESIGN.md §4), cosine distance."""
    qf, gf = reference_features(model, data, flip, feature)
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


def table_rows(printed: str) -> dict[str, list[float]]:
    """The rows of rga-eval's table, by feature."""
    lines = [line.split() for line in printed.splitlines()]
    start = lines.index(["feature", "Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"]) + 1
    rows = {}
    for row in lines[start:]:
        if len(row) != 6 or row[0] not in FEATURES:
            break
        rows[row[0]] = [float(v) for v in row[1:]]
    return rows


def test_rga_eval_matches_a_brute_force_reference(setup, capsys, monkeypatch):
    tmp, root, data, model = setup
    calls, extract = [], model_features.extract_features

    def extract_features(*args, **kwargs):
        calls.append(extract(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(model_features, "extract_features", extract_features)
    out = tmp / "results" / "eval.json"
    code = rga_eval.main([str(tmp / "model.keras"), "--dataset", "market1501", "--data-root", str(root),
                          "--flip", "--json", str(out), "--batch-size", "7", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    # one forward pass over query and gallery gives both features
    assert [sorted(features) for features, _ in calls] == [["after_bn", "before_bn"]] * 2
    result = json.loads(out.read_text())
    assert result["features"] == ["after_bn", "before_bn"]
    assert result["flip"] is True and result["input_size"] == list(SIZE)
    rows = table_rows(printed)
    assert list(rows) == ["after_bn", "before_bn"]
    for feature in ("after_bn", "before_bn"):
        got, expected = result[feature], reference_metrics(model, data, flip=True, feature=feature)
        for key in ("rank1", "mAP", "mINP"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6), (feature, key)
        assert got["num_valid_queries"] == expected["num_valid_queries"] == len(data.query)
        assert len(got["cmc"]) == 50 and got["cmc"][0] == pytest.approx(got["rank1"])
        assert rows[feature] == pytest.approx([100 * got[k] for k in ("rank1", "rank5", "rank10", "mAP", "mINP")],
                                              abs=0.05)
    assert result["after_bn"]["mAP"] != pytest.approx(result["before_bn"]["mAP"], abs=1e-3)  # two features
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # written atomically, nothing left over


def test_repeated_evaluations_reuse_one_inference_model(setup, monkeypatch):
    """Training evaluates the same model many times: one inference model (traced once per batch shape) serves
    them all and follows the model's weights as they change."""
    from rga_keras.training.config import load_config

    tmp, root, data, _ = setup
    model = keras.models.load_model(tmp / "model.keras")
    config = load_config(None, ["model.input_size=[64, 32]", "eval.batch_size=16"])
    used, extract = [], model_features.extract_features

    def spy(embed, *args, **kwargs):
        features, meta = extract(embed, *args, **kwargs)
        used.append((embed, features))
        return features, meta

    monkeypatch.setattr(model_features, "extract_features", spy)
    for _ in range(2):
        model_features.evaluate_model(model, data, config)
    assert len(used) == 4 and all(embed is used[0][0] for embed, _ in used)
    bnneck = model.bnneck
    bnneck.moving_mean.assign(bnneck.moving_mean + np.linspace(-1, 1, bnneck.moving_mean.shape[0]))
    model_features.evaluate_model(model, data, config)
    before, after = used[0][1]["after_bn"], used[4][1]["after_bn"]  # query features, same images
    assert not np.allclose(before, after, atol=1e-3)  # the cached model computes with the current weights


def test_rga_eval_feature_restricts_and_flags_apply_to_each(setup, capsys, tmp_path):
    """--feature reports one feature; --metric and --rerank apply to whichever features are evaluated."""
    tmp, root, data, model = setup
    argv = [str(tmp / "model.keras"), "--dataset", "market1501", "--data-root", str(root), "--quiet",
            "--metric", "euclidean", "--rerank"]
    assert rga_eval.main(argv + ["--json", str(tmp_path / "both.json")]) == 0
    capsys.readouterr()
    assert rga_eval.main(argv + ["--feature", "before_bn", "--json", str(tmp_path / "one.json")]) == 0
    printed = capsys.readouterr().out
    assert "feature  before_bn; euclidean distance, flip off, re-ranking on" in printed
    assert list(table_rows(printed)) == ["before_bn"]
    both, one = (json.loads((tmp_path / name).read_text()) for name in ("both.json", "one.json"))
    assert one["features"] == ["before_bn"] and "after_bn" not in one
    for feature in ("after_bn", "before_bn"):
        qf, gf = reference_features(model, data, flip=False, feature=feature)
        q, g = data.query, data.gallery
        expected = evaluate(qf, gf, [s.person_id for s in q], [s.person_id for s in g], [s.camera_id for s in q],
                            [s.camera_id for s in g], metric="euclidean", rerank=True)
        for key in ("rank1", "rank5", "mAP", "mINP"):
            assert both[feature][key] == pytest.approx(expected[key], abs=1e-6), (feature, key)
    assert one["before_bn"]["mAP"] == pytest.approx(both["before_bn"]["mAP"], abs=1e-6)


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
    assert "is a file; expected a folder for the pictures" in _error(
        capsys, [good, "--data-root", str(root), "--out", str(junk)], main=rga_visualize.main)
    for argv in ([good], [good, "--data-root", str(root), "--split", "detected"]):  # argparse's own errors
        with pytest.raises(SystemExit) as exc:
            rga_eval.main(argv)
        assert exc.value.code == 2
    assert "--data-root is required" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
