"""Ranked-list and training-curve PNGs: files, sizes, frame colours."""
import json

import numpy as np
import pytest
from PIL import Image

from rga_keras.visualize.plots import (
    BLUE,
    BORDER,
    GREEN,
    RED,
    plot_ranked_lists,
    plot_training_curves,
    ranked_list_layout,
    read_history,
)


@pytest.fixture
def gallery_problem(tmp_path):
    rng = np.random.default_rng(0)
    nq, ng = 5, 12
    paths = []
    for i in range(nq + ng):
        path = tmp_path / f"img_{i}.png"
        Image.new("RGB", (20 + i, 40), (128, 128, 128)).save(path)  # grey, varied sizes
        paths.append(str(path))
    qids, qcams = np.array([1, 2, 3, 1, 9]), np.array([0, 0, 1, 1, 0])
    gids = np.array([1, 2, 3, 1, 2, 3, 0, -1, 1, 2, 3, 1])
    gcams = np.array([0, 1, 1, 2, 0, 0, 1, 1, 1, 2, 2, 0])
    dist = rng.random((nq, ng)).astype(np.float32)
    dist[0, :4] = 0.5  # a tie: gallery order decides
    return paths[:nq], paths[nq:], dist, qids, gids, qcams, gcams


def reference_top(dist_row, qid, qcam, gids, gcams, top_k):
    kept = [j for j in range(len(gids)) if not (gids[j] == qid and gcams[j] == qcam) and gids[j] != -1]
    ranked = sorted(kept, key=lambda j: (dist_row[j], j))[:top_k]
    return [gids[j] == qid for j in ranked]


@pytest.mark.parametrize("top_k,num_queries,cell", [(10, 8, (64, 128)), (3, 2, (16, 24))])
def test_ranked_list_frames(tmp_path, gallery_problem, top_k, num_queries, cell):
    qpaths, gpaths, dist, qids, gids, qcams, gcams = gallery_problem
    out = plot_ranked_lists(qpaths, gpaths, dist, qids, gids, qcams, gcams, tmp_path / "sub" / "ranked.png",
                            top_k=top_k, num_queries=num_queries, cell_size=cell)
    assert out == tmp_path / "sub" / "ranked.png" and out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["ranked.png"]  # no temporary left behind
    rows = np.unique(np.linspace(0, 4, min(num_queries, 5)).round().astype(int))
    corner, size = ranked_list_layout(len(rows), top_k, cell)
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (size[1], size[0], 3)
    assert size == (4 + (top_k + 1) * (cell[0] + 2 * BORDER + 4) + 16, 4 + len(rows) * (cell[1] + 2 * BORDER + 18))
    greens = reds = 0
    for r, q in enumerate(rows):
        truth = reference_top(dist[q], qids[q], qcams[q], gids, gcams, top_k)
        for column in range(top_k + 1):
            x, y = corner(r, column)
            edge = tuple(image[y + 1, x + 1])  # inside the frame band
            centre = tuple(image[y + BORDER + cell[1] // 2, x + BORDER + cell[0] // 2])
            if column == 0:
                assert edge == BLUE and centre == (128, 128, 128)
            elif column <= len(truth):
                assert edge == (GREEN if truth[column - 1] else RED), (r, column)
                assert centre == (128, 128, 128)
                greens += truth[column - 1]
                reds += not truth[column - 1]
            else:  # fewer kept gallery images than top_k: blank cell
                assert edge == (255, 255, 255)
    assert greens > 0 and reds > 0


def test_ranked_list_tie_and_chosen_queries(tmp_path, gallery_problem):
    qpaths, gpaths, dist, qids, gids, qcams, gcams = gallery_problem
    # Query 0 (id 1, cam 0): gallery 0 is same id+cam (removed); 1, 2, 3 tie at 0.5 -> F, F, T in gallery order
    dist = dist.copy()
    dist[0, 4:] = 0.9
    out = plot_ranked_lists(qpaths, gpaths, dist, qids, gids, qcams, gcams, tmp_path / "r.png",
                            top_k=3, query_indices=[0], cell_size=(8, 8))
    corner, _ = ranked_list_layout(1, 3, (8, 8))
    image = np.asarray(Image.open(out).convert("RGB"))
    assert [tuple(image[corner(0, k)[1] + 1, corner(0, k)[0] + 1]) for k in (1, 2, 3)] == [RED, RED, GREEN]


def test_ranked_list_bad_input(tmp_path, gallery_problem):
    qpaths, gpaths, dist, qids, gids, qcams, gcams = gallery_problem
    with pytest.raises(ValueError, match="distances must be"):
        plot_ranked_lists(qpaths, gpaths, dist[:, :3], qids, gids, qcams, gcams, tmp_path / "x.png")
    with pytest.raises(ValueError, match="gallery_ids must have 12"):
        plot_ranked_lists(qpaths, gpaths, dist, qids, gids[:5], qcams, gcams, tmp_path / "x.png")
    with pytest.raises(ValueError, match="query_indices"):
        plot_ranked_lists(qpaths, gpaths, dist, qids, gids, qcams, gcams, tmp_path / "x.png", query_indices=[7])
    with pytest.raises(FileNotFoundError):
        plot_ranked_lists(["nope.png"] + qpaths[1:], gpaths, dist, qids, gids, qcams, gcams, tmp_path / "x.png")
    assert not any(tmp_path.glob("*.png.*"))  # failed writes leave nothing behind


HISTORY = {"loss": [3.0, 2.0, 1.5], "val_loss": [3.2, 2.5, 2.0], "rank1": [0.2, 0.5, 0.7], "mAP": [0.1, 0.3, 0.5]}


def test_training_curves_from_dict_json_and_csv(tmp_path):
    (tmp_path / "h.json").write_text(json.dumps(HISTORY))
    records = [{k: v[i] for k, v in HISTORY.items()} for i in range(3)]
    (tmp_path / "records.json").write_text(json.dumps(records))
    csv_text = "epoch,loss,val_loss,rank1,mAP\n" + "".join(
        f"{i},{r['loss']},{r['val_loss']},{r['rank1'] if i else ''},{r['mAP']}\n" for i, r in enumerate(records))
    (tmp_path / "log.csv").write_text(csv_text)
    for source in (HISTORY, tmp_path / "h.json", tmp_path / "records.json", tmp_path / "log.csv"):
        out = plot_training_curves(source, tmp_path / "curves.png")
        assert Image.open(out).size == (3 * 400, 350)
    from_csv = read_history(tmp_path / "log.csv")
    np.testing.assert_array_equal(from_csv["epoch"], [0, 1, 2])
    np.testing.assert_array_equal(from_csv["rank1"], [np.nan, 0.5, 0.7])
    np.testing.assert_array_equal(read_history(tmp_path / "records.json")["mAP"], HISTORY["mAP"])


def test_training_curves_only_some_panels(tmp_path):
    out = plot_training_curves({"loss": [1, 0.5], "lr": [1e-3, 1e-3]}, tmp_path / "c.png")
    assert Image.open(out).size == (400, 350)
    out = plot_training_curves({"val_Rank-1": [0.5, 0.6], "val_mAP": [0.3, 0.4]}, tmp_path / "c.png")
    assert Image.open(out).size == (800, 350)


def test_training_curves_errors(tmp_path):
    with pytest.raises(ValueError, match="no loss, Rank-1 or mAP.*'lr'"):
        plot_training_curves({"lr": [0.1, 0.01]}, tmp_path / "c.png")
    (tmp_path / "log.txt").write_text("loss 1")
    with pytest.raises(ValueError, match=".json or .csv"):
        plot_training_curves(tmp_path / "log.txt", tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
