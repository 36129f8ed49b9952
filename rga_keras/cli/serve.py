"""rga-serve: a web page and a JSON API to search a gallery: upload a crop or pick one of the gallery's images,
see the ranked gallery as thumbnails with similarity, identity and camera (where the file names give them) and
the query's attention maps (.keras models), page by page.

The gallery is a features file (--gallery, searched exactly or through its faiss index: --search) or a
Milvus collection (--milvus). Uploads are embedded with the gallery's model (the path recorded in the gallery,
or --model where it has moved; without it the page searches only by gallery images). Only images inside
--root are shown (default: the folder holding all of a features file's images). The server listens on
127.0.0.1, this machine only, unless --host says otherwise; it has no login, so put it behind something that
has one before exposing it. The work is `rga_keras.retrieval.web`; bad input (a port in use too) exits with
status 2 and a one-line message; Ctrl-C stops the server (status 130, as for every program; SIGTERM 143, SIGHUP 129).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from rga_keras.cli.common import (CommandError, OneLineParser, add_gallery_arguments, load_gallery_model,
                                  open_named_gallery, run_command, starting)

EPILOG = """examples:
  rga-serve --gallery gallery.h5                         # then open http://127.0.0.1:8000/
  rga-serve --gallery gallery.h5 --port 8080 --model exported/tflite/rga_v1_float32.tflite
  rga-serve --milvus http://milvus:19530 --collection city --root /data/crops --host 0.0.0.0"""


def build_parser() -> argparse.ArgumentParser:
    """The parser (call inside `starting`: the choices come from the library)."""
    from rga_keras.retrieval import web

    parser = OneLineParser(prog="rga-serve", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gallery_arguments(parser)
    parser.add_argument("--root", type=Path, help="show only images inside this folder (default: the folder "
                        "holding all of a features file's images; needed with --milvus)")
    parser.add_argument("--model", type=Path,
                        help="the gallery's model, where it is now (default: the path recorded in the gallery)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--page-size", type=int, default=web.PAGE_SIZE,
                        help=f"results per page (default {web.PAGE_SIZE})")
    parser.add_argument("--max-upload-mb", type=float, default=web.MAX_UPLOAD_BYTES / 2**20,
                        help=f"largest upload in MiB (default {web.MAX_UPLOAD_BYTES / 2**20:.0f})")
    return parser


def gallery_root(args: argparse.Namespace, gallery) -> Path:
    """--root, or the folder holding every image of a features file (rga-serve asks for --root with Milvus)."""
    if args.root is not None:
        return args.root
    paths = gallery.paths(range(len(gallery)))
    return Path(os.path.commonpath([os.path.dirname(os.path.realpath(p)) for p in paths]))


def load_model(args: argparse.Namespace, gallery):
    """The gallery's `Embedder`, and why there is none ("" when there is one): without --model, a recorded model
    that has gone only turns uploads off."""
    try:
        return load_gallery_model(args.model, gallery)[0], ""
    except CommandError as err:
        return None, str(err)


def serve_until_signalled(server, listener) -> None:
    """``server.run`` (uvicorn), which shuts down gracefully on SIGINT and SIGTERM and then raises them again for
    the program to answer; SIGHUP and SIGQUIT, which uvicorn leaves alone (raised inside its event loop, they
    logged a traceback), are made to stop it the same way, then raised again once it has stopped."""
    got: list[int] = []

    def stop(signum, frame) -> None:
        got.append(signum)
        server.handle_exit(signum, frame)

    extra = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGQUIT)}
    for s, handler in extra.items():
        if handler is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(s, stop)
    try:
        server.run(sockets=[listener])
    finally:
        for s, handler in extra.items():
            signal.signal(s, handler)
    if got:
        signal.raise_signal(got[0])  # now the program's handler: one line, 128 + N


def main(argv: list[str] | None = None) -> int:
    with starting("rga-serve"):
        parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error("--port must be 1 to 65535")
    if args.page_size < 1 or args.max_upload_mb <= 0:
        parser.error("--page-size and --max-upload-mb must be positive")
    if args.milvus and args.root is None:
        parser.error("--root is needed with --milvus: the folder whose images the page may show")

    def work() -> int:
        import socket

        import uvicorn

        from rga_keras.retrieval.web import create_app

        with open_named_gallery(args) as gallery:
            root = gallery_root(args, gallery)
            listener = socket.create_server((args.host, args.port))  # a port in use: one line, status 2
            embedder, no_embedder = load_model(args, gallery)
            app = create_app(gallery, root=root, embedder=embedder, no_embedder=no_embedder,
                             page_size=args.page_size, max_upload_bytes=int(args.max_upload_mb * 2**20))
            print(f"gallery  {gallery.describe()}")
            print(f"search   {gallery.method}")
            print(f"images   shown from {root}")
            print(f"uploads  {f'embedded with {embedder.path}' if embedder else f'off: {no_embedder}'}")
            print(f"serving  http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
            with listener:
                serve_until_signalled(uvicorn.Server(uvicorn.Config(app, log_level="warning")), listener)
        return 0

    return run_command("rga-serve", work)


if __name__ == "__main__":
    sys.exit(main())
