"""rga-serve's JSON API (FastAPI's TestClient, no server): searches over each kind of gallery against a
brute-force ranking, uploads embedded as rga-embed embeds files, attention maps as attention_maps draws them,
bad uploads, and nothing served from outside the gallery root."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from rga_keras import retrieval
from rga_keras.retrieval.web import create_app
from tests.test_export import SIZE, tiny_reid_model
from tests.test_retrieval_gallery import SMALL, one_faiss_thread  # noqa: F401 (autouse)
from tests.test_retrieval_search import brute_force

PAGE = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A gallery root of 12 crops (Market-style names) embedded by a tiny RGA-SC model, plus two rows the
    server must not show: an image outside the root and a link inside it that points outside. The model is
    used in memory (an `Embedder` as load_embedder makes for a .keras file), not saved and loaded."""
    from rga_keras import embedding_model
    from rga_keras.retrieval.models import Embedder

    tmp = tmp_path_factory.mktemp("serve")
    root, outside = tmp / "root", tmp / "outside"
    (root / "cam1").mkdir(parents=True)
    outside.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (14, *SIZE, 3), dtype=np.uint8)
    paths = [str(root / "cam1" / f"{i // 3:04d}_c{i % 2 + 1}s1_{i:06d}_00.png") for i in range(12)]
    paths += [str(outside / "secret.png"), str(root / "link.png")]
    for path, image in zip(paths[:13], pixels):
        Image.fromarray(image).save(path)
    os.symlink(outside / "secret.png", root / "link.png")
    model = tiny_reid_model(4, name="serve_rga")
    embed = embedding_model(model, "after_bn")
    embedder = Embedder(tmp / "model.keras", "keras", SIZE, "after_bn",
                        lambda images: np.asarray(embed(images, training=False)), model)
    source = {"model": str(tmp / "model.keras"), "model_sha256": "ab" * 32, "model_format": "keras",
              "feature": "after_bn", "input_size": list(SIZE), "flip": False}
    data = retrieval.FeatureSet(embedder(pixels.astype(np.float32)), paths, source)
    gallery_file = retrieval.write_features(tmp / "gallery.h5", data)
    return {"tmp": tmp, "root": root, "paths": paths, "embedder": embedder, "data": data,
            "gallery_file": gallery_file}


def assert_ranking(results, query_row, features):
    """``results`` rank the gallery as a float64 brute force does: the same similarity at every rank, each
    the similarity of the id it names (ids may differ only between near-equal similarities)."""
    order, sims, all_sims = brute_force(features[query_row:query_row + 1], features, len(results))
    got = np.array([r["similarity"] for r in results])
    np.testing.assert_allclose(got, sims[0], atol=1e-5)
    np.testing.assert_allclose(got, all_sims[0, [r["row"] for r in results]], atol=1e-5)
    assert [r["rank"] for r in results] == list(range(1, len(results) + 1))


def client_for(gallery, served, **options):
    from fastapi.testclient import TestClient

    options = {"embedder": served["embedder"], "page_size": PAGE, **options}
    return TestClient(create_app(gallery, root=served["root"], **options))


@pytest.fixture()
def client(served):
    with retrieval.FileGallery(served["gallery_file"]) as gallery:
        yield client_for(gallery, served)


def open_backend(kind, served, tmp_path):
    data = served["data"]
    if kind == "exact":
        return retrieval.FileGallery(served["gallery_file"]), list(range(14))
    if kind == "index":
        copy = retrieval.write_features(tmp_path / "gallery.h5", data)
        retrieval.build_index(copy, **{**SMALL, "factory": "IVF2,SQ8", "nprobe": 2, "train_rows": 14})
        return retrieval.IndexedGallery(copy), list(range(14))
    gallery = retrieval.MilvusGallery(tmp_path / "milvus.db", create_for=(data.source, data.features.shape[1]))
    return gallery, gallery.append(data)


@pytest.mark.parametrize("kind", ["exact", "index", "milvus"])
def test_search_by_gallery_image_pages_the_exact_ranking(served, tmp_path, kind):
    gallery, ids = open_backend(kind, served, tmp_path)
    with gallery:
        client = client_for(gallery, served)
        about = client.get("/api/gallery").json()
        assert about["size"] == 14 and about["search"] == gallery.method and about["upload"] and about["attention"]
        seen = []
        for page in (1, 2, 3, 4):
            body = client.get(f"/api/search?id={ids[3]}&page={page}").json()
            assert (body["page"], body["pages"], body["total"], body["search"]) == (page, 4, 14, gallery.method)
            seen += body["results"]
        assert sorted(r["id"] for r in seen) == sorted(ids)  # every image once
        assert_ranking([{**r, "row": ids.index(r["id"])} for r in seen], 3, served["data"].features)
        assert seen[0]["id"] == ids[3] and body["query"]["id"] == ids[3]
        first = next(r for r in seen if r["id"] == ids[4])
        assert (first["identity"], first["camera"], first["path"]) == ("0001", "1", "cam1/0001_c1s1_000004_00.png")
        assert first["image"] == f"/image/{ids[4]}"
        hidden = [r for r in seen if r["id"] in (ids[12], ids[13])]
        assert len(hidden) == 2 and all(r["path"] is None and r["image"] is None for r in hidden)
        browsed = client.get("/api/browse?page=2").json()
        assert browsed["pages"] == 4 and [item["id"] for item in browsed["items"]] == ids[4:8]
        assert client.get(f"/image/{ids[4]}").content == open(served["paths"][4], "rb").read()


def test_an_uploaded_crop_is_embedded_as_rga_embed_does_and_pages_by_token(served, client):
    data = open(served["paths"][5], "rb").read()
    body = client.post("/api/search", files={"file": ("me.png", data, "image/png")}).json()
    assert body["query"]["name"] == "me.png" and body["results"][0]["id"] == 5
    assert body["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)  # the stored embedding of that file
    second = client.get(f"/api/search?token={body['query']['token']}&page=2").json()
    assert_ranking([{**r, "row": r["id"]} for r in body["results"] + second["results"]], 5, served["data"].features)


def test_attention_maps_are_the_ones_attention_maps_draws(served, client, tmp_path):
    from rga_keras.visualize.attention_maps import attention_maps, plot_attention_maps
    from rga_keras.retrieval.web import load_query_image

    pixels = load_query_image(open(served["paths"][2], "rb").read(), SIZE)
    model = served["embedder"].keras_model
    expected = plot_attention_maps(pixels[None], attention_maps(model, pixels[None]), tmp_path / "a.png",
                                   cell_size=(128, 256)).read_bytes()  # 64x32 enlarged 4 times: 110+ pixels wide
    response = client.get("/api/attention?id=2")
    assert response.headers["content-type"] == "image/png" and response.content == expected
    token = client.post("/api/search", files={"file": ("x.png", open(served["paths"][2], "rb").read())}).json()
    assert client.get(f"/api/attention?token={token['query']['token']}").content == expected
    assert Image.open(io.BytesIO(expected)).size[1] > 256  # the image and one map per stage


def test_bad_uploads_get_a_clear_message(served, tmp_path):
    png = open(served["paths"][0], "rb").read()
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    with retrieval.FileGallery(served["gallery_file"]) as gallery:
        client = client_for(gallery, served, max_upload_bytes=len(png) + 10, max_pixels=SIZE[0] * SIZE[1])
        for content, status, message in [
            (b"hello, not an image", 415, "not an image: expected a JPEG, PNG, BMP or GIF file"),
            (tiff.getvalue(), 415, "a TIFF image: expected a JPEG, PNG, BMP or GIF file"),
            (png[:60], 415, "could not be decoded"),
            (png + b"\0" * 20, 413, "larger than"),
        ]:
            response = client.post("/api/search", files={"file": ("x", content)})
            assert response.status_code == status and message in response.json()["detail"], response.json()
        big = io.BytesIO()
        Image.new("RGB", (SIZE[1] + 1, SIZE[0])).save(big, format="PNG")
        response = client.post("/api/search", files={"file": ("big.png", big.getvalue())})
        assert response.status_code == 413 and "is 33x64 pixels, more than the 2,048 allowed" in response.json()["detail"]


def test_nothing_outside_the_gallery_root_is_served(client, served):
    secret = open(served["paths"][12], "rb").read()
    for url, status in [("/image/12", 403), ("/image/13", 403), ("/image/14", 404), ("/image/-1", 404),
                        ("/image/..%2F..%2Foutside%2Fsecret.png", 404), ("/image/../../outside/secret.png", 404),
                        ("/../outside/secret.png", 404), ("/image/12%00", 422), ("/api/attention?id=12", 403),
                        ("/api/search?id=99", 404), ("/api/search?id=1&page=9", 404), ("/api/search", 400),
                        ("/api/search?token=nope", 404)]:
        response = client.get(url)
        assert response.status_code == status, (url, response.status_code, response.text)
        assert response.content != secret and response.headers["content-type"] == "application/json"
    assert client.get("/image/12").json()["detail"].startswith("that gallery image lies outside the gallery root")


def test_without_a_keras_model_the_page_says_what_is_missing(served):
    from rga_keras.retrieval.models import Embedder

    tflite_like = Embedder(served["tmp"] / "model.tflite", "tflite", SIZE, None, served["embedder"].run)
    with retrieval.FileGallery(served["gallery_file"]) as gallery:
        client = client_for(gallery, served, embedder=tflite_like)
        about = client.get("/api/gallery").json()
        assert about["upload"] and not about["attention"]
        response = client.get("/api/attention?id=1")
        assert response.status_code == 409 and response.json()["detail"] == (
            "attention maps are drawn from a .keras model; this gallery's model is tflite (model.tflite)")
        client = client_for(gallery, served, embedder=None, no_embedder="its model /m.keras does not exist")
        response = client.post("/api/search", files={"file": ("x.png", open(served["paths"][0], "rb").read())})
        assert response.status_code == 409 and response.json()["detail"] == (
            "uploads need the gallery's model: its model /m.keras does not exist")
        assert client.get("/api/search?id=1").status_code == 200  # picking a gallery image needs no model


# --------------------------------------------------------------------------- in a real browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


@pytest.fixture()
def server(served):
    """The app served by uvicorn on a free port of 127.0.0.1, in a thread."""
    import socket
    import threading

    import uvicorn

    with retrieval.FileGallery(served["gallery_file"]) as gallery:
        app = create_app(gallery, root=served["root"], embedder=served["embedder"], page_size=PAGE)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            thread.join(0.05)
            assert thread.is_alive(), "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_the_page_in_chromium(served, server, tmp_path):
    """Debian's Chromium driven by Playwright: pick a query, page the results, upload a crop, see an error."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium): the browser test needs it")
    (tmp_path / "notes.txt").write_text("not an image")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(server)
        page.wait_for_selector("#browse .cell")
        assert "search: exact" in page.inner_text("#about")
        assert page.locator("#browse .cell").count() == PAGE

        page.click('#browse .cell[data-id="1"]')
        page.wait_for_selector('#results .cell[data-id="1"]')
        assert page.inner_text("#results-page") == "page 1 of 4 (top 14)"
        assert page.inner_text("#results .cell >> nth=0 >> .score") == "1: 1.0000"
        assert page.inner_text("#results .cell >> nth=0 >> .info") == "id 0000 · cam 2"
        # every image loaded (or failed) before they are measured: under load a thumbnail could still be loading
        page.wait_for_function("[...document.querySelectorAll('#results img[src], #attention img')]"
                               ".every(i => i.complete)")
        sizes = page.eval_on_selector_all("#results img[src], #attention img",
                                          "imgs => imgs.map(i => i.complete ? i.naturalWidth : -1)")
        assert len(sizes) >= 2 and min(sizes) > 0, sizes  # every thumbnail shown and the attention maps loaded

        page.click("#next")
        page.wait_for_selector("text=page 2 of 4 (top 14)")
        assert page.inner_text("#results .cell >> nth=0 >> .score").startswith("5: ")

        page.set_input_files("#upload", served["paths"][6])
        page.wait_for_selector('#results .cell[data-id="6"] >> text=1: 1.0000')
        assert "uploaded" in page.inner_text("#query")

        page.set_input_files("#upload", str(tmp_path / "notes.txt"))
        page.wait_for_selector("#error:visible")
        assert page.inner_text("#error") == "not an image: expected a JPEG, PNG, BMP or GIF file"
        browser.close()
