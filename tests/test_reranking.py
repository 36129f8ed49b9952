"""k-reciprocal re-ranking against a direct, unoptimised transcription of Zhong et al. (CVPR 2017)."""
import numpy as np
import pytest

from rga_keras.evaluation import evaluate, evaluate_distances
from rga_keras.evaluation.reranking import k_reciprocal_rerank


def reference_rerank(query, gallery, k1, k2, lam, metric):
    """Dense float64 loops over every image, one paper equation at a time."""
    x = np.concatenate([query, gallery]).astype(np.float64)
    n, nq = len(x), len(query)
    if metric == "euclidean":  # squared euclidean, as the authors' code
        dist = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)])
    else:  # cosine distance
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        dist = np.array([[0.0 if i == j else 1.0 - unit[i] @ unit[j] for j in range(n)] for i in range(n)])
    dist = dist / dist.max(axis=1, keepdims=True)  # each row by its own maximum
    rank = np.argsort(dist, axis=1, kind="stable")  # ties: lower index first

    def neighbours(i, k):  # N(i, k): k + 1 nearest, i included
        return list(rank[i, : k + 1])

    def reciprocal(i, k):  # R(i, k), eq. 4
        return [j for j in neighbours(i, k) if i in neighbours(j, k)]

    half = int(round(k1 / 2))  # Python rounds half to even
    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:  # eq. 6
            rc = reciprocal(c, half)
            if len(set(rc) & set(r)) > 2.0 / 3.0 * len(rc):
                expanded |= set(rc)
        idx = sorted(expanded)
        w = np.exp(-dist[i, idx])  # eq. 7
        v[i, idx] = w / w.sum()
    if k2 > 1:  # local query expansion, eq. 11
        v = np.array([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.array(
        [[1.0 - np.minimum(v[i], v[j]).sum() / np.maximum(v[i], v[j]).sum() for j in range(nq, n)] for i in range(nq)]
    )  # eq. 10
    return (1 - lam) * jaccard + lam * dist[:nq, nq:]  # eq. 12


def clustered(rng, num_ids, per_id, dim, spread):
    centres = rng.standard_normal((num_ids, dim))
    ids = np.repeat(np.arange(num_ids), per_id)
    return (centres[ids] + spread * rng.standard_normal((ids.size, dim))).astype(np.float32), ids


@pytest.mark.parametrize(
    "k1,k2,lam,metric,seed",
    [(20, 6, 0.3, "euclidean", 0), (20, 6, 0.3, "cosine", 1), (6, 3, 0.5, "euclidean", 2), (5, 1, 0.0, "cosine", 3),
     (3, 4, 1.0, "euclidean", 4)],
)
def test_matches_direct_transcription(k1, k2, lam, metric, seed):
    rng = np.random.default_rng(seed)
    feats, _ = clustered(rng, num_ids=14, per_id=6, dim=8, spread=0.6)
    perm = rng.permutation(len(feats))
    query, gallery = feats[perm[:20]], feats[perm[20:]]
    got = k_reciprocal_rerank(query, gallery, k1=k1, k2=k2, lambda_value=lam, metric=metric)
    want = reference_rerank(query, gallery, k1, k2, lam, metric)
    assert got.shape == (20, len(feats) - 20) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


def test_fewer_images_than_neighbours():
    rng = np.random.default_rng(5)
    query, gallery = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    got = k_reciprocal_rerank(query, gallery, metric="euclidean")  # k1 = 20 > 8 images
    np.testing.assert_allclose(got, reference_rerank(query, gallery, 20, 6, 0.3, "euclidean"), atol=2e-6)


def test_chunked_paths_match_reference(monkeypatch):
    """Tiny chunk budgets force many pass-1, index and Jaccard chunks."""
    import rga_keras.evaluation.reranking as rr

    monkeypatch.setattr(rr, "CHUNK_ENTRIES", 40)
    monkeypatch.setattr(rr, "_INDEX_ROWS", 7)
    rng = np.random.default_rng(6)
    feats, _ = clustered(rng, num_ids=10, per_id=5, dim=6, spread=0.5)
    got = rr.k_reciprocal_rerank(feats[:12], feats[12:], k1=8, k2=3, metric="euclidean")
    np.testing.assert_allclose(got, reference_rerank(feats[:12], feats[12:], 8, 3, 0.3, "euclidean"), atol=2e-6)


def test_cosine_equals_euclidean_on_unit_features():
    rng = np.random.default_rng(7)
    feats, _ = clustered(rng, num_ids=8, per_id=5, dim=8, spread=0.5)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    a = k_reciprocal_rerank(feats[:10], feats[10:], k1=6, k2=3, metric="cosine")
    b = k_reciprocal_rerank(feats[:10], feats[10:], k1=6, k2=3, metric="euclidean")
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_evaluate_rerank_uses_reranked_distances():
    rng = np.random.default_rng(8)
    feats, ids = clustered(rng, num_ids=12, per_id=5, dim=8, spread=0.9)
    cams = np.tile(np.arange(5), 12)
    q, g = np.arange(0, 60, 5), np.setdiff1d(np.arange(60), np.arange(0, 60, 5))
    reranked = reference_rerank(feats[q], feats[g], 20, 6, 0.3, "cosine")
    want = evaluate_distances(reranked, ids[q], ids[g], cams[q], cams[g])
    got = evaluate(feats[q], feats[g], ids[q], ids[g], cams[q], cams[g], rerank=True)
    for key in ("rank1", "rank5", "mAP", "mINP"):
        assert got[key] == pytest.approx(want[key])


@pytest.mark.parametrize(
    "kwargs,match",
    [({"k1": 0}, "k1 and k2"), ({"k2": 0}, "k1 and k2"), ({"lambda_value": 1.5}, "lambda_value"),
     ({"metric": "manhattan"}, "metric")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        k_reciprocal_rerank(np.ones((2, 3)), np.ones((4, 3)), **kwargs)


def test_dimension_mismatch():
    with pytest.raises(ValueError, match="dimensions differ"):
        k_reciprocal_rerank(np.ones((2, 3)), np.ones((4, 5)))
