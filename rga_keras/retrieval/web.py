"""rga-serve's web app: a page and a JSON API to search a gallery (any `rga_keras.retrieval.gallery.Gallery`).

    GET  /                      the page (``page.html`` beside this module)
    GET  /api/gallery           what is served: the gallery, its search, its model, what the page can do
    GET  /api/browse?page=P     gallery images to pick a query from
    GET  /api/search?id=I&page=P        rank the gallery for gallery image I (its stored embedding)
    POST /api/search  (file=IMAGE)      rank it for an uploaded crop, embedded with the gallery's model;
                                        the answer's ``query.token`` pages it: GET /api/search?token=T&page=P
    GET  /api/attention?id=I | token=T  the query's spatial attention maps over it, PNG (.keras models only)
    GET  /image/{id}            a gallery image file; only files inside the gallery root are served

Errors are JSON ``{"detail": "one line"}`` with a 4xx status: an upload that is not a JPEG/PNG/BMP/GIF image
(415), too large in bytes or pixels (413), no model to embed it or draw its attention with (409), an
unknown id (404), an image outside the root (403). Work on the gallery and the model is serialised by
one lock (searches are short; the model is not reentrant).
"""

import collections
import hashlib
import io
import math
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from rga_keras.retrieval.gallery import Gallery
from rga_keras.retrieval.models import Embedder

IMAGE_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp", "GIF": "image/gif"}
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_PIXELS = 25_000_000  # a 5000 x 5000 photo; person crops are far smaller
PAGE_SIZE = 24
MAX_RESULTS = 480        # deepest rank the page can reach (20 pages)
UPLOADS_KEPT = 64        # recent uploaded queries kept for paging and their attention map
ATTENTION_CELL_WIDTH = 110  # pixels: room for a map's label ("rga1 0.36-0.62")
PAGE_FILE = Path(__file__).with_name("page.html")


class Refused(Exception):
    """A request that cannot be served: ``status`` and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(gallery: Gallery, *, root: str | os.PathLike, embedder: Embedder | None = None,
               no_embedder: str = "", page_size: int = PAGE_SIZE, max_results: int = MAX_RESULTS,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS):
    """The FastAPI app serving ``gallery`` (see the module doc).

    ``root``: the folder whose files may be served as gallery images. ``embedder``: the gallery's model, to
    embed uploads (and, for a ``.keras`` model, to draw attention maps); without it uploads are refused with
    ``no_embedder`` as the reason.
    """
    from fastapi import FastAPI, File, Request, UploadFile
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

    root = Path(os.path.realpath(root))
    if not root.is_dir():
        raise FileNotFoundError(f"gallery root {root} is not a folder")
    lock = threading.Lock()
    uploads: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
    app = FastAPI(title="rga-serve", docs_url=None, redoc_url=None, openapi_url=None)
    attention_note = _attention_note(embedder, no_embedder)

    @app.exception_handler(Refused)
    def refused(request: Request, err: Refused) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE_FILE.read_text(encoding="utf-8")

    @app.get("/api/gallery")
    def about() -> dict:
        with lock:
            size = len(gallery)
        return {"gallery": gallery.describe(), "size": size, "search": gallery.method, "source": gallery.source,
                "root": str(root), "upload": embedder is not None, "upload_note": no_embedder,
                "attention": not attention_note, "attention_note": attention_note, "page_size": page_size,
                "max_results": max_results}

    @app.get("/api/browse")
    def browse(page: int = 1) -> dict:
        with lock:
            size = len(gallery)
            pages = max(1, math.ceil(size / page_size))
            ids = gallery.ids((_page(page, pages) - 1) * page_size, page_size)
            crops = gallery.crops(ids) if ids else []
        return {"page": page, "pages": pages, "items": [_item(i, crop, root) for i, crop in zip(ids, crops)]}

    @app.get("/api/search")
    def search_get(id: int | None = None, token: str | None = None, page: int = 1) -> dict:
        if (id is None) == (token is None):
            raise Refused(400, "give the query as id=N (a gallery image) or token=T (an uploaded crop)")
        with lock:
            if id is not None:
                query = _item(id, _crop(gallery, id), root)
                vector = gallery.vectors([id])
            else:
                vector, query = _upload(uploads, token)[0][None], {"token": token}
        return _results(gallery, vector, query, page, page_size, max_results, root, lock)

    @app.post("/api/search")
    async def search_post(file: UploadFile = File(...)) -> dict:
        if embedder is None:
            raise Refused(409, f"uploads need the gallery's model: {no_embedder}")
        data = await file.read(max_upload_bytes + 1)
        pixels = load_query_image(data, embedder.input_size, max_upload_bytes, max_pixels)
        token = hashlib.sha256(data).hexdigest()[:24]
        with lock:
            vector = embedder(pixels[None])[0]
            uploads[token] = (vector, pixels)
            uploads.move_to_end(token)
            while len(uploads) > UPLOADS_KEPT:
                uploads.popitem(last=False)
        return _results(gallery, vector[None], {"token": token, "name": file.filename or ""}, 1, page_size,
                        max_results, root, lock)

    @app.get("/api/attention")
    def attention(id: int | None = None, token: str | None = None) -> Response:
        if attention_note:
            raise Refused(409, attention_note)
        if (id is None) == (token is None):
            raise Refused(400, "give the query as id=N (a gallery image) or token=T (an uploaded crop)")
        with lock:
            if token is not None:
                pixels = _upload(uploads, token)[1]
            else:
                path = _inside(_crop(gallery, id).path, root)
                pixels = load_query_image(path.read_bytes(), embedder.input_size, max_upload_bytes, max_pixels)
            return Response(attention_png(embedder, pixels), media_type="image/png")

    @app.get("/image/{id}")
    def image(id: int) -> FileResponse:
        with lock:
            path = _inside(_crop(gallery, id).path, root)
        if not path.is_file():
            raise Refused(404, f"gallery image {id} is missing ({path.relative_to(root)})")
        return FileResponse(path)

    return app


def load_query_image(data: bytes, size: tuple[int, int], max_bytes: int = MAX_UPLOAD_BYTES,
                     max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A query crop's pixels (H, W, 3) float32 0–255 at the model's input ``size``, decoded and resized as
    rga-embed does (`rga_keras.data.pipeline`); `Refused` for what is not an image of an allowed format, or
    is too large in bytes or pixels (checked from the header, before decoding)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > max_bytes:
        raise Refused(413, f"the image is larger than {max_bytes / 2**20:.0f} MiB; send a person crop")
    try:
        with Image.open(io.BytesIO(data)) as header:
            fmt, (width, height) = header.format, header.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise Refused(415, "not an image: expected a JPEG, PNG, BMP or GIF file") from None
    if fmt not in IMAGE_FORMATS:
        raise Refused(415, f"a {fmt} image: expected a JPEG, PNG, BMP or GIF file")
    if width * height > max_pixels:
        raise Refused(413, f"the image is {width}x{height} pixels, more than the {max_pixels:,} allowed; send a "
                           "person crop")
    import tensorflow as tf

    from rga_keras.data.pipeline import decode_image, resize_image

    try:
        image = decode_image(tf.constant(data))
    except tf.errors.OpError:
        raise Refused(415, f"the {fmt} image could not be decoded (damaged?)") from None
    return resize_image(image, *size).numpy()


def attention_cell_size(input_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a cell of the attention picture: the input size enlarged by a whole factor until a cell
    is `ATTENTION_CELL_WIDTH` wide, so the maps stay sharp and their labels fit under them."""
    scale = max(1, math.ceil(ATTENTION_CELL_WIDTH / input_size[1]))
    return input_size[1] * scale, input_size[0] * scale


def attention_png(embedder: Embedder, pixels: np.ndarray) -> bytes:
    """PNG of the spatial attention of each RGA stage over the query (`rga_keras.visualize.attention_maps`),
    cells of `attention_cell_size`; `Refused` when the model has no spatial attention."""
    from rga_keras.visualize.attention_maps import attention_maps, plot_attention_maps

    maps = attention_maps(embedder.keras_model, pixels[None])
    if not any("spatial_attention" in stage for stage in maps.values()):
        raise Refused(409, f"{embedder.path.name} has no spatial attention (no RGA-S module) to show")
    with tempfile.TemporaryDirectory() as tmp:
        return plot_attention_maps(pixels[None], maps, Path(tmp) / "attention.png",
                                   cell_size=attention_cell_size(embedder.input_size)).read_bytes()


def _attention_note(embedder: Embedder | None, no_embedder: str) -> str:
    """Why the page cannot show attention maps ("" when it can)."""
    if embedder is None:
        return f"attention maps need the gallery's model: {no_embedder}"
    if embedder.keras_model is None:
        return (f"attention maps are drawn from a .keras model; this gallery's model is {embedder.format} "
                f"({embedder.path.name})")
    return ""


def _results(gallery: Gallery, vector: np.ndarray, query: dict, page: int, page_size: int, max_results: int,
             root: Path, lock: threading.Lock) -> dict:
    with lock:
        total = min(max_results, len(gallery))
        pages = max(1, math.ceil(total / page_size))
        page = _page(page, pages)
        hits = gallery.search(vector, min(total, page * page_size))
        ids = [int(i) for i in hits.ids[0][(page - 1) * page_size:] if i >= 0]
        similarities = hits.similarities[0][(page - 1) * page_size:]
        crops = gallery.crops(ids) if ids else []
    results = [{"rank": (page - 1) * page_size + rank, "similarity": round(float(s), 6), **_item(i, crop, root)}
               for rank, (i, s, crop) in enumerate(zip(ids, similarities, crops), start=1)]
    return {"query": query, "search": gallery.method, "page": page, "pages": pages, "total": total,
            "results": results}


def _item(id: int, crop, root: Path) -> dict:
    path = os.path.realpath(crop.path)
    shown = os.path.relpath(path, root) if Path(path).is_relative_to(root) else None
    return {"id": int(id), "path": shown, "camera": crop.camera, "identity": crop.identity, "time": crop.time,
            "image": f"/image/{int(id)}" if shown else None}


def _page(page: int, pages: int) -> int:
    if not 1 <= page <= pages:
        raise Refused(404, f"page {page} does not exist (pages 1 to {pages})")
    return page


def _crop(gallery: Gallery, id: int):
    """The `Crop` of gallery image ``id``; `Refused` (404) for an unknown id."""
    try:
        return gallery.crops([id])[0]
    except KeyError as err:
        raise Refused(404, str(err.args[0])) from None


def _upload(uploads: collections.OrderedDict, token: str) -> tuple[np.ndarray, np.ndarray]:
    if token not in uploads:
        raise Refused(404, "that uploaded query has expired; upload the crop again")
    return uploads[token]


def _inside(path: str, root: Path) -> Path:
    """``path`` resolved (links followed), if it lies inside ``root``; `Refused` (403) otherwise."""
    resolved = Path(os.path.realpath(path))
    if not resolved.is_relative_to(root):
        raise Refused(403, "that gallery image lies outside the gallery root, which is all this server shows")
    return resolved
