"""Attention, relation and Grad-CAM pictures: the maps drawn are the ones the network applies.

The model is RGA-SC at 64×32 with random official-layout weights (tests/numpy_reference.py), so every
reference below is computed in NumPy from the PyTorch-layout parameters, independently of the Keras code.
"""
import matplotlib
import numpy as np
import pytest
from PIL import Image

import keras
import rga_keras
from rga_keras.visualize.attention_maps import (
    attention_maps,
    grad_cam,
    heat_overlay,
    node_box,
    plot_attention_maps,
    plot_grad_cam,
    plot_relation_maps,
    relation_to_target,
    target_node,
)
from rga_keras.visualize.plots import BORDER, ranked_list_layout
from tests import numpy_reference as ref

SIZE = (64, 32)
CELL = (SIZE[1], SIZE[0])  # (width, height)
STAGES = ("rga1", "rga2", "rga3", "rga4")


@pytest.fixture(scope="module")
def net():
    sd = ref.random_official_state_dict(input_hw=SIZE, num_classes=6, seed=3)
    sd["cls.weight"] *= 1000.0  # logits of order 1, so the predicted class is clear-cut
    model = rga_keras.build_rga_resnet50(6, "sc", input_shape=(*SIZE, 3))
    images = np.random.default_rng(4).uniform(0, 255, (2, *SIZE, 3)).astype(np.float32)
    calibrate_spatial_heads(model, sd, images)
    rga = dict(zip(STAGES, model.rga_layers))
    probe = keras.Model(model.input, {s: [rga[s].input, rga[s].output] for s in STAGES}
                        | {"pool": model.pool.input, "logits": model.output["logits"]})
    seen = {k: (np.asarray(v, np.float64) if k in ("pool", "logits") else [np.asarray(t, np.float64) for t in v])
            for k, v in probe(images, training=False).items()}
    return sd, model, images, attention_maps(model, images), seen


def calibrate_spatial_heads(model, sd, images):
    """Set each spatial head's last BatchNorm so that its scores on ``images`` are spread around 0.

    Random weights alone give maps saturated at 0 or 1, or flat, whose pictures would check little.
    Stage by stage, since a stage's input depends on the stages before it.
    """
    probe = keras.Model(model.input, [layer.input for layer in model.rga_layers])
    for k, stage in enumerate(STAGES):
        rga_keras.load_official_state_dict(model, sd)
        x_in = np.asarray(probe(images, training=False)[k], np.float64)
        p = spatial_params(sd, stage)
        p["W2"] = (p["W2"][0] * 1e-3, (1.0, 0.0, 0.0, 1.0 - ref.EPS))  # a = sigmoid(1e-3 · score), invertible
        a = np.concatenate([ref.rga_branch(x.reshape(-1, x.shape[-1]), p) for x in x_in])
        score = 1e3 * np.log(a / (1 - a))
        key = f"backbone.rga_att{stage[-1]}.W_spatial.4"
        for name, value in (("weight", 2.0), ("bias", 0.0), ("running_mean", score.mean()),
                            ("running_var", score.var() - ref.EPS)):
            sd[f"{key}.{name}"] = np.array([value], np.float32)
    rga_keras.load_official_state_dict(model, sd)


def spatial_params(sd, stage):
    return ref.official_rga_params({k: np.asarray(v, np.float64) for k, v in sd.items()},
                                   f"backbone.rga_att{stage[-1]}", "spatial")


def reference_attention(sd, stage, x_in):
    """The spatial attention of the stage's RGA module, computed by the NumPy reference (explicit R)."""
    h, w, c = x_in.shape[1:]
    p = spatial_params(sd, stage)
    return np.stack([ref.rga_branch(img.reshape(h * w, c), p).reshape(h, w) for img in x_in])


def reference_relation(sd, stage, x_in):
    """R = θ φᵀ from the stage's input and its PyTorch-layout θ/φ embeddings."""
    p = spatial_params(sd, stage)
    nodes = x_in.reshape(len(x_in), -1, x_in.shape[-1])
    return np.stack([ref.emb(n, *p["theta"]) @ ref.emb(n, *p["phi"]).T for n in nodes])


def bilinear(values, out_h, out_w):
    """Half-pixel-centre bilinear upsampling with edge clamping, written out."""
    h, w = values.shape

    def axis(n_out, n_in):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, wy = axis(out_h, h)
    x0, x1, wx = axis(out_w, w)
    top = values[y0][:, x0] * (1 - wx) + values[y0][:, x1] * wx
    bottom = values[y1][:, x0] * (1 - wx) + values[y1][:, x1] * wx
    return top * (1 - wy[:, None]) + bottom * wy[:, None]


def reference_overlay(image, values, alpha=0.5):
    span = values.max() - values.min()
    heat = bilinear((values - values.min()) / span if span > 0 else 0 * values, *image.shape[:2])
    colour = matplotlib.colormaps["jet"](heat)[..., :3] * 255
    return (1 - alpha) * image + alpha * colour


def cell_pixels(png, row, column, cell=CELL):
    x, y = ranked_list_layout(1, 1, cell)[0](row, column)
    top, left = y + BORDER, x + BORDER
    return np.asarray(Image.open(png).convert("RGB"), np.float64)[top : top + cell[1], left : left + cell[0]]


def test_spatial_attention_is_what_each_module_applies(net):
    sd, model, images, maps, seen = net
    for stage in STAGES:
        x_in, x_out = seen[stage]
        a_s = maps[stage]["spatial_attention"][..., 0]
        expected = reference_attention(sd, stage, x_in)
        np.testing.assert_allclose(a_s, expected, rtol=1e-4, atol=1e-5)
        for got, want in zip(a_s, expected):  # the pictures show each map min-max normalised
            assert np.ptp(want) > 0.3
            np.testing.assert_allclose((got - got.min()) / np.ptp(got), (want - want.min()) / np.ptp(want), atol=1e-4)
        # RGA-SC multiplies by the spatial, then the channel attention: out = x · a_s · a_c.
        applied = x_in * a_s[..., None] * maps[stage]["channel_attention"]
        np.testing.assert_allclose(x_out, applied, rtol=1e-4, atol=1e-4 * np.abs(x_out).max())


def test_attention_picture_shows_the_applied_maps(net, tmp_path):
    sd, model, images, maps, seen = net
    png = plot_attention_maps(images, maps, tmp_path / "attention.png")
    picture = Image.open(png)
    assert picture.size == ranked_list_layout(len(images), len(STAGES), CELL)[1]
    for row, image in enumerate(images):
        np.testing.assert_allclose(cell_pixels(png, row, 0), np.rint(image), atol=0.51)
        for column, stage in enumerate(STAGES, start=1):
            expected = reference_overlay(image, reference_attention(sd, stage, seen[stage][0])[row])
            got = cell_pixels(png, row, column)
            # One colour-table step of the jet map (~4 levels × alpha) allows for float32 rounding.
            assert np.abs(got - expected).max() <= 3 and np.abs(got - expected).mean() < 0.6, stage
    # A larger cell size enlarges every cell.
    big = plot_attention_maps(images[:1], maps, tmp_path / "big.png", cell_size=(64, 128))
    assert Image.open(big).size == ranked_list_layout(1, len(STAGES), (64, 128))[1]


def test_relation_maps_are_theta_phi_of_the_module(net, tmp_path):
    sd, model, images, maps, seen = net
    target = (37, 5)  # pixel row, column of the 64×32 image
    for stage in STAGES:
        x_in = seen[stage][0]
        h, w = x_in.shape[1:3]
        relation = reference_relation(sd, stage, x_in)
        np.testing.assert_allclose(maps[stage]["spatial_relation"], relation, rtol=1e-4, atol=1e-4 * relation.max())
        node = target_node(target, SIZE, (h, w))
        # The node is the grid cell whose pixel box holds the target.
        x0, y0, x1, y1 = node_box(node, (h, w), SIZE)
        assert y0 <= target[0] <= y1 and x0 <= target[1] <= x1 and (y1 - y0 + 1, x1 - x0 + 1) == (64 // h, 32 // w)
        outgoing, incoming = relation_to_target(maps[stage]["spatial_relation"], (h, w), node)
        t = node[0] * w + node[1]
        tol = dict(rel=1e-4, abs=1e-4 * relation.max())
        for i in range(len(images)):
            for j in range(h * w):
                assert outgoing[i, j // w, j % w] == pytest.approx(relation[i, t, j], **tol)
                assert incoming[i, j // w, j % w] == pytest.approx(relation[i, j, t], **tol)
    assert target_node((20, 10), SIZE, (16, 8)) == (5, 2)  # 20·16 // 64, 10·8 // 32

    png = plot_relation_maps(images, maps, target, tmp_path / "relations.png")
    assert Image.open(png).size == ranked_list_layout(len(images), 2 * len(STAGES), CELL)[1]
    # rga1 "t→all" of image 1, away from the target's outlined box (rows 36-39), is R[t, :] drawn.
    relation = reference_relation(sd, "rga1", seen["rga1"][0])
    t = target_node(target, SIZE, (16, 8))
    expected = reference_overlay(images[1], relation[1, t[0] * 8 + t[1]].reshape(16, 8))
    got = cell_pixels(png, 1, 1)
    assert np.abs(got[:30] - expected[:30]).max() <= 3
    assert np.all(cell_pixels(png, 1, 1)[36, 4:8] == 255)  # the outline of node (9, 1): x 4-7, y 36-39
    with pytest.raises(ValueError, match="inside the 64x32 image"):
        plot_relation_maps(images, maps, (64, 0), tmp_path / "x.png")


def test_grad_cam_matches_the_analytic_gradient(net, tmp_path):
    sd, model, images, maps, seen = net
    cams, classes, scores = grad_cam(model, images)
    logits, fmap = seen["logits"], seen["pool"]
    np.testing.assert_array_equal(classes, logits.argmax(axis=1))
    np.testing.assert_allclose(scores, logits[np.arange(2), classes], rtol=1e-5)
    # Pool → BNNeck (inference: affine) → linear classifier, so
    # ∂y_c/∂A_k(h, w) = W[c, k]·γ_k/√(σ_k²+ε)/(h·w) at every position.
    scale = sd["feat_bn.weight"] / np.sqrt(sd["feat_bn.running_var"] + 1e-5)
    h, w = fmap.shape[1:3]
    for i, c in enumerate(classes):
        alpha = sd["cls.weight"][c] * scale / (h * w)
        expected = np.maximum(np.einsum("hwk,k->hw", fmap[i], alpha), 0)
        assert expected.max() > 0
        np.testing.assert_allclose(cams[i], expected, rtol=1e-4, atol=1e-5 * expected.max())
    given, given_classes, given_scores = grad_cam(model, images, class_ids=[5, 0])
    assert list(given_classes) == [5, 0]
    np.testing.assert_allclose(given_scores, logits[[0, 1], [5, 0]], rtol=1e-5)
    with pytest.raises(ValueError, match=r"one class in \[0, 6\)"):
        grad_cam(model, images, class_ids=[6, 0])

    png = plot_grad_cam(images, cams, tmp_path / "cam.png", labels=["a", "b"])
    assert Image.open(png).size == ranked_list_layout(2, 1, CELL)[1]
    got = cell_pixels(png, 0, 1)
    assert np.abs(got - reference_overlay(images[0], cams[0])).max() <= 3


def test_bad_inputs_are_clear_errors(net, tmp_path):
    sd, model, images, maps, seen = net
    with pytest.raises(ValueError, match="takes 64x32 images"):
        attention_maps(model, np.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"images must be a non-empty batch"):
        grad_cam(model, np.zeros((64, 32, 3)))
    with pytest.raises(ValueError, match="no RGA module has a 'spatial_attention' map"):
        plot_attention_maps(images, {"rga1": {"channel_attention": np.ones((2, 1, 1, 8))}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="alpha must be in"):
        heat_overlay(images[0], np.ones((4, 2)), alpha=2)
    flat = heat_overlay(np.zeros((8, 4, 3)), np.full((4, 2), 0.7))  # a constant map shows as the lowest colour
    np.testing.assert_array_equal(flat, np.rint(0.5 * np.array(matplotlib.colormaps["jet"](0.0)[:3]) * 255)
                                  * np.ones((8, 4, 1)))
    assert not list(tmp_path.iterdir())  # nothing half-written
