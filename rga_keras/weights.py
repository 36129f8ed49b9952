"""Loading pretrained weights: ImageNet backbones and trained models of the official PyTorch RGA code.

Sources:
- ``"imagenet"``: Keras' ResNet50 ``*_notop.h5`` (downloaded and cached by Keras as usual). It is a ResNet
  v1 trained on Caffe-style inputs (BGR, mean subtracted, no scaling): the first convolution is adapted to
  our RGB, mean/std-normalised input, conv biases are folded into the BatchNorm that follows, and the
  weights are loaded into our v1.5 layout (the stride moves from the 1×1 to the 3×3 conv of the first
  block of a stage; fine-tuning absorbs the difference, as is common practice).
- a torchvision ``resnet50`` state dict (``.npz`` of name → array, or ``.pth`` with torch installed): the
  exact v1.5 backbone, loaded exactly.
- `load_official_state_dict`: a whole trained network of the official code (key names in docs/DESIGN.md §6).
PyTorch tensors are NCHW/OIHW; convolutions become HWIO, linear (out, in) becomes Dense (in, out).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import keras
import numpy as np

from rga_keras.reading import naming

KERAS_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
KERAS_NOTOP_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + KERAS_NOTOP_FILE
KERAS_NOTOP_MD5 = "4d473c1dd8becc155b73f8504c6f6626"
# The normalisation ImageNet-trained torchvision weights expect; our models apply it to raw 0–255 pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _keras_app_name(torch_prefix: str) -> str:
    """A torchvision ResNet-50 key prefix → the layer name in keras.applications.ResNet50."""
    if torch_prefix in ("conv1", "bn1"):
        return f"conv1_{torch_prefix[:-1]}"
    stage, block, *rest = torch_prefix[len("layer"):].split(".")
    name = f"conv{int(stage) + 1}_block{int(block) + 1}"
    if rest[0] == "downsample":
        return f"{name}_0_{'conv' if rest[1] == '0' else 'bn'}"
    return f"{name}_{rest[0][-1]}_{rest[0][:-1]}"


def _backbone(model: Any) -> Any:
    """The `RGAResNetBackbone` of a re-id model (or the backbone itself)."""
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "resnet_layers"):
        raise ValueError(f"expected an RGA re-id model or its RGAResNetBackbone, got {type(model).__name__}")
    return backbone


# -- assigning arrays -------------------------------------------------------------------------------------
def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _assign(variable: keras.Variable, value: np.ndarray, source: str) -> None:
    value = np.asarray(value, dtype=np.float32)
    if tuple(variable.shape) != value.shape:
        raise ValueError(
            f"{source}: expected shape {tuple(variable.shape)} for {variable.path}, found {value.shape}. "
            f"Was the source network built for another input size or architecture?"
        )
    variable.assign(value)


def _set_bn(layer: keras.layers.BatchNormalization, gamma, beta, mean, var, source: str) -> None:
    for variable, value in zip((layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance),
                               (gamma, beta, mean, var)):
        _assign(variable, value, source)


class _StateDict:
    """Reads a PyTorch-style state dict, remembering which keys were used so leftovers can be reported."""

    def __init__(self, state: Mapping[str, Any], source: str) -> None:
        self.state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        self.source = source
        self.used: set[str] = set()

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise KeyError(f"{self.source}: missing key '{key}' (found {len(self.state)} keys, e.g. "
                           f"{sorted(self.state)[:3]})")
        self.used.add(key)
        return _to_numpy(self.state[key])

    def conv(self, prefix: str) -> np.ndarray:
        return np.transpose(self(prefix + ".weight"), (2, 3, 1, 0))  # OIHW → HWIO

    def bn(self, prefix: str) -> list[np.ndarray]:
        return [self(f"{prefix}.{k}") for k in ("weight", "bias", "running_mean", "running_var")]

    def unused(self) -> list[str]:
        return sorted(k for k in self.state if k not in self.used and not k.endswith("num_batches_tracked"))


def _load_backbone(model: Any, sd: _StateDict, prefix: str) -> None:
    for torch_name, layer, kind in _backbone(model).resnet_layers():
        if kind == "conv":
            _assign(layer.kernel, sd.conv(prefix + torch_name), sd.source)
        else:
            _set_bn(layer, *sd.bn(prefix + torch_name), source=sd.source)


# -- public entry points ----------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a state dict from ``.npz`` (no extra needed) or ``.pth``/``.pt``/``.tar`` (needs torch).

    A checkpoint dict holding ``"state_dict"`` (as the official code saves) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if path.suffix in (".pth", ".pt", ".tar"):
        try:
            import torch
        except ImportError as exc:
            raise ImportError(
                f"reading {path.name} needs PyTorch: pip install 'rga-keras[torch]', or convert it once to .npz "
                f"with numpy.savez(out, **{{k: v.numpy() for k, v in state_dict.items()}})"
            ) from exc
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        return {k: _to_numpy(v) for k, v in state.items() if hasattr(v, "shape")}
    raise ValueError(f"unsupported weights file {path.name}: expected .h5 (Keras), .npz, .pth, .pt or .tar")


def load_torchvision_resnet50(model: Any, state_dict: Mapping[str, Any], prefix: str = "") -> None:
    """Load a torchvision ResNet-50 state dict (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...) exactly.

    The ``fc.*`` classifier of ImageNet is ignored; any other unused key is an error.
    """
    sd = _StateDict(state_dict, "torchvision state dict")
    _load_backbone(model, sd, prefix)
    leftover = [k for k in sd.unused() if not k.startswith(prefix + "fc.")]
    if leftover:
        raise ValueError(f"torchvision state dict: {len(leftover)} keys not used by ResNet-50, e.g. {leftover[:5]}")


def load_keras_resnet50_h5(model: Any, path: str | os.PathLike) -> None:
    """Load keras.applications ResNet50 weights (``*_notop.h5`` or full) into our backbone (see module doc)."""
    import h5py

    path = Path(path)
    with naming(path, "Keras ResNet-50 weights (HDF5)"), h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f

        def arrays(name: str) -> list[np.ndarray]:
            if name not in root:
                raise ValueError(f"{path.name}: layer '{name}' not found; is this a Keras ResNet50 weights file?")
            group = root[name]
            names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
            return [np.asarray(group[n], dtype=np.float32) for n in names]

        bias = None
        for torch_name, layer, kind in _backbone(model).resnet_layers():  # each conv is followed by its BN
            values = arrays(_keras_app_name(torch_name))
            if kind == "conv":
                kernel, bias = values
                if torch_name == "conv1":  # BGR caffe input → RGB input normalised by ImageNet std (module doc)
                    kernel = kernel[:, :, ::-1, :] * (255.0 * np.asarray(IMAGENET_STD, np.float32))[None, None, :, None]
                _assign(layer.kernel, kernel, path.name)
            else:
                gamma, beta, mean, var = values
                # BN(conv(x) + b) == BN'(conv(x)) with the moving mean shifted by b.
                _set_bn(layer, gamma, beta, mean - bias, var, path.name)


def load_backbone_weights(model: Any, weights: str | os.PathLike) -> None:
    """Load ImageNet weights into a re-id model's (or a backbone's) ResNet-50 layers: ``"imagenet"`` or a local
    ``.h5`` / ``.npz`` / ``.pth`` file (see the module doc)."""
    if weights == "imagenet":
        cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / KERAS_NOTOP_FILE
        try:
            path = keras.utils.get_file(KERAS_NOTOP_FILE, KERAS_NOTOP_URL, cache_subdir="models",
                                        file_hash=KERAS_NOTOP_MD5)
        except Exception as exc:  # offline, proxy, truncated download...
            raise ConnectionError(  # an OSError: the programs report it in one line (rga_keras.cli)
                f"could not download the ImageNet ResNet50 weights ({exc}). Offline? Put the file "
                f"{KERAS_NOTOP_FILE} (from {KERAS_NOTOP_URL}) at {cached}, or pass backbone_weights= a local "
                f"Keras *_notop.h5 or a torchvision resnet50 state dict (.npz/.pth), or train from scratch "
                f"with backbone_weights=None (rga-train -o model.backbone_weights=null)."
            ) from exc
        load_keras_resnet50_h5(model, path)
        return
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone_weights: expected None, 'imagenet' or an existing .h5/.npz/.pth file, found no file at {path}"
        )
    if path.suffix == ".h5":
        load_keras_resnet50_h5(model, path)
    else:
        load_torchvision_resnet50(model, read_state_dict(path))


def _load_rga_branch(branch: Any, sd: _StateDict, prefix: str) -> None:
    """Official ``rga_attK.{theta,phi,gx,gg,W}_{spatial,channel}`` → our fused layout ([θ | φ | g] columns)."""
    axis = branch.axis
    options = branch.options
    if options.embedding != "asymmetric" or not (options.use_relation and options.use_original):
        raise ValueError("official weights exist only for the full RGA module (asymmetric, relation + original)")
    names = [f"{prefix}.{part}_{axis}" for part in ("theta", "phi", "gx")]
    kernel = np.concatenate([sd.conv(n + ".0")[0, 0] for n in names], axis=1)
    _assign(branch.embed_kernel, kernel, sd.source)
    bn = [np.concatenate(parts) for parts in zip(*(sd.bn(n + ".1") for n in names))]
    _set_bn(branch.embed_bn, *bn, source=sd.source)
    _assign(branch.relation_kernel, sd.conv(f"{prefix}.gg_{axis}.0")[0, 0], sd.source)
    _set_bn(branch.relation_bn, *sd.bn(f"{prefix}.gg_{axis}.1"), source=sd.source)
    head = f"{prefix}.W_{axis}"
    _assign(branch.head_kernel1, sd.conv(head + ".0")[0, 0], sd.source)
    _set_bn(branch.head_bn1, *sd.bn(head + ".1"), source=sd.source)
    _assign(branch.head_kernel2, sd.conv(head + ".3")[0, 0], sd.source)
    _set_bn(branch.head_bn2, *sd.bn(head + ".4"), source=sd.source)


def load_official_state_dict(model: Any, state_dict: Mapping[str, Any] | str | os.PathLike,
                             strict: bool = True) -> None:
    """Import a network trained with the official PyTorch RGA code (key names: docs/DESIGN.md §6).

    ``model`` must be an RGA-SC re-id model, e.g. ``build_rga_resnet50(num_classes, attention="sc",
    input_shape=<training size>)``.
    ``state_dict`` maps names to arrays (numpy or torch), or is a ``.npz``/``.pth`` path. In inference mode
    the Keras model then computes the official network's outputs up to float rounding. With ``strict``,
    keys that were not used (other than ``num_batches_tracked``) are an error.
    """
    if not isinstance(state_dict, Mapping):
        state_dict = read_state_dict(state_dict)
    sd = _StateDict(state_dict, "official state dict")
    if not (hasattr(model, "bnneck") and hasattr(model, "classifier")):
        raise ValueError(f"official checkpoints hold the whole re-id network: expected an RGAReID model (with its "
                         f"BNNeck and classifier), got {type(model).__name__}")
    backbone = _backbone(model)
    if backbone.attention != "sc" or tuple(backbone.rga_stages) != (1, 2, 3, 4):
        raise ValueError(f"official checkpoints hold an RGA-SC module after every stage; model '{model.name}' has "
                         f"attention {backbone.attention!r} after stages {tuple(backbone.rga_stages)}")
    _load_backbone(backbone, sd, "backbone.")
    for stage, layer in enumerate(backbone.rga_layers, start=1):
        for branch in (layer.spatial, layer.channel):
            _load_rga_branch(branch, sd, f"backbone.rga_att{stage}")
    _set_bn(model.bnneck, *sd.bn("feat_bn"), source=sd.source)
    _assign(model.classifier.kernel, sd("cls.weight").T, sd.source)
    if strict and sd.unused():
        raise ValueError(f"official state dict: {len(sd.unused())} keys were not used, e.g. {sd.unused()[:5]}")
