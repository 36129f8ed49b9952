"""Metrics against hand-computed cases and a straightforward per-query reference loop."""
import itertools
import warnings

import numpy as np
import pytest

from rga_keras.evaluation import DegenerateFeaturesWarning, evaluate, evaluate_distances, pairwise_distance
from rga_keras.evaluation.features import extract_features


def reference_metrics(dist, qids, gids, qcams, gcams, max_rank, junk_id=-1):
    """One query at a time: drop junk, group the rest by equal float32 distance, and average the plain
    walk down the list over every placement of each group's matches among its slots (all orders of tied
    items equally likely; AP is a sum over groups, so groups are averaged one at a time)."""
    cmcs, aps, inps = [], [], []
    dist = np.asarray(dist, np.float32)
    for i in range(len(qids)):
        kept = [j for j in range(len(gids))
                if not (gids[j] == qids[i] and gcams[j] == qcams[i]) and gids[j] != junk_id]
        groups = [[gids[j] == qids[i] for j in kept if dist[i][j] == d] for d in sorted({dist[i][j] for j in kept})]
        total = sum(sum(g) for g in groups)
        if not total:
            continue
        ap, before, ahead, first, last = 0.0, 0, 0, None, None
        for group in groups:
            n, r = len(group), sum(group)
            if r:
                placements = list(itertools.combinations(range(n), r))
                ap += sum((ahead + h + 1) / (before + s + 1) for p in placements
                          for h, s in enumerate(p)) / len(placements)
                first = first or [(before + p[0] + 1) for p in placements]
                last = [(before + p[-1] + 1) for p in placements]
            before, ahead = before + n, ahead + r
        cmcs.append([np.mean([f <= k for f in first]) for k in range(1, max(max_rank, 10) + 1)])
        aps.append(ap / total)
        inps.append(np.mean([total / x for x in last]))
    cmc = np.mean(cmcs, axis=0)
    return {"cmc": cmc[:max_rank], "rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "mAP": np.mean(aps),
            "mINP": np.mean(inps), "num_valid_queries": len(aps), "num_skipped_queries": len(qids) - len(aps)}


def assert_same(got, want):
    np.testing.assert_allclose(got["cmc"], want["cmc"], atol=1e-12)
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    for key in ("num_valid_queries", "num_skipped_queries"):
        assert got[key] == want[key], key


def scalar_features(values):
    """1-D features: with the euclidean metric the distance is |a - b|."""
    return np.asarray(values, np.float32)[:, None]


def test_hand_computed_junk_distractor_and_skipped_queries():
    # Query 0 (id 1, cam 0) at 0. Gallery positions 1..6:
    #   1: id 1 cam 0 -> same id and camera: removed     2: id 2 -> false
    #   3: id 1 cam 1 -> true match                      4: id 0 (distractor) -> false, kept
    #   5: id 1 cam 2 -> true match                      6: id -1 (junk) -> removed
    # Kept ranking: [2 F, 3 T, 4 F, 5 T] -> first match at rank 2, AP = (1/2 + 2/4) / 2, INP = 2/4.
    # Query 1 (id 3) has no gallery image; query 2 (id 2, cam 1) only a same-camera one: both skipped.
    gallery = scalar_features([1, 2, 3, 4, 5, 6])
    gids, gcams = np.array([1, 2, 1, 0, 1, -1]), np.array([0, 1, 1, 1, 2, 1])
    query = scalar_features([0, 0, 0])
    qids, qcams = np.array([1, 3, 2]), np.array([0, 0, 1])
    r = evaluate(query, gallery, qids, gids, qcams, gcams, metric="euclidean", max_rank=5)
    np.testing.assert_array_equal(r["cmc"], [0, 1, 1, 1, 1])
    assert (r["rank1"], r["rank5"], r["rank10"]) == (0.0, 1.0, 1.0)
    assert r["mAP"] == pytest.approx(0.5) and r["mINP"] == pytest.approx(0.5)
    assert (r["num_valid_queries"], r["num_skipped_queries"]) == (1, 2)
    # Without junk removal the id -1 image (rank 5, false) changes nothing here, but an id -1 query
    # then matches it (at rank 6, AP 1/6): the id 1 query is unchanged and the -1 query counts.
    r = evaluate(np.vstack([query, [[0]]]), gallery, np.append(qids, -1), gids, np.append(qcams, 0), gcams,
                 metric="euclidean", junk_id=None)
    assert (r["num_valid_queries"], r["num_skipped_queries"]) == (2, 2)
    assert r["mAP"] == pytest.approx((0.5 + 1 / 6) / 2)


@pytest.mark.parametrize("match_first", [True, False])
def test_ties_score_their_expectation_whatever_the_gallery_order(match_first):
    # Both gallery images at distance 1 from the query: either may come first, so rank-1 is 1/2 and AP
    # the mean of 1 and 1/2, whichever holds the lower gallery index.
    gallery = scalar_features([-1, 1])
    gids = np.array([7, 8]) if match_first else np.array([8, 7])
    with pytest.warns(DegenerateFeaturesWarning):  # the one query sees a single distance
        r = evaluate(scalar_features([0]), gallery, [7], gids, [0], [1, 1], metric="euclidean")
    assert r["rank1"] == pytest.approx(0.5) and r["mAP"] == pytest.approx(0.75)
    assert r["mINP"] == pytest.approx(0.75)  # INP 1/1 or 1/2


def permutation_average(gids, qid, max_rank):
    """Every order of an all-tied gallery, walked plainly: the brute-force chance level."""
    firsts, aps, inps = [], [], []
    for order in itertools.permutations(gids):
        found = [position for position, gid in enumerate(order, 1) if gid == qid]
        firsts.append(found[0])
        aps.append(np.mean([h / position for h, position in enumerate(found, 1)]))
        inps.append(len(found) / found[-1])
    return ([np.mean(np.array(firsts) <= k) for k in range(1, max_rank + 1)], np.mean(aps), np.mean(inps))


def test_constant_features_score_at_chance_and_warn():
    # 7 gallery images, 3 of the query's identity, every feature equal: all 5040 orders are equally likely.
    # Sorting ties by gallery index would put the matches first (AP 1) or last, not at chance.
    gids = np.array([1, 1, 1, 2, 3, 4, 5])
    cmc, ap, inp = permutation_average(gids, 1, 7)
    with pytest.warns(DegenerateFeaturesWarning, match="1 of 1 queries see every gallery image at the same"):
        r = evaluate(np.ones((1, 4)), np.ones((7, 4)), [1], gids, [0], np.ones(7, int), max_rank=7)
    np.testing.assert_allclose(r["cmc"], cmc, atol=1e-12)
    assert r["mAP"] == pytest.approx(ap, abs=1e-12) and r["mINP"] == pytest.approx(inp, abs=1e-12)
    assert r["mAP"] < 0.6  # the identity-sorted order would give 1.0


def test_nan_features_are_an_error_naming_the_rows():
    gallery = np.eye(5, 4)
    gallery[[1, 3], 2] = np.nan
    with pytest.raises(ValueError, match=r"gallery_features: 2 of 5 rows hold NaN or Inf values \(first: row 1\)"):
        evaluate(np.eye(2, 4), gallery, [1, 2], [1, 2, 3, 4, 5], [0, 0], [1] * 5)
    with pytest.raises(ValueError, match="distances: 1 of 1 rows hold NaN"):
        evaluate_distances([[0.1, np.inf]], [1], [1, 2], [0], [1, 1])


def test_distinct_features_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(np.eye(2, 4), np.eye(3, 4), [1, 2], [1, 2, 3], [0, 0], [1, 1, 1])


def test_all_tied_matches_the_reference():
    dist = np.zeros((1, 5), np.float32)
    gids = np.array([2, 1, 2, 1, 1])  # 3 matches among 5 tied items
    with pytest.warns(DegenerateFeaturesWarning):
        r = evaluate_distances(dist, [1], gids, [0], [1, 1, 1, 1, 1], max_rank=5)
    assert_same(r, reference_metrics(dist, [1], gids, [0], [1] * 5, max_rank=5))
    assert r["rank1"] == pytest.approx(3 / 5)


def test_negative_distances_and_signed_zero():
    # Precomputed "distances" may be negative (e.g. negated similarities); -0.0 ties with 0.0.
    dist = np.array([[0.0, -0.0, -1.5, 2.0, -1.5, -3.0], [-0.0, 0.0, 1.0, -2.0, 5.0, -0.5]], np.float32)
    gids, gcams = np.array([1, 2, 1, 2, 2, 1]), np.ones(6, int)
    want = reference_metrics(dist, [2, 1], gids, [0, 0], gcams, max_rank=6)
    assert_same(evaluate_distances(dist, [2, 1], gids, [0, 0], gcams, max_rank=6), want)


def test_cosine_hand_case():
    # Angles 0°, 60°, 120°, 180° from the query: cosine distances 0, 0.5, 1.5, 2.
    angles = np.deg2rad([180, 60, 0, 120])
    gallery = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[3], [1], [5], [2]])
    dist = pairwise_distance([[2.0, 0.0]], gallery, "cosine")
    np.testing.assert_allclose(dist, [[2.0, 0.5, 0.0, 1.5]], atol=1e-6)
    r = evaluate([[2.0, 0.0]], gallery, [1], [1, 2, 3, 1], [0], [1, 1, 1, 1])  # ranking 3 (F), 2 (F), 4 (T), 1 (T)
    assert r["rank1"] == 0 and r["rank5"] == 1
    assert r["mAP"] == pytest.approx((1 / 3 + 2 / 4) / 2) and r["mINP"] == pytest.approx(2 / 4)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_pairwise_distance_matches_loops(metric):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((6, 7))
    want = np.array([[
        1 - x @ y / np.linalg.norm(x) / np.linalg.norm(y) if metric == "cosine" else np.linalg.norm(x - y)
        for y in b] for x in a])
    got = pairwise_distance(a, b, metric)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6)


def random_problem(rng, nq, ng, num_ids, num_cams, integer_features):
    dim = 3 if integer_features else 16
    make = (lambda n: rng.integers(-2, 3, (n, dim)).astype(np.float32)) if integer_features else (
        lambda n: rng.standard_normal((n, dim)).astype(np.float32))
    qids = rng.integers(1, num_ids + 3, nq)  # some ids never appear in the gallery
    gids = rng.integers(-1, num_ids, ng)  # includes junk (-1) and distractors (0)
    return make(nq), make(ng), qids, gids, rng.integers(0, num_cams, nq), rng.integers(0, num_cams, ng)


@pytest.mark.parametrize("seed,integer_features,chunk_size",
                         [(0, True, None), (1, True, 7), (2, False, 1), (3, False, None)])
def test_random_agreement_with_reference_loop(seed, integer_features, chunk_size):
    # Small integer features make many exact distance ties (euclidean distances of integers are exact).
    rng = np.random.default_rng(seed)
    q, g, qids, gids, qcams, gcams = random_problem(rng, 40, 150, 12, 3, integer_features)
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    if integer_features:  # ties are real and exact: float32 distances equal the float64 ones
        metric = "euclidean"
        dist = np.array([[np.sqrt(np.sum((x - y) ** 2)) for y in g64] for x in q64])
        np.testing.assert_array_equal(pairwise_distance(q, g, metric), dist.astype(np.float32))
    else:
        metric = "cosine"
        dist = np.array([[1 - x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in g64] for x in q64])
    want = reference_metrics(dist, qids, gids, qcams, gcams, max_rank=20)
    assert want["num_skipped_queries"] > 0 and want["rank1"] < 1
    got = evaluate(q, g, qids, gids, qcams, gcams, metric=metric, max_rank=20, chunk_size=chunk_size)
    assert_same(got, want)
    assert got["rank5"] == pytest.approx(want["cmc"][4]) and got["rank10"] == pytest.approx(want["cmc"][9])
    assert_same(evaluate_distances(dist, qids, gids, qcams, gcams, max_rank=20, chunk_size=chunk_size), want)


def test_max_rank_longer_than_gallery():
    r = evaluate_distances([[0.1, 0.2]], [1], [2, 1], [0], [1, 1], max_rank=4)
    np.testing.assert_array_equal(r["cmc"], [0, 1, 1, 1])


def test_tensorflow_inputs_accepted():
    import tensorflow as tf

    rng = np.random.default_rng(4)
    q, g, qids, gids, qcams, gcams = random_problem(rng, 10, 30, 5, 2, False)
    a = evaluate(q, g, qids, gids, qcams, gcams)
    b = evaluate(tf.constant(q), tf.constant(g), tf.constant(qids), tf.constant(gids), tf.constant(qcams),
                 tf.constant(gcams))
    assert_same(a, b)


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"query_ids": [1, 2, 3]}, ValueError, "query_ids must be a 1-D array with 2 entries"),
        ({"gallery_cams": np.array([0.5, 1, 2])}, TypeError, "gallery_cams must hold integers"),
        ({"gallery_features": np.ones((3, 5))}, ValueError, "dimensions differ"),
        ({"query_features": np.ones(4)}, ValueError, "query_features must be a non-empty 2-D array"),
        ({"metric": "manhattan"}, ValueError, "metric must be one of"),
        ({"max_rank": 0}, ValueError, "max_rank"),
        ({"query_features": [[np.nan, 1, 1, 1], [1, 1, 1, 1]]}, ValueError, "NaN or Inf"),
        ({"query_ids": [5, 6]}, ValueError, "no query has a true match"),
    ],
)
def test_bad_input(change, error, match):
    args = {"query_features": np.eye(2, 4), "gallery_features": np.eye(3, 4), "query_ids": [1, 2],
            "gallery_ids": [1, 2, 3], "query_cams": [0, 0], "gallery_cams": [1, 1, 1]}
    args.update(change)
    kwargs = {k: args.pop(k) for k in ("metric", "max_rank") if k in args}
    with pytest.raises(error, match=match):
        evaluate(*args.values(), **kwargs)


def tiny_dataset(num_images=10, batch=4, seed=0):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    images = rng.random((num_images, 6, 4, 3)).astype(np.float32)
    meta = {"person_id": np.arange(num_images) // 2, "camera_id": np.arange(num_images) % 3,
            "path": np.array([f"img_{i}.jpg" for i in range(num_images)])}
    return images, meta, tf.data.Dataset.from_tensor_slices((images, meta)).batch(batch)


@pytest.mark.parametrize("flip", [False, True])
def test_extract_features_with_stand_in_model(flip):
    import keras

    images, meta, dataset = tiny_dataset()
    model = keras.Sequential([keras.Input((6, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(5)])
    kernel, bias = (w.numpy() for w in model.weights)

    def embed(x):
        return x.reshape(len(x), -1) @ kernel + bias

    want = (embed(images) + embed(images[:, :, ::-1, :])) / 2 if flip else embed(images)
    feats, got_meta = extract_features(model, dataset, flip=flip, verbose=0)
    assert feats.shape == (10, 5) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, want, atol=1e-5)
    np.testing.assert_array_equal(got_meta["person_id"], meta["person_id"])
    np.testing.assert_array_equal(got_meta["camera_id"], meta["camera_id"])
    assert list(got_meta["path"]) == list(meta["path"])
    if flip:  # the mirror really changes the features of this model
        assert not np.allclose(feats, embed(images), atol=1e-3)


@pytest.mark.parametrize("flip", [False, True])
def test_extract_features_of_a_model_with_named_outputs(flip):
    """A dict of embeddings from one model: a dict of features, each as its own single-output model gives."""
    import keras

    images, meta, dataset = tiny_dataset()
    inputs = keras.Input((6, 4, 3))
    hidden = keras.layers.Dense(7)(keras.layers.Flatten()(inputs))
    outputs = {"before": hidden, "after": keras.layers.Dense(5)(hidden)}
    model = keras.Model(inputs, outputs)
    feats, got_meta = extract_features(model, dataset, flip=flip, verbose=0)
    assert sorted(feats) == ["after", "before"]
    for name, output in outputs.items():
        want, _ = extract_features(keras.Model(inputs, output), dataset, flip=flip, verbose=0)
        assert feats[name].dtype == np.float32
        np.testing.assert_allclose(feats[name], want, atol=1e-6)
    np.testing.assert_array_equal(got_meta["person_id"], meta["person_id"])


def test_extract_features_bad_inputs():
    import keras
    import tensorflow as tf

    images, meta, dataset = tiny_dataset()
    model = keras.Sequential([keras.Input((6, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(5)])
    with pytest.raises(TypeError, match="yielding \\(images"):
        extract_features(model, tf.data.Dataset.from_tensor_slices(images).batch(2), verbose=0)
    no_path = tf.data.Dataset.from_tensor_slices((images, {"person_id": meta["person_id"],
                                                           "camera_id": meta["camera_id"]})).batch(2)
    with pytest.raises(ValueError, match="lacks keys \\['path'\\]"):
        extract_features(model, no_path, verbose=0)
    with pytest.raises(ValueError, match="must be batched"):
        extract_features(model, dataset.unbatch(), verbose=0)
    spatial = keras.Sequential([keras.Input((6, 4, 3)), keras.layers.Dense(5)])
    with pytest.raises(ValueError, match="\\(batch, dim\\) embedding tensors"):
        extract_features(spatial, dataset, verbose=0)
