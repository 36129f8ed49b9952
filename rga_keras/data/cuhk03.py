"""CUHK03, new 767/700 protocol (Zhong et al., CVPR 2017), read from the .mat release files (or from the
images_labeled/ / images_detected/ folders the official RGA code and torchreid extract them into).

cuhk-03.mat (MATLAB v7.3, i.e. HDF5) holds, under ``labeled`` and ``detected``, one cell array per
camera pair; each has one row per person with 10 image cells (5 per camera, some empty). The images
are extracted once into a cache folder as ``{pair}_{person:03d}_{view}_{shot:02d}.png``, the names the
protocol files cuhk03_new_protocol_config_{labeled,detected}.mat list in ``filelist`` alongside
``labels``, ``train_idx``, ``query_idx`` and ``gallery_idx`` (1-based). The cache folder is
``<cache>/cuhk03/<split>`` (cache = ``cache_dir`` or :func:`cache_root`); only a folder carrying this
module's marker is ever replaced, never anything else in ``cache_dir``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rga_keras.checks import check_choice
from rga_keras.data._cache import build_atomically, cache_root, read_marker
from rga_keras.data.samples import Sample

SPLITS = ("labeled", "detected")  # the hand-labelled boxes, or the detector's
_CONFIG_KEYS = ("filelist", "labels", "train_idx", "query_idx", "gallery_idx")


def read_cuhk03(root: Path, split: str, cache_dir: str | Path | None) -> tuple[dict[str, list[Sample]], Path]:
    """Samples per split and the folder of their images: an already extracted ``images_<split>/`` folder in
    the release (the official RGA code's and torchreid's layout, same file names), else the images of
    cuhk-03.mat extracted on first use."""
    check_choice("cuhk03: split", split, SPLITS)
    folders = [p for p in _glob_levels(root, f"images_{split}") if p.is_dir()]
    mat_path = None if folders else _find(root, "cuhk-03.mat")
    config_path = _find(root, f"cuhk03_new_protocol_config_{split}.mat")
    if folders:
        images, source = folders[0], f"{folders[0]}/"
    else:
        images, source = _extract_once(mat_path, split, cache_dir), f"{mat_path} (under '{split}')"
    present = {p.name for p in images.iterdir()}

    config = _load_config(config_path)
    names = [str(np.ravel(cell)[0]) for cell in config["filelist"].ravel()]
    labels = config["labels"].ravel().astype(int)
    splits = {}
    for part in ("train", "query", "gallery"):
        samples = []
        for index in config[f"{part}_idx"].ravel().astype(int) - 1:
            name = names[index]
            if name not in present:
                raise FileNotFoundError(f"cuhk03: {config_path.name} lists {name}, which {source} does not "
                                        f"contain (are both from the same release?)")
            pair, _, view, _ = (int(field) for field in Path(name).stem.split("_"))
            samples.append(Sample(str(images / name), int(labels[index]), 2 * (pair - 1) + view))
        splits[part] = samples
    return splits, images


def _extract_once(mat_path: Path, split: str, cache_dir: str | Path | None) -> Path:
    """The images of ``split`` in cuhk-03.mat, extracted into ``<cache>/cuhk03/<split>`` unless already there."""
    stat = mat_path.stat()
    params = {"generator": "cuhk03-extract", "source": str(mat_path.resolve()), "size": stat.st_size,
              "mtime_ns": stat.st_mtime_ns, "split": split}
    images = (Path(cache_dir).expanduser() if cache_dir else cache_root()) / "cuhk03" / split
    if read_marker(images) != params:
        build_atomically(images, lambda tmp: _extract(mat_path, split, tmp), params, replace_foreign=False)
    return images


def _glob_levels(root: Path, name: str) -> list[Path]:
    """Paths called ``name`` in ``root`` or up to two folder levels below it, nearest first."""
    return [hit for pattern in (name, f"*/{name}", f"*/*/{name}") for hit in sorted(root.glob(pattern))]


def _find(root: Path, filename: str) -> Path:
    """``filename`` in ``root`` or up to two folder levels below it (e.g. cuhk03_release/)."""
    hits = _glob_levels(root, filename)
    if hits:
        return hits[0]
    raise FileNotFoundError(
        f"cuhk03: {filename} not found in {root} or two levels below; expected the CUHK03 release "
        f"(cuhk03_release/cuhk-03.mat, or its images already extracted in images_labeled/ and images_detected/) "
        f"and the new-protocol files cuhk03_new_protocol_config_labeled.mat and "
        f"cuhk03_new_protocol_config_detected.mat")


def _load_config(path: Path) -> dict:
    from scipy.io import loadmat

    try:
        config = loadmat(path)
    except (ValueError, OSError, NotImplementedError) as err:
        raise ValueError(f"cuhk03: cannot read {path} as a MATLAB .mat file: {err}") from None
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"cuhk03: {path} lacks {', '.join(missing)}; expected the new-protocol "
                         f"config with {', '.join(_CONFIG_KEYS)}")
    return config


def _extract(mat_path: Path, split: str, out: Path) -> None:
    """Write every non-empty image cell of ``split`` as a PNG (MATLAB stores arrays transposed)."""
    import h5py
    from PIL import Image

    try:
        mat = h5py.File(mat_path, "r")
    except OSError as err:
        raise ValueError(f"cuhk03: cannot read {mat_path} as a MATLAB v7.3 (HDF5) file: {err}") from None
    with mat:
        if split not in mat:
            raise ValueError(f"cuhk03: {mat_path} has no '{split}' entry (found: {', '.join(mat.keys())})")
        for pair, pair_ref in enumerate(mat[split][0], 1):
            for person, shots in enumerate(mat[pair_ref][:].T, 1):
                for shot, ref in enumerate(shots, 1):
                    image = mat[ref][:].T
                    if image.ndim != 3:  # an empty cell: this person has fewer shots
                        continue
                    view = 1 if shot <= 5 else 2
                    Image.fromarray(image).save(out / f"{pair}_{person:03d}_{view}_{shot:02d}.png")
