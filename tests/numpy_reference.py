"""Independent NumPy (float64) reference of the paper's network, written from docs/DESIGN.md §1–§2.

It works on PyTorch-layout parameters (OIHW kernels, official key names), builds the relation matrix R
explicitly and loops over images, so it shares nothing with the library's fused, channels-last code.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

EPS = 1e-5
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def relu(x):
    return np.maximum(x, 0.0)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def bn(x, p):
    """BatchNorm in inference mode over the last axis; p = (weight, bias, running_mean, running_var)."""
    w, b, m, v = p
    return (x - m) / np.sqrt(v + EPS) * w + b


def conv2d(x, w, stride=1, pad=0):
    """x (B, H, W, Ci), w (O, Ci, kh, kw) PyTorch layout, symmetric zero padding."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = w.shape[2:]
    win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # (B, H', W', Ci, kh, kw)
    return np.tensordot(win, w, axes=([3, 4, 5], [1, 2, 3]))


def maxpool3x3s2(x):
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    return sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-2, -1))


def emb(f, w, p):
    """emb(a→b): 1×1 conv without bias (w is (b, a) or (b, a, 1, 1)), BN, ReLU, on node rows of f."""
    return relu(bn(f @ w.reshape(w.shape[0], -1).T, p))


def rga_branch(nodes, p, use_relation=True, use_original=True, embedding="asymmetric"):
    """Attention weight per node for one image. nodes: (n, d) node features.

    p: dict with "theta", "phi", "gx", "gg", "W1", "W2" each (weight, bn params) in PyTorch layout.
    """
    parts = []
    if use_original:
        parts.append(emb(nodes, *p["gx"]).mean(axis=1, keepdims=True))
    if use_relation:
        if embedding == "asymmetric":
            theta, phi = emb(nodes, *p["theta"]), emb(nodes, *p["phi"])
        elif embedding == "symmetric":
            theta = phi = emb(nodes, *p["theta"])
        else:
            theta = phi = nodes
        R = theta @ phi.T  # R[i, j] = θ_i · φ_j
        rel_in = np.concatenate([R, R.T], axis=1)  # node i: [R[i, :], R[:, i]], row first, then column
        parts.append(emb(rel_in, *p["gg"]))
    y = np.concatenate(parts, axis=1)
    hidden = emb(y, *p["W1"])
    w2, bn2 = p["W2"]
    return sigmoid(bn(hidden @ w2.reshape(w2.shape[0], -1).T, bn2))[:, 0]


def rga_module(x, branches, mode="sc", **flags):
    """x (B, H, W, C); branches: {"spatial": p, "channel": p}; returns the attended x (DESIGN §1)."""

    def spatial(img):
        h, w, c = img.shape
        a = rga_branch(img.reshape(h * w, c), branches["spatial"], **flags)
        return a.reshape(h, w, 1)

    def channel(img):
        h, w, c = img.shape
        a = rga_branch(img.reshape(h * w, c).T, branches["channel"], **flags)
        return a.reshape(1, 1, c)

    out = []
    for img in x:
        if mode == "s":
            img = img * spatial(img)
        elif mode == "c":
            img = img * channel(img)
        elif mode == "sc":
            img = img * spatial(img)
            img = img * channel(img)
        elif mode == "cs":
            img = img * channel(img)
            img = img * spatial(img)
        else:  # "s//c"
            img = img * spatial(img) * channel(img)
        out.append(img)
    return np.stack(out)


def official_rga_params(sd, prefix, axis):
    def pair(name, conv="0", norm="1"):
        key = f"{prefix}.{name}_{axis}"
        return sd[f"{key}.{conv}.weight"], tuple(sd[f"{key}.{norm}.{k}"] for k in
                                                 ("weight", "bias", "running_mean", "running_var"))

    return {"theta": pair("theta"), "phi": pair("phi"), "gx": pair("gx"), "gg": pair("gg"),
            "W1": pair("W", "0", "1"), "W2": pair("W", "3", "4")}


def official_forward(sd, images, blocks=(3, 4, 6, 3), last_stride=1):
    """The official RGA-SC network in inference mode: images (B, H, W, 3) raw 0–255 → (f, f_bn, logits)."""
    sd = {k: np.asarray(v, dtype=np.float64) for k, v in sd.items()}

    def bnp(prefix):
        return tuple(sd[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))

    x = (np.asarray(images, np.float64) / 255.0 - MEAN) / STD
    x = relu(bn(conv2d(x, sd["backbone.conv1.weight"], 2, 3), bnp("backbone.bn1")))
    x = maxpool3x3s2(x)
    for stage, n in enumerate(blocks, start=1):
        for b in range(n):
            pre = f"backbone.layer{stage}.{b}"
            stride = (1 if stage == 1 else (last_stride if stage == 4 else 2)) if b == 0 else 1
            out = relu(bn(conv2d(x, sd[f"{pre}.conv1.weight"]), bnp(f"{pre}.bn1")))
            out = relu(bn(conv2d(out, sd[f"{pre}.conv2.weight"], stride, 1), bnp(f"{pre}.bn2")))
            out = bn(conv2d(out, sd[f"{pre}.conv3.weight"]), bnp(f"{pre}.bn3"))
            short = x
            if b == 0:
                short = bn(conv2d(x, sd[f"{pre}.downsample.0.weight"], stride), bnp(f"{pre}.downsample.1"))
            x = relu(out + short)
        att = f"backbone.rga_att{stage}"
        if f"{att}.theta_spatial.0.weight" in sd:
            x = rga_module(x, {a: official_rga_params(sd, att, a) for a in ("spatial", "channel")}, "sc")
    f = x.mean(axis=(1, 2))
    f_bn = bn(f, bnp("feat_bn"))
    return f, f_bn, f_bn @ sd["cls.weight"].T


def random_official_state_dict(input_hw=(256, 128), num_classes=10, seed=0, rga=True, prefix="backbone."):
    """Random weights under the official key names (DESIGN §6), shaped from the architecture alone."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(key, o, i, k=1):
        sd[key + ".weight"] = rng.normal(0, np.sqrt(2.0 / (i * k * k)), (o, i, k, k)).astype(np.float32)

    def norm(key, c, gain=1.0):
        sd[key + ".weight"] = (gain * rng.uniform(0.5, 1.0, c)).astype(np.float32)
        sd[key + ".bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[key + ".running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[key + ".running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[key + ".num_batches_tracked"] = np.array(7)

    conv(prefix + "conv1", 64, 3, 7)
    norm(prefix + "bn1", 64)
    h, w = input_hw[0] // 4, input_hw[1] // 4
    cin = 64
    for stage, (n, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        if stage in (2, 3):
            h, w = (h + 1) // 2, (w + 1) // 2
        for b in range(n):
            pre = f"{prefix}layer{stage}.{b}"
            conv(pre + ".conv1", width, cin)
            norm(pre + ".bn1", width)
            conv(pre + ".conv2", width, width, 3)
            norm(pre + ".bn2", width)
            conv(pre + ".conv3", 4 * width, width)
            norm(pre + ".bn3", 4 * width, gain=0.3)
            if b == 0:
                conv(pre + ".downsample.0", 4 * width, cin)
                norm(pre + ".downsample.1", 4 * width)
            cin = 4 * width
        if rga:
            att = f"{prefix}rga_att{stage}"
            for axis, nodes, feats in (("spatial", h * w, cin), ("channel", cin, h * w)):
                e, r = feats // 8, nodes // 8
                hid = max(1, (1 + r) // 8)
                for part in ("theta", "phi", "gx"):
                    conv(f"{att}.{part}_{axis}.0", e, feats)
                    norm(f"{att}.{part}_{axis}.1", e)
                conv(f"{att}.gg_{axis}.0", r, 2 * nodes)
                norm(f"{att}.gg_{axis}.1", r)
                conv(f"{att}.W_{axis}.0", hid, 1 + r)
                norm(f"{att}.W_{axis}.1", hid)
                conv(f"{att}.W_{axis}.3", 1, hid)
                norm(f"{att}.W_{axis}.4", 1)
    norm("feat_bn", 2048)
    sd["feat_bn.bias"][:] = 0.0
    sd["cls.weight"] = rng.normal(0, 0.001, (num_classes, 2048)).astype(np.float32)
    return sd


# --------------------------------------------------------------------------- the paper's losses (§2)

def ref_label_smoothing_ce(labels, logits, eps):
    """Per-sample CE against (1-eps)·onehot + eps/K, float64 loops."""
    out = []
    for y, z in zip(labels, logits.astype(np.float64)):
        logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
        target = np.full(len(z), eps / len(z))
        target[y] += 1.0 - eps
        out.append(-(target * logp).sum())
    return np.array(out)


def ref_batch_hard(labels, feats, margin, soft=False):
    """Per-anchor batch-hard triplet loss by explicit loops over every positive and negative."""
    f = feats.astype(np.float64)
    out = []
    for a in range(len(f)):
        d_ap, d_an = None, None
        for j in range(len(f)):
            d = np.sqrt(((f[a] - f[j]) ** 2).sum())
            if j != a and labels[j] == labels[a]:
                d_ap = d if d_ap is None else max(d_ap, d)
            elif labels[j] != labels[a]:
                d_an = d if d_an is None else min(d_an, d)
        if d_ap is None or d_an is None:
            out.append(0.0)
        elif soft:
            out.append(np.log1p(np.exp(d_ap - d_an)))
        else:
            out.append(max(0.0, d_ap - d_an + margin))
    return np.array(out)
