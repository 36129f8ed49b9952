"""What the programs (rga-train, rga-eval, rga-export, rga-synth, rga-visualize, rga-embed, rga-search,
rga-gallery, rga-serve) share: their argument parser, their start-up, and one place that turns every way a run
can end into one line and an exit status. Importing it imports nothing heavy, so ``--help`` and usage errors stay
instant; each program imports the library (Keras, TensorFlow: seconds) inside ``main``, within `starting`.

Exit statuses (docs/RELIABILITY.md):

- 0: done.
- 1: the run worked but its result failed a check (an export that missed a parity threshold); the
  program says which.
- 2: bad input or a fault of the environment (a missing or existing file, a bad value, an unknown config
  key, a YAML syntax error, a full disk (also when a library such as h5py or TensorFlow reports it), no network
  for downloads): ``prog: error: …`` on one line.
- 128 + N: interrupted by signal N: 129 SIGHUP (a closed terminal), 130 SIGINT (Ctrl-C), 131 SIGQUIT (Ctrl-\\),
  143 SIGTERM (schedulers, preemption): ``prog: interrupted by SIGTERM; …`` saying what was kept; from the start
  of ``main`` on, the library's import included. 141 (SIGPIPE) and no word when stdout is a pipe that was
  closed (``rga-search … | head``).
- 70 (EX_SOFTWARE of sysexits.h): an unexpected error, i.e. a bug: one line naming it and the file its
  traceback was saved to.

Never a traceback on the terminal; the library's warnings on one line each, ``prog: warning: …``.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Iterator

from rga_keras.interrupts import handle_signals, interruption_in, signal_of
from rga_keras.native_logs import quiet_native_stderr

# TensorFlow's and LiteRT's native start-up lines stay off the programs' output unless the user chose a level
# (rga_keras/native_logs.py): set here, as every program imports this module before TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_UNEXPECTED = 0, 1, 2, 70

# Python's exceptions for inputs that cannot work: missing or existing files, bad values, unknown config keys,
# a dataset too large for memory, an optional package that is not installed.
INPUT_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, MemoryError, ImportError)


class CommandError(Exception):
    """A problem with a command's inputs found by the program itself, reported like `INPUT_ERRORS`."""


class OneLineParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors (a bad or missing argument, ``parser.error(...)``) print one line,
    ``prog: error: message (see prog --help)``, and exit with status 2, instead of the usage block and the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


@contextlib.contextmanager
def starting(prog: str) -> Iterator[None]:
    """Around a program's import of the library (seconds, before `run_command`): a signal there (Ctrl-C, SIGTERM,
    SIGHUP, SIGQUIT) ends the program with one line and status 128 + N, not an import traceback or a silent
    death. Native start-up lines of TensorFlow stay off the terminal (`quiet_native_stderr`), its device probe
    included."""
    try:
        with handle_signals(), quiet_native_stderr():
            yield
            if "tensorflow" in sys.modules:  # where TensorFlow probes for CUDA and logs its absence
                sys.modules["tensorflow"].config.list_physical_devices()
    except BaseException as err:
        interruption = interruption_in(err)
        if interruption is None:
            raise
        signum = signal_of(interruption)
        say(f"\n{prog}: interrupted by {signal.Signals(signum).name} while starting; nothing was done")
        sys.exit(128 + signum)


def say(line: str) -> None:
    """Write ``line`` to stderr; quietly nothing when it cannot be written (a terminal closed by SIGHUP)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _one_line_warnings(prog: str):
    """A `warnings.showwarning` that writes ``prog: warning: message`` on one line (no source line)."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        say(f"{prog}: warning: {' '.join(str(message).split())}")
    return show


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk is full: an OSError with ENOSPC/EDQUOT, or a library's error (h5py,
    TensorFlow) that carries only the C library's message."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(os.strerror(code) in str(err) for code in (errno.ENOSPC, errno.EDQUOT))


def error_message(err: BaseException) -> str:
    """``err`` as one line; a KeyError's message without the quotes ``str(KeyError)`` adds; a full disk said so."""
    if disk_full(err):
        filename = getattr(err, "filename", None)
        where = f" writing {filename}" if filename else ""
        return (f"no space left on the device{where} ({os.strerror(errno.ENOSPC)}): free some space or write "
                "elsewhere; nothing half-written was kept")
    if isinstance(err, OSError) and err.errno is not None and (not err.strerror or str(err).startswith("[Errno")):
        reason = err.strerror or os.strerror(err.errno)  # "[Errno 2] ...": the reason after the file, as ls says it
        files = " → ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        return f"{files}: {reason}" if files else reason
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(message.split()) or type(err).__name__


def save_traceback(prog: str, err: BaseException) -> str:
    """Write ``err``'s traceback to a new file in the temp folder; returns its path."""
    fd, path = tempfile.mkstemp(prefix=f"{prog}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".traceback.txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"{prog} {' '.join(sys.argv[1:])}\n")
        traceback.print_exception(type(err), err, err.__traceback__, file=f)
    return path


def run_command(prog: str, work: Callable[[], int], errors: tuple[type[BaseException], ...] = (),
                on_interrupt: Callable[[], str] | None = None,
                failures: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``work()`` and return its status, turning every other ending into one line on stderr and the status
    of the module doc: a failed check (``failures``) → 1; bad input (`INPUT_ERRORS`, `CommandError`, ``errors``)
    → 2; a signal N → 128 + N, with ``on_interrupt()`` saying what was kept; a closed stdout pipe → 141 quietly;
    anything else → 70 with the saved traceback's path. Warnings on the way are one line each."""
    try:
        with handle_signals(), warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(prog)
            return work()
    except BaseException as err:  # an interruption first: it may come wrapped (`interruption_in`)
        interruption = interruption_in(err)
        if interruption is not None:
            signum = signal_of(interruption)
            kept = on_interrupt() if on_interrupt else ""
            say(f"\n{prog}: interrupted by {signal.Signals(signum).name}" + (f"; {kept}" if kept else ""))
            return 128 + signum
        if isinstance(err, BrokenPipeError):  # `prog ... | head` stopped reading: end as a pipe's writer does
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 128 + signal.SIGPIPE
        if isinstance(err, failures):
            say(f"{prog}: {error_message(err)}")
            return EXIT_CHECK_FAILED
        if isinstance(err, (CommandError, *INPUT_ERRORS, *errors)):
            say(f"{prog}: error: {error_message(err)}")
            return EXIT_BAD_INPUT
        if not isinstance(err, Exception):  # SystemExit and the like go on
            raise
        return _unexpected(prog, err)


def _unexpected(prog: str, err: Exception) -> int:
    """A full disk seen by a library: 2; else a bug: 70, in one line, the traceback kept."""
    if disk_full(err):
        say(f"{prog}: error: {error_message(err)}")
        return EXIT_BAD_INPUT
    try:
        where = f"traceback saved to {save_traceback(prog, err)}"
    except OSError as save_err:
        where = f"its traceback could not be saved ({error_message(save_err)})"
    message = error_message(err)
    message = message if len(message) <= 300 else message[:297] + "..."
    say(f"{prog}: unexpected error (a bug, please report it): {type(err).__name__}: {message} — {where}")
    return EXIT_UNEXPECTED


# ---- what rga-eval and rga-visualize share: a model file and a dataset's query/gallery split -----------------

def add_model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The model file and dataset options of rga-eval and rga-visualize (choices from the library's constants;
    call inside `starting`, as it imports the library)."""
    from rga_keras.data import DATASETS
    from rga_keras.data.cuhk03 import SPLITS as CUHK03_SPLITS
    from rga_keras.models import FEATURES

    parser.add_argument("model", type=Path, help="trained model file (.keras), e.g. runs/demo/best.keras")
    parser.add_argument("--dataset", default="market1501", choices=DATASETS,
                        help="dataset layout (default market1501; 'synthetic' is the built-in demo dataset)")
    parser.add_argument("--data-root", help="folder holding the dataset (optional for --dataset synthetic)")
    parser.add_argument("--split", choices=CUHK03_SPLITS, help="CUHK03 boxes (default labeled)")
    parser.add_argument("--feature", choices=FEATURES,
                        help="retrieval feature: after_bn (BNNeck output) or before_bn (the pooled feature before "
                             "it); default: rga-eval reports both, rga-visualize uses after_bn")
    parser.add_argument("--flip", action="store_true", help="average each image's feature with its mirror's")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="input size to use; must be the one the model was built for (default: the model's)")


def check_model_and_data_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations of those options that cannot work, reported by argparse (one line, status 2)."""
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if args.split and args.dataset != "cuhk03":
        parser.error(f"--split applies to --dataset cuhk03 only, not {args.dataset}")
    if not args.data_root and args.dataset != "synthetic":
        parser.error(f"--data-root is required for --dataset {args.dataset}")


def load_model(path: Path, image_size: list[int] | None = None):
    """The RGA re-id model in ``path`` (`rga_keras.load_reid_model`) and its (H, W), checked against
    ``--image-size``."""
    from rga_keras.models import load_reid_model

    model = load_reid_model(path)
    size = tuple(int(d) for d in model.input.shape[1:3])
    if image_size is not None and tuple(image_size) != size:
        raise CommandError(f"{path} was built for {size[0]}x{size[1]} images, but --image-size is "
                           f"{image_size[0]}x{image_size[1]}; an RGA model's relation weights are tied to its input "
                           f"size (omit --image-size, or use a model trained at that size)")
    return model, size


def load_data(args: argparse.Namespace, prog: str):
    """The dataset the options name (`rga_keras.data.load_dataset`; "synthetic": the demo's dataset), with the
    query and gallery images ``prog`` needs."""
    from rga_keras.data import load_dataset
    from rga_keras.training.config import demo_config

    if args.dataset == "synthetic":
        spec = {k: v for k, v in demo_config()["dataset"].items() if k not in ("name", "root", "split")}
        data = load_dataset("synthetic", args.data_root, **spec)
    else:
        data = load_dataset(args.dataset, args.data_root, **({"split": args.split} if args.split else {}))
    data.require(("query", "gallery"), prog)
    return data


def eval_config(args: argparse.Namespace, size: tuple[int, int], data) -> dict:
    """The config sections `rga_keras.evaluation.features.evaluate_model` reads, from the options; a batch larger
    than the query or gallery is cut to it, and one that cannot fit in memory is refused."""
    from rga_keras.memory import check_batch_fits

    batch = min(args.batch_size, max(len(data.query), len(data.gallery)))
    check_batch_fits(batch, size, "--batch-size")
    return {"model": {"input_size": list(size)},
            "eval": {"feature": args.feature or "after_bn", "metric": getattr(args, "metric", "cosine"),
                     "flip": args.flip, "rerank": getattr(args, "rerank", False), "batch_size": batch}}


def report_skipped(skipped: list[str]) -> None:
    """List the images that could not be read (stderr), as rga-embed and rga-search do."""
    for path in skipped:
        print(f"skipped unreadable image: {path}", file=sys.stderr)


# ---- what rga-search, rga-serve and rga-gallery share: the gallery they name ----------------------------------

def add_gallery_arguments(parser: argparse.ArgumentParser, *, search: bool = True) -> None:
    """``--gallery FILE`` or ``--milvus URI`` (with ``--collection``), and with ``search`` the search options
    (call inside `starting`, as it imports the library)."""
    from rga_keras.retrieval.galleries import SEARCHES
    from rga_keras.retrieval.milvus import DEFAULT_COLLECTION

    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--gallery", type=Path, help="gallery features file written by rga-embed")
    where.add_argument("--milvus", metavar="URI", help="a Milvus gallery: a Milvus Lite folder (gallery.db) or a "
                       "server, http://HOST:19530 (token in $MILVUS_TOKEN)")
    parser.add_argument("--collection", default=DEFAULT_COLLECTION,
                        help=f"the Milvus collection (default {DEFAULT_COLLECTION})")
    if search:
        parser.add_argument("--search", choices=SEARCHES, default="auto",
                            help="a features file's search: exact, its faiss index (index), or auto (default): the "
                                 "index when there is one and the gallery is large")
        parser.add_argument("--nprobe", type=int, help="index lists visited per query (default: saved with the "
                            "faiss index; Milvus: its own)")
        parser.add_argument("--shortlist", type=int,
                            help="candidates re-ranked exactly per query (default: the faiss index's, 50 for Milvus)")


def open_named_gallery(args: argparse.Namespace):
    """The `rga_keras.retrieval.Gallery` the options of `add_gallery_arguments` name."""
    from rga_keras import retrieval

    for name in ("nprobe", "shortlist"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise CommandError(f"--{name} must be positive")
    return retrieval.open_gallery(args.gallery, milvus=args.milvus, collection=args.collection,
                                  search=getattr(args, "search", "exact"), nprobe=getattr(args, "nprobe", None),
                                  shortlist=getattr(args, "shortlist", None))


def load_gallery_model(model: Path | None, gallery):
    """The gallery's model as an `rga_keras.retrieval.Embedder` with the gallery's feature, and the source of its
    embeddings: ``model`` (--model: the same file moved elsewhere) or the path the gallery records; CommandError
    when the recorded file is gone, ValueError when the file is not the gallery's model (by hash) or its settings
    differ."""
    from rga_keras import retrieval

    path = model or Path(gallery.source["model"])
    if model is None and not path.exists():
        raise CommandError(f"the gallery's model {path} does not exist (moved?); pass its location with --model")
    embedder = retrieval.load_embedder(path, gallery.source["feature"])
    source = retrieval.feature_source(embedder, gallery.source["flip"])
    retrieval.check_same_source(gallery.source, source, "--model" if model else "the model at the recorded path")
    return embedder, source
