"""A synthetic person re-id dataset in the Market-1501 layout, for demos and tests (``rga-synth``).

Each identity is a drawn "person" with a stable appearance: proportions, skin and hair, a top with
one of several patterns (solid, stripes, two-tone, checks, a chest logo), trousers, shorts or a skirt,
shoes, and maybe a hat, a backpack or a bag. Every camera has its own scene (background and clutter),
lighting (gain and colour cast), scale, typical horizontal position and viewpoint (front, back or
side, which hides or shows the logo, face, backpack), and every image adds pose jitter (stride, shift,
size), sometimes an occluder or a second figure, blur and sensor noise. Colours come from a small
palette, so identities often share colours and must be told apart by combinations and patterns:
retrieval is learnable but far from trivial.

Half of the identities train (bounding_box_train/), half test: of each test identity, one image per
camera goes to query/, the rest to bounding_box_test/, as in Market-1501. Names are
``PPPP_cCsS_FFFFFF_01.jpg``; ``load_dataset("market1501", root)`` reads the result unchanged.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from rga_keras.data._cache import build_atomically, cache_root, check_replaceable, read_marker
from rga_keras.files import check_folder

VERSION = 1  # bump when the rendering changes, so cached datasets are regenerated
SUPERSAMPLE = 2  # draw at this multiple of the output size, then shrink (smooth edges)

PALETTE = np.array([
    (25, 25, 28), (235, 235, 232), (128, 128, 128), (30, 40, 100), (40, 90, 200), (120, 170, 230),
    (190, 30, 35), (110, 20, 30), (40, 130, 60), (110, 120, 40), (230, 200, 40), (230, 120, 30),
    (110, 50, 150), (230, 130, 170), (110, 70, 40), (210, 190, 150), (20, 130, 130),
])
SKIN = np.array([(240, 200, 170), (210, 160, 120), (160, 110, 75), (100, 65, 45)])
HAIR = np.array([(20, 15, 10), (80, 50, 25), (200, 170, 90), (150, 150, 150), (150, 60, 25)])
FRONT, BACK, SIDE = 0, 1, 2


def default_synthetic_root() -> Path:
    """Folder holding generated synthetic datasets: <cache>/synthetic, cache = $RGA_KERAS_CACHE or
    ~/.cache/rga_keras."""
    return cache_root() / "synthetic"


def generate(out_dir: str | Path, *, num_ids: int = 100, images_per_id: int = 20, num_cameras: int = 6,
             image_size: tuple[int, int] = (128, 64), seed: int = 0, overwrite: bool = False) -> Path:
    """Render the dataset into ``out_dir`` (built in a temporary folder, then moved into place).

    image_size is (height, width). An existing non-empty ``out_dir`` is an error unless ``overwrite``, which
    replaces only a folder this generator made (its marker file), never a folder of other files.
    """
    params = _params(num_ids, images_per_id, num_cameras, image_size, seed)
    out_dir = check_folder(Path(out_dir).expanduser(), "output folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (overwrite=True replaces it if rga-synth made it)")
    return build_atomically(out_dir, lambda tmp: _render_dataset(tmp, **params["args"]), params,
                            replace_foreign=False)


def ensure_synthetic(root: str | Path | None = None, **kwargs) -> Path:
    """The synthetic dataset with these :func:`generate` arguments, generated on first use and reused.

    root defaults to a folder under :func:`default_synthetic_root` named after the arguments. A root
    generated with other arguments is regenerated; one holding anything else is an error (FileExistsError).
    """
    args = {name: p.default for name, p in inspect.signature(generate).parameters.items()
            if p.kind == p.KEYWORD_ONLY and name != "overwrite"}
    unknown = set(kwargs) - set(args)
    if unknown:
        raise TypeError(f"unexpected argument(s) {sorted(unknown)}; accepted: {', '.join(args)}")
    params = _params(**{**args, **kwargs})
    chosen = params["args"]
    if root is None:
        h, w = chosen["image_size"]
        root = default_synthetic_root() / (
            f"market_ids{chosen['num_ids']}_per{chosen['images_per_id']}_cams{chosen['num_cameras']}"
            f"_{h}x{w}_seed{chosen['seed']}_v{VERSION}")
    root = Path(root).expanduser()
    if read_marker(root) == params:
        return root
    check_replaceable(root, params)  # regenerate an outdated synthetic folder, never replace anything else
    return generate(root, overwrite=True, **chosen)


# --------------------------------------------------------------------------- dataset layout


def _params(num_ids: int, images_per_id: int, num_cameras: int, image_size, seed: int) -> dict:
    """Validated arguments, as stored in the marker file (the reader recognises ``generator``)."""
    height, width = (int(v) for v in image_size)
    if num_ids < 2 or num_ids > 9999:
        raise ValueError(f"num_ids must be in 2..9999 (half train, half test), got {num_ids}")
    if images_per_id < 4:
        raise ValueError(f"images_per_id must be >= 4 (two cameras with a query and a gallery image), "
                         f"got {images_per_id}")
    if not 2 <= num_cameras <= 9:
        raise ValueError(f"num_cameras must be in 2..9, got {num_cameras}")
    if height < 32 or width < 16:
        raise ValueError(f"image_size must be at least (32, 16), got {image_size}")
    return {"generator": "rga-synth", "version": VERSION,
            "args": {"num_ids": int(num_ids), "images_per_id": int(images_per_id),
                     "num_cameras": int(num_cameras), "image_size": [height, width], "seed": int(seed)}}


def _render_dataset(out: Path, num_ids: int, images_per_id: int, num_cameras: int, image_size, seed: int) -> None:
    folders = {name: out / name for name in ("bounding_box_train", "bounding_box_test", "query")}
    for folder in folders.values():
        folder.mkdir()
    rng = np.random.default_rng([seed, 0])
    pids = rng.permutation(np.arange(1, num_ids + 1))
    test_ids = set(pids[: num_ids // 2].tolist())
    cameras = [_camera(np.random.default_rng([seed, 1, c]), c, image_size) for c in range(1, num_cameras + 1)]
    frame = 0
    for pid in range(1, num_ids + 1):
        person_rng = np.random.default_rng([seed, 2, pid])
        person = _person(person_rng)
        seen_by = _spread(person_rng, images_per_id, num_cameras)
        for cam, count in seen_by.items():
            for shot in range(count):
                frame += 1
                image = _render(person, cameras[cam - 1], np.random.default_rng([seed, 3, pid, cam, shot]), image_size)
                if pid in test_ids:
                    folder = folders["query"] if shot == 0 else folders["bounding_box_test"]
                else:
                    folder = folders["bounding_box_train"]
                name = f"{pid:04d}_c{cam}s{1 + shot % 6}_{frame:06d}_01.jpg"
                image.save(folder / name, quality=90)


def _spread(rng: np.random.Generator, images: int, num_cameras: int) -> dict[int, int]:
    """Which cameras see this identity and how many images each takes (at least 2 per camera)."""
    most = min(num_cameras, images // 2)
    count = int(rng.integers(2, most + 1))
    cams = sorted(rng.choice(np.arange(1, num_cameras + 1), size=count, replace=False).tolist())
    extra = rng.multinomial(images - 2 * count, np.ones(count) / count)
    return {cam: 2 + int(e) for cam, e in zip(cams, extra)}


# --------------------------------------------------------------------------- appearance


def _person(rng: np.random.Generator) -> dict:
    """Stable appearance of one identity."""
    colors = rng.choice(len(PALETTE), size=5, replace=False)
    return {
        "height": rng.uniform(0.78, 0.92), "build": rng.uniform(0.85, 1.2), "head": rng.uniform(0.9, 1.1),
        "legs": rng.uniform(0.44, 0.52), "skin": SKIN[rng.integers(len(SKIN))],
        "hair": HAIR[rng.integers(len(HAIR))], "long_hair": rng.random() < 0.35,
        "top": PALETTE[colors[0]], "top2": PALETTE[colors[1]], "pattern": int(rng.integers(5)),
        "logo": rng.random() < 0.5, "long_sleeves": rng.random() < 0.6,
        "bottom": PALETTE[colors[2]], "bottom_kind": int(rng.choice(3, p=[0.6, 0.2, 0.2])),
        "shoes": PALETTE[rng.choice([0, 1, 2, 14])],
        "hat": PALETTE[colors[3]] if rng.random() < 0.25 else None,
        "backpack": PALETTE[colors[4]] if rng.random() < 0.4 else None,
        "bag": PALETTE[rng.integers(len(PALETTE))] if rng.random() < 0.25 else None,
    }


def _camera(rng: np.random.Generator, index: int, image_size) -> dict:
    """One camera: a background scene wider than the frame, lighting, scale, position and viewpoint."""
    height, width = (SUPERSAMPLE * v for v in image_size)
    scene = Image.new("RGB", (width * 2, height), tuple(int(v) for v in rng.integers(60, 200, 3)))
    draw = ImageDraw.Draw(scene)
    horizon = int(height * rng.uniform(0.45, 0.7))
    draw.rectangle([0, horizon, width * 2, height], fill=tuple(int(v) for v in rng.integers(40, 170, 3)))
    for _ in range(int(rng.integers(6, 14))):  # buildings, signs, windows, poles, bushes
        x, y = rng.uniform(0, width * 2), rng.uniform(0, horizon)
        w, h = rng.uniform(0.05, 0.5) * width, rng.uniform(0.05, 0.5) * height
        fill = tuple(int(v) for v in PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.5, 1.0))
        shape = draw.ellipse if rng.random() < 0.3 else draw.rectangle
        shape([x, y, x + w, y + h], fill=fill)
    return {"scene": scene, "gain": rng.uniform(0.7, 1.25), "cast": rng.uniform(0.85, 1.15, 3),
            "scale": rng.uniform(0.8, 1.0), "offset": rng.uniform(-0.12, 0.12),
            "view": (index - 1) % 3, "blur": rng.uniform(0.0, 1.2)}


# --------------------------------------------------------------------------- drawing


def _render(person: dict, camera: dict, rng: np.random.Generator, image_size) -> Image.Image:
    """One image of ``person`` seen by ``camera``."""
    height, width = (SUPERSAMPLE * v for v in image_size)
    left = int(rng.integers(0, camera["scene"].width - width))
    image = camera["scene"].crop((left, 0, left + width, height))
    draw = ImageDraw.Draw(image)
    view = camera["view"] if rng.random() < 0.8 else int(rng.integers(3))
    if rng.random() < 0.2:  # a second, unrelated figure partly in frame
        other = _person(np.random.default_rng(rng.integers(1 << 62)))
        side = -1 if rng.random() < 0.5 else 1
        _draw_person(draw, other, width * (0.5 + side * rng.uniform(0.55, 0.8)), height,
                     camera["scale"] * 0.9, int(rng.integers(3)), rng)
    scale = camera["scale"] * rng.uniform(0.93, 1.05)
    cx = width * (0.5 + camera["offset"] + rng.uniform(-0.06, 0.06))
    _draw_person(draw, person, cx, height, scale, view, rng)
    if rng.random() < 0.25:  # occluder: a pole, a car edge, another pedestrian's shoulder
        fill = tuple(int(v) for v in PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.4, 1.0))
        if rng.random() < 0.5:
            x = rng.uniform(0.1, 0.8) * width
            draw.rectangle([x, 0, x + rng.uniform(0.08, 0.2) * width, height], fill=fill)
        else:
            y = rng.uniform(0.55, 0.8) * height
            draw.rectangle([0, y, width, height], fill=fill)
    image = image.resize(image_size[::-1], Image.BILINEAR, reducing_gap=None)
    blur = camera["blur"] * rng.uniform(0.5, 1.5)
    if blur > 0.3:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, np.float32) * camera["gain"] * rng.uniform(0.9, 1.1) * camera["cast"]
    pixels += rng.normal(0, rng.uniform(2, 7), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_person(draw: ImageDraw.ImageDraw, p: dict, cx: float, frame_h: int, scale: float, view: int,
                 rng: np.random.Generator) -> None:
    """Draw a standing or walking person centred at x = cx, feet near the bottom of the frame."""
    def c(color):
        return tuple(int(v) for v in color)

    h = frame_h * p["height"] * scale
    top = frame_h - h - frame_h * rng.uniform(0.02, 0.06)
    head_r = h * 0.065 * p["head"]
    half_w = h * 0.11 * p["build"] * (0.65 if view == SIDE else 1.0)
    neck = top + 2 * head_r
    hip = neck + h * (1 - p["legs"]) - 2 * head_r
    feet = top + h
    stride = h * rng.uniform(0.0, 0.07) * (1.6 if view == SIDE else 1.0)
    leg_w = half_w * 0.8

    if p["backpack"] is not None and view == SIDE:  # sticks out behind
        draw.rectangle([cx - half_w * 1.9, neck + h * 0.03, cx - half_w * 0.9, hip - h * 0.08], fill=c(p["backpack"]))
    # legs, trousers / shorts / skirt, shoes
    for sign in (-1, 1):
        x = cx + sign * (half_w * 0.45) + sign * stride * 0.5
        draw.rectangle([x - leg_w / 2, hip, x + leg_w / 2, feet], fill=c(p["bottom"]))
        if p["bottom_kind"] in (1, 2):
            draw.rectangle([x - leg_w / 2, hip + (feet - hip) * 0.45, x + leg_w / 2, feet], fill=c(p["skin"]))
        draw.rectangle([x - leg_w / 2 - h * 0.01, feet - h * 0.035, x + leg_w / 2 + h * 0.02, feet],
                       fill=c(p["shoes"]))
    if p["bottom_kind"] == 2:
        draw.polygon([(cx - half_w, hip - h * 0.02), (cx + half_w, hip - h * 0.02),
                      (cx + half_w * 1.35, hip + (feet - hip) * 0.45), (cx - half_w * 1.35, hip + (feet - hip) * 0.45)],
                     fill=c(p["bottom"]))
    # arms (behind the torso edges), torso with its pattern
    arm_w = half_w * 0.38
    for sign in (-1, 1):
        x = cx + sign * (half_w + arm_w * 0.4)
        swing = sign * stride * 0.3
        draw.rectangle([x - arm_w / 2 + swing, neck + h * 0.02, x + arm_w / 2 + swing, hip + h * 0.02],
                       fill=c(p["skin"]))
        sleeve_end = hip if p["long_sleeves"] else neck + (hip - neck) * 0.35
        draw.rectangle([x - arm_w / 2 + swing, neck + h * 0.02, x + arm_w / 2 + swing, sleeve_end], fill=c(p["top"]))
    _draw_top(draw, p, (cx - half_w, neck, cx + half_w, hip), view)
    if p["backpack"] is not None and view == BACK:
        draw.rectangle([cx - half_w * 0.7, neck + h * 0.04, cx + half_w * 0.7, hip - h * 0.05], fill=c(p["backpack"]))
    if p["backpack"] is not None and view == FRONT:  # straps
        for sign in (-1, 1):
            x = cx + sign * half_w * 0.55
            draw.rectangle([x - h * 0.01, neck, x + h * 0.01, neck + (hip - neck) * 0.6], fill=c(p["backpack"]))
    if p["bag"] is not None and view != BACK:
        x = cx + half_w * (1.1 if view == FRONT else 0.2)
        draw.rectangle([x, hip - h * 0.1, x + half_w * 0.7, hip + h * 0.02], fill=c(p["bag"]))
    # head: hair behind, face (front/side) or hair (back), hat
    hx = cx + (head_r * 0.2 if view == SIDE else 0)
    if p["long_hair"]:
        draw.rectangle([hx - head_r * 1.05, top + head_r, hx + head_r * 1.05, neck + h * 0.06], fill=c(p["hair"]))
    draw.ellipse([hx - head_r, top, hx + head_r, top + 2 * head_r], fill=c(p["hair"] if view == BACK else p["skin"]))
    if view != BACK:
        draw.chord([hx - head_r, top - head_r * 0.1, hx + head_r, top + head_r * 1.1], 180, 360, fill=c(p["hair"]))
    if p["hat"] is not None:
        draw.chord([hx - head_r * 1.1, top - head_r * 0.3, hx + head_r * 1.1, top + head_r * 1.2], 180, 360,
                   fill=c(p["hat"]))


def _draw_top(draw: ImageDraw.ImageDraw, p: dict, box: tuple, view: int) -> None:
    """Torso in the top colour with the identity's pattern; the logo shows from the front only."""
    x0, y0, x1, y1 = box
    main, second = tuple(int(v) for v in p["top"]), tuple(int(v) for v in p["top2"])
    draw.rectangle(box, fill=main)
    pattern = p["pattern"]
    if pattern == 1:  # horizontal stripes
        step = (y1 - y0) / 6
        for i in range(1, 6, 2):
            draw.rectangle([x0, y0 + i * step, x1, y0 + (i + 1) * step], fill=second)
    elif pattern == 2:  # vertical stripes
        step = (x1 - x0) / 5
        for i in range(1, 5, 2):
            draw.rectangle([x0 + i * step, y0, x0 + (i + 1) * step, y1], fill=second)
    elif pattern == 3:  # two-tone
        draw.rectangle([x0, (y0 + y1) / 2, x1, y1], fill=second)
    elif pattern == 4:  # checks
        sx, sy = (x1 - x0) / 4, (y1 - y0) / 5
        for i in range(4):
            for j in range(5):
                if (i + j) % 2:
                    draw.rectangle([x0 + i * sx, y0 + j * sy, x0 + (i + 1) * sx, y0 + (j + 1) * sy], fill=second)
    if p["logo"] and view == FRONT:
        w, h = x1 - x0, y1 - y0
        draw.rectangle([x0 + w * 0.3, y0 + h * 0.2, x0 + w * 0.7, y0 + h * 0.45], fill=second if pattern == 0 else main)
        draw.ellipse([x0 + w * 0.4, y0 + h * 0.25, x0 + w * 0.6, y0 + h * 0.4],
                     fill=tuple(255 - v for v in main))

