"""tf.data pipelines: P×K composition, per-replica identity integrity, determinism, augmentation bounds,
evaluation order, and corrupt files skipped and counted. Images are tiny PNGs whose colour encodes
the sample index, so every output pixel can be traced back to its file."""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from rga_keras.data import (
    IMAGENET_MEAN_255,
    CorruptImages,
    Sample,
    make_eval_dataset,
    make_train_dataset,
    steps_per_epoch,
)
from rga_keras.data.sampling import erasing_boxes
from tests.pipeline_images import SIZE, index_of, noise_samples, traced_samples, with_unreadable

@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return traced_samples(tmp_path_factory.mktemp("images"))


def batches(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def group_runs(labels, k):
    """Labels cut into consecutive runs of k; each run must be one identity."""
    runs = labels.reshape(-1, k)
    assert (runs == runs[:, :1]).all()
    return runs[:, 0]


def test_pk_composition_and_image_identity(samples):
    p, k = 4, 3
    ds = make_train_dataset(samples, num_ids_per_batch=p, images_per_id=k, image_size=SIZE, augment=False)
    by_index = {i: s for i, s in enumerate(samples)}
    for images, labels in batches(ds, 6):
        assert images.shape == (p * k, *SIZE, 3) and images.dtype == np.float32
        assert labels.shape == (p * k,) and labels.dtype == np.int32
        ids = group_runs(labels, k)
        assert len(set(ids)) == p  # P distinct identities
        for group, pid in zip(images.reshape(p, k, *SIZE, 3), ids):
            owners = [by_index[index_of(x)] for x in group]
            assert all(o.person_id == pid for o in owners)
            own = sum(s.person_id == pid for s in samples)
            # distinct images when the identity has K or more, else all of them (with repeats)
            assert len({o.path for o in owners}) == min(own, k)


def test_identities_per_pass_and_image_cycles(samples):
    p, k = 4, 2  # 12 identities: a pass is 3 batches and visits every identity once
    ds = make_train_dataset(samples, num_ids_per_batch=p, images_per_id=k, image_size=SIZE, augment=False)
    out = batches(ds, 3 * 8)
    seen = {}
    for b, (images, labels) in enumerate(out):
        for x, label in zip(images, labels):
            seen.setdefault(int(label), []).append(index_of(x))
    passes = [np.concatenate([y for _, y in out[i:i + 3]]) for i in range(0, len(out), 3)]
    for labels in passes:
        assert sorted(set(labels)) == sorted({s.person_id for s in samples})
    assert any(not np.array_equal(passes[0], other) for other in passes[1:])  # reshuffled each pass
    for labels in passes:  # a random order: few identities at their sorted place (expected 1)
        order = group_runs(labels, k)
        assert np.sum(order == np.sort(order)) <= 4
    orders = {}
    for pid, used in seen.items():  # one group of k per pass, in pass order
        n = sum(s.person_id == pid for s in samples)
        mine = {i for i, s in enumerate(samples) if s.person_id == pid}
        groups = [used[i:i + k] for i in range(0, len(used), k)]
        if n < k:  # all of them in every group
            assert all(set(g) == mine for g in groups)
            continue
        per_cycle = n // k  # groups per cycle: together K·⌊n/K⌋ distinct images of this identity
        for start in range(0, len(groups) - per_cycle + 1, per_cycle):
            cycle = [i for g in groups[start:start + per_cycle] for i in g]
            assert len(set(cycle)) == len(cycle) and set(cycle) <= mine
            orders.setdefault(pid, set()).add(tuple(cycle))
    assert sum(len(o) > 1 for o in orders.values()) >= 6  # image order reshuffled between cycles


def test_seed_determinism(samples):
    def first(seed):
        return batches(make_train_dataset(samples, num_ids_per_batch=4, images_per_id=2, image_size=SIZE,
                                          seed=seed), 3)

    a, b, c = first(7), first(7), first(8)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert not all(np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_a_stream_started_later_continues_the_same_batches(samples):
    """first_batch=n (a resumed run) gives batch n, n+1, ... of the uninterrupted stream, augmentation included."""
    kwargs = dict(num_ids_per_batch=4, images_per_id=3, image_size=SIZE, seed=5)
    whole = batches(make_train_dataset(samples, **kwargs), 6)
    resumed = batches(make_train_dataset(samples, first_batch=4, **kwargs), 2)
    for (x, y), (xr, yr) in zip(whole[4:], resumed):
        assert np.array_equal(x, xr) and np.array_equal(y, yr)
    assert not np.array_equal(whole[0][0], resumed[0][0])
    with pytest.raises(ValueError, match="first_batch must be an integer >= 0"):
        make_train_dataset(samples, first_batch=-1, **kwargs)


def test_an_epoch_is_one_visit_of_every_identity_as_the_papers_sampler_counts_it(samples):
    """The paper's sampler yields K indices per identity and its loader drops the last partial P·K batch;
    the pipeline's first epoch of that many batches shows each identity at most once and leaves out
    fewer than P of them."""
    identities = {s.person_id for s in samples}
    for p, k in ((4, 2), (2, 4), (3, 3), (5, 2)):
        official = len(identities) * k // (p * k)
        assert steps_per_epoch(samples, p) == official, (p, k)
        ds = make_train_dataset(samples, num_ids_per_batch=p, images_per_id=k, image_size=SIZE, augment=False)
        seen = np.concatenate([group_runs(y, k) for _, y in batches(ds, official)])
        assert len(seen) == len(set(seen)) and len(identities) - len(seen) < p, (p, k)


def check_whole_identities(labels, replicas, k):
    """Cut the global batch into contiguous per-replica slices (what tf.distribute does) and check
    each slice holds whole groups of K images of one identity."""
    for part in np.split(labels, replicas):
        ids = group_runs(part, k)
        assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_replica_slices_hold_whole_identities(samples, replicas):
    k = 3
    ds = make_train_dataset(samples, num_ids_per_batch=8, images_per_id=k, image_size=SIZE,
                            num_replicas=replicas, augment=False)
    for _, labels in batches(ds, 3):
        check_whole_identities(labels, replicas, k)


def test_mirrored_strategy_replicas_hold_whole_identities(samples):
    devices = tf.config.list_logical_devices("CPU")
    assert len(devices) >= 2, "tests/conftest.py should split the CPU into 2 logical devices"
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices[:2]])
    p, k = 4, 3
    ds = make_train_dataset(samples, num_ids_per_batch=p, images_per_id=k, image_size=SIZE,
                            num_replicas=2, augment=False)
    dist = strategy.experimental_distribute_dataset(ds)
    for step, (images, labels) in zip(range(3), dist):
        parts = [t.numpy() for t in strategy.experimental_local_results(labels)]
        pictures = [t.numpy() for t in strategy.experimental_local_results(images)]
        assert [len(x) for x in parts] == [p * k // 2] * 2
        for part, picture in zip(parts, pictures):
            ids = group_runs(part, k)
            assert len(set(ids)) == p // 2
            assert [samples[index_of(x)].person_id for x in picture] == part.tolist()


def test_train_argument_errors(samples):
    with pytest.raises(ValueError, match="cannot be split into 4 replicas holding whole identities"):
        make_train_dataset(samples, num_ids_per_batch=6, num_replicas=4)
    with pytest.raises(ValueError, match="holds 12 identities in 48 images, but a batch needs sampler"):
        make_train_dataset(samples, num_ids_per_batch=16)
    with pytest.raises(ValueError, match="images_per_id must be a positive integer"):
        make_train_dataset(samples, num_ids_per_batch=4, images_per_id=0)
    with pytest.raises(ValueError, match="image_size must be"):
        make_train_dataset(samples, num_ids_per_batch=4, image_size=(16,))
    with pytest.raises(ValueError, match="no samples"):
        make_train_dataset([], num_ids_per_batch=4)
    with pytest.raises(ValueError, match="person ids must be >= 0"):
        make_train_dataset([Sample(samples[0].path, -1, 1)] + samples, num_ids_per_batch=4)
    with pytest.raises(ValueError, match="integer ids"):
        make_train_dataset([("a.jpg", "x", 1)], num_ids_per_batch=1)


# ---------------------------------------------------------------------------------------- augmentation


@pytest.fixture(scope="module", name="noise_samples")
def noise_samples_fixture(tmp_path_factory):
    """8 identities × 2 random-noise PNGs of 18×9, i.e. exactly 1.125 × the 16×8 output size."""
    return noise_samples(tmp_path_factory.mktemp("noise"))


def crop_offset(out, picture):
    """(top, left) if ``out`` is exactly a 16×8 crop of the 18×9 picture, else None."""
    for top in range(3):
        for left in range(2):
            if np.array_equal(out, picture[top:top + 16, left:left + 8]):
                return top, left
    return None


def train_outputs(items, n, **kwargs):
    ds = make_train_dataset(items, num_ids_per_batch=4, images_per_id=2, image_size=SIZE, **kwargs)
    images = np.concatenate([x for x, _ in batches(ds, n)])
    assert images.shape[1:] == (*SIZE, 3)
    return images


def test_translate_crop_is_a_crop_of_the_enlarged_image(noise_samples):
    items, pictures = noise_samples
    images = train_outputs(items, 12, augment=True, translate_prob=1.0, flip_prob=0.0, erase_prob=0.0)
    offsets = []
    for image in images:
        found = [crop_offset(image, pic) for pic in pictures]
        offsets += [o for o in found if o is not None]
    # resizing 18×9 to 18×9 is exact, so every output is an exact crop, and all 6 offsets occur
    assert len(offsets) >= len(images) and set(offsets) == {(t, l) for t in range(3) for l in range(2)}
    half = train_outputs(items, 24, augment=True, translate_prob=0.5, flip_prob=0.0, erase_prob=0.0)
    cropped = np.mean([any(crop_offset(x, pic) for pic in pictures) for x in half])
    assert 0.38 < cropped < 0.62  # 192 draws with p = 0.5


def test_flip_mirrors(samples, noise_samples):
    items, pictures = noise_samples
    plain = train_outputs(items, 4, augment=False)
    flipped = train_outputs(items, 4, augment=True, translate_prob=0.0, flip_prob=1.0, erase_prob=0.0)
    assert np.allclose(flipped, plain[:, :, ::-1])
    some = train_outputs(items, 24, augment=True, translate_prob=0.0, flip_prob=0.5, erase_prob=0.0)
    unflipped = train_outputs(items, 24, augment=False)
    rate = np.mean([not np.allclose(a, b) for a, b in zip(some, unflipped)])
    assert 0.38 < rate < 0.62


def test_full_augmentation_value_range_and_erasing_rate(noise_samples):
    items, _ = noise_samples
    images = train_outputs(items, 32, augment=True)
    assert images.min() >= 0.0 and images.max() <= 255.0
    erased = [(x == np.array(IMAGENET_MEAN_255, np.float32)).all(-1).mean() for x in images]
    decisions = np.array(erased).reshape(-1, 2) > 0  # consecutive pairs: the K = 2 images of a group
    assert 0.4 < decisions.mean() < 0.6  # 256 draws with p = 0.5
    assert 0.3 < np.mean(decisions[:, 0] != decisions[:, 1]) < 0.7  # drawn independently per image
    assert 0.0 < min(e for e in erased if e > 0) and max(erased) <= 0.45


def test_erasing_measured_from_output(tmp_path):
    """Constant images, erasing always on: each output shows one solid rectangle of the mean pixel
    whose size respects area 2–40 % and aspect 0.3–1/0.3 (up to rounding the sides to pixels)."""
    items = []
    for i in range(8):
        Image.fromarray(np.full((40, 20, 3), 7, np.uint8)).save(tmp_path / f"{i}.png")
        items.append(Sample(str(tmp_path / f"{i}.png"), i, 1))
    h, w = 64, 32
    ds = make_train_dataset(items, num_ids_per_batch=4, images_per_id=2, image_size=(h, w), erase_prob=1.0)
    images = np.concatenate([x for x, _ in batches(ds, 40)])
    fractions = []
    for image in images:
        mask = (image == np.array(IMAGENET_MEAN_255, np.float32)).all(-1)
        assert ((image == 7.0).all(-1) | mask).all()  # only the fill value or the original
        if not mask.any():
            continue
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        eh, ew = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert mask.sum() == eh * ew  # one solid rectangle
        assert eh < h and ew < w
        # the drawn real-valued sides (within half a pixel of these) have area 2–40 % and aspect 0.3–1/0.3
        assert (eh + 0.5) * (ew + 0.5) >= 0.02 * h * w and (eh - 0.5) * (ew - 0.5) <= 0.4 * h * w
        assert (eh + 0.5) / (ew - 0.5) >= 0.3 and (eh - 0.5) / (ew + 0.5) <= 1 / 0.3
        fractions.append(eh * ew / (h * w))
    assert len(fractions) >= 0.97 * len(images)  # with 10 attempts a fitting rectangle is nearly always found
    assert min(fractions) < 0.04 and max(fractions) > 0.35


def test_erasing_boxes_when_nothing_fits():
    u = np.random.default_rng(2).random((50, 40))
    boxes = erasing_boxes(u, (64, 32), area=(0.99, 0.999))  # > 63·31 pixels never fits
    assert boxes.shape == (50, 4) and not boxes.any()


# ---------------------------------------------------------------------------------------- evaluation


def test_eval_order_metadata_and_flip(samples, noise_samples):
    ds = make_eval_dataset(samples, image_size=SIZE, batch_size=5)
    images, pids, cams, paths = [], [], [], []
    sizes = []
    for x, meta in ds:
        sizes.append(len(x))
        images.append(x.numpy())
        pids += meta["person_id"].numpy().tolist()
        cams += meta["camera_id"].numpy().tolist()
        paths += [p.decode() for p in meta["path"].numpy()]
    assert sizes == [5] * (len(samples) // 5) + [len(samples) % 5]
    assert [index_of(x) for x in np.concatenate(images)] == list(range(len(samples)))
    assert pids == [s.person_id for s in samples] and cams == [s.camera_id for s in samples]
    assert paths == [s.path for s in samples]
    items, _ = noise_samples
    plain = np.concatenate([x.numpy() for x, _ in make_eval_dataset(items, image_size=(18, 9))])
    flipped = np.concatenate([x.numpy() for x, _ in make_eval_dataset(items, image_size=(18, 9), flip=True)])
    assert np.array_equal(flipped, plain[:, :, ::-1])
    with pytest.raises(ValueError, match="batch_size"):
        make_eval_dataset(samples, batch_size=0)
    with pytest.raises(ValueError, match="no samples"):
        make_eval_dataset([])


# ---------------------------------------------------------------------------------------- corrupt files


@pytest.fixture()
def with_corrupt(samples, tmp_path):
    """The samples with three files made unreadable: truncated, garbage in the middle, not an image."""
    return with_unreadable(samples, tmp_path)


def test_corrupt_files_skipped_and_counted_in_training(with_corrupt):
    items, bad = with_corrupt
    log = CorruptImages()
    ds = make_train_dataset(items, num_ids_per_batch=4, images_per_id=2, image_size=SIZE, augment=False,
                            corrupt_log=log)
    for images, labels in batches(ds, 30):
        assert images.shape == (8, *SIZE, 3)
        group_runs(labels, 2)
        assert all(items[index_of(x)].path not in bad for x in images)
    assert log.paths == bad and log.count >= 3 and log.unexplained == 0
    assert f"{log.count} corrupt image reads skipped (3 distinct files)" == log.summary()


def test_corrupt_files_skipped_and_counted_in_evaluation(with_corrupt):
    items, bad = with_corrupt
    log = CorruptImages()
    out = [(x.numpy(), meta) for x, meta in make_eval_dataset(items, image_size=SIZE, corrupt_log=log)]
    paths = [p.decode() for _, meta in out for p in meta["path"].numpy()]
    assert paths == [s.path for s in items if s.path not in bad]  # order kept, bad ones (incl. the last) out
    images = np.concatenate([x for x, _ in out])
    assert [items[index_of(x)].path for x in images] == paths
    assert log.paths == bad and log.count == 3


def test_all_unreadable_fails_early(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"")
    items = [Sample(str(tmp_path / f"{i}.jpg"), i, 1) for i in range(3)]
    with pytest.raises(ValueError, match="could be read"):
        make_train_dataset(items, num_ids_per_batch=2, images_per_id=1)
    with pytest.raises(ValueError, match="could be read"):
        make_eval_dataset(items)


@pytest.mark.parametrize("source", [(40, 20), (10, 6), (30, 5)])
def test_resize_matches_pil_bilinear(tmp_path, source):
    """Shrinking is antialiased and enlarging plain bilinear, both as PIL's BILINEAR (PIL rounds to uint8)."""
    picture = np.random.default_rng(3).integers(0, 256, (*source, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "x.png")
    (image, _), = make_eval_dataset([Sample(str(tmp_path / "x.png"), 1, 1)], image_size=SIZE)
    reference = np.asarray(Image.fromarray(picture).resize(SIZE[::-1], Image.BILINEAR), np.float32)
    assert np.abs(image.numpy()[0] - reference).max() <= 1.0
