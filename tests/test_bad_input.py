"""Bad input, faults and signals for every program: one line on stderr (no traceback) and the documented exit
status (rga_keras/cli/common.py, docs/RELIABILITY.md). Programs run in-process through their ``main(argv)``."""
import contextlib
import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from rga_keras.cli.export import main as rga_export
from rga_keras.cli import common as cli
from rga_keras.training import config as training_config
from rga_keras.cli import embed, evaluate, gallery, search, serve, synth, visualize
from rga_keras.cli.train import main as rga_train
from tests.checks import SMALL_RESNET

# A small ResNet (one bottleneck per stage, widths 8–64): these runs check the program's answers, not the network.
SMALL = [*SMALL_RESNET, "-o", "model.backbone_weights=null"]
TINY = ["--demo", "--quiet", "-o", "dataset.num_ids=8", "-o", "dataset.images_per_id=4",
        "-o", "sampler.num_ids_per_batch=2", "-o", "sampler.images_per_id=2", "-o", "training.epochs=1",
        "-o", "training.steps_per_epoch=1", "-o", "training.tensorboard=false", "-o", "export.enabled=false", *SMALL]


def one_line(capsys, prog: str, *expected: str) -> str:
    """stderr is one line from ``prog`` holding every ``expected`` piece, and no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}: "), err
    for piece in expected:
        assert piece in err, (piece, err)
    return err


def _bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  epochs: [1, 2\n")
    return path


CASES = {  # program: [(argv builder, exit status, pieces of the message)]
    "rga-train": (rga_train, [
        (lambda t: TINY + ["-o", "training.epochs=abc"], 2, ["'training.epochs'", "an integer", "'abc'"]),
        (lambda t: TINY + ["-o", "training.xla=maybe"], 2, ["'training.xla'", "true or false"]),
        (lambda t: TINY + ["-o", "optimizer.base_lr=[1"], 2, ["not valid YAML"]),
        (lambda t: ["--config", str(_bad_yaml(t))], 2, ["bad.yaml: not valid YAML (line 3"]),
        (lambda t: ["--config", str(t)], 2, ["neither a file nor a bundled config"]),
        (lambda t: TINY + ["-o", "optimizer.base_lr=-1"], 2, ["optimizer.base_lr must be > 0, found -1"]),
        (lambda t: TINY + ["-o", "loss.margin=.nan"], 2, ["'loss.margin' must be a finite number, found nan"]),
        (lambda t: TINY + ["-o", "training.steps_per_epoch=0"], 2, ["training.steps_per_epoch must be > 0, found 0"]),
        (lambda t: TINY + ["--run-dir", str(_file(t))], 2, ["--run-dir", "a_file is a file, not a folder"]),
        (lambda t: ["--data-root", str(t), "--quiet"], 2, ["the demo config trains on the built-in synthetic"]),
        (lambda t: TINY + ["--data-root", str(_no_train_images(t)), "-o", "dataset.name=folder"], 2,
         ["the train split holds 0 identities in 0 images (no training images", "sampler.num_ids_per_batch=2"]),
    ]),
    "rga-eval": (evaluate.main, [
        (lambda t: [str(t / "missing.keras"), "--dataset", "synthetic"], 2, ["missing.keras"]),
        (lambda t: [str(t / "m.keras"), "--dataset", "synthetic", "--json", str(t)], 2,
         ["--json", "is a folder; expected the path of a file"]),
        (lambda t: [str(t / "m.keras"), "--dataset", "synthetic", "--batch-size", "0"], 2,
         ["--batch-size must be positive (see rga-eval --help)"]),
    ]),
    "rga-export": (rga_export, [
        (lambda t: ["--model", str(t / "missing.keras"), "--out", str(t / "out")], 2, ["missing.keras"]),
        (lambda t: ["--model", str(t / "m.keras"), "--out", str(_file(t))], 2, ["--out", "is a file, not a folder"]),
        (lambda t: ["--model", "m.keras", "--out", str(t), "--formats", "bogus"], 2, ["unknown format(s) ['bogus']"]),
    ]),
    "rga-synth": (synth.main, [
        (lambda t: [str(t / "out"), "--ids", "1"], 2, ["num_ids must be in 2..9999"]),
        (lambda t: [str(_file(t)), "--ids", "4"], 2, ["is a file, not a folder"]),
        (lambda t: [str(_file(t)), "--ids", "4", "--force"], 2, ["is a file, not a folder"]),
        (lambda t: [str(_foreign(t)), "--ids", "4", "--force"], 2, ["was not created by rga_keras", "not replacing"]),
        (lambda t: [str(_foreign(t)), "--ids", "4"], 2, ["pass --force"]),
        (lambda t: [str(_file(t) / "data"), "--ids", "4"], 2, ["would be made inside", "which is a file, not a"]),
        (lambda t: [str(t / "out"), "--ids", "four"], 2, ["--ids: invalid int value: 'four'"]),
    ]),
    "rga-visualize": (visualize.main, [
        (lambda t: [str(t / "missing.keras"), "--out", str(t / "pics"), "--dataset", "synthetic"], 2,
         ["missing.keras"]),
    ]),
    "rga-embed": (embed.main, [
        (lambda t: [str(t / "missing.keras"), str(_image(t)), "--out", str(t / "f.h5")], 2, ["missing.keras"]),
        (lambda t: [str(t / "missing.keras"), str(t), "--out", str(t / "f.h5")], 2, ["no images found"]),
        (lambda t: [str(t / "m.keras"), str(t), "--out", str(t)], 2, ["--out", "is a folder; expected the path"]),
    ]),
    "rga-search": (search.main, [
        (lambda t: [str(t), "--gallery", str(t / "missing.h5")], 2, ["missing.h5"]),
        (lambda t: [str(t), "--gallery", str(t / "g.h5"), "--json", str(t)], 2, ["--json", "is a folder"]),
        (lambda t: [str(t), "--gallery", "g.h5", "--top-k", "0"], 2, ["--top-k must be positive"]),
    ]),
    "rga-gallery": (gallery.main, [
        (lambda t: ["index", str(t / "missing.h5")], 2, ["missing.h5 does not exist"]),
        (lambda t: ["delete", "--milvus", str(t / "m.db")], 2, ["say what to delete"]),
    ]),
    "rga-serve": (serve.main, [
        (lambda t: ["--gallery", str(t / "missing.h5")], 2, ["missing.h5 does not exist"]),
        (lambda t: ["--gallery", "g.h5", "--port", "70000"], 2, ["--port must be 1 to 65535"]),
    ]),
}


def _file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


def _image(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "person.jpg"
    Image.new("RGB", (32, 64)).save(path)
    return path


def _no_train_images(tmp_path) -> Path:
    from tests.bad_images import write_images

    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    write_images(root / "query", ["0001_c1_a.jpg"])
    write_images(root / "gallery", ["0001_c2_b.jpg"])
    return root


def _foreign(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir(exist_ok=True)
    (folder / "holiday.jpg").write_bytes(b"mine")
    return folder


@pytest.mark.parametrize("prog,index", [(p, i) for p, (_, cases) in CASES.items() for i in range(len(cases))])
def test_bad_input_gets_one_line_and_its_status(prog, index, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RGA_KERAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    main, cases = CASES[prog]
    argv, status, pieces = cases[index]
    try:
        assert main(argv(tmp_path)) == status
    except SystemExit as stop:  # argparse's errors
        assert stop.code == status
    one_line(capsys, prog, *pieces)
    if prog == "rga-synth" and (tmp_path / "photos").exists():  # --force never deletes a folder it did not make
        assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"mine"
    written = [p for p in tmp_path.glob("**/*") if p.name in (".complete.json", "config.yaml")]
    assert all(tmp_path / "cache" in p.parents for p in written), written  # nothing written outside the cache


def test_signals_end_every_program_with_their_status(capsys):
    """A real SIGTERM / SIGINT delivered to the process during the work: 143 / 130 and one line; the
    previous handlers are back afterwards."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def work(signum):
        def run():
            os.kill(os.getpid(), signum)
            raise AssertionError("the signal did not interrupt the work")
        return run

    assert cli.run_command("rga-eval", work(signal.SIGTERM), on_interrupt=lambda: "nothing was written") == 143
    one_line(capsys, "rga-eval", "interrupted by SIGTERM; nothing was written")
    assert cli.run_command("rga-search", work(signal.SIGINT)) == 130
    one_line(capsys, "rga-search", "interrupted by SIGINT")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_ctrl_c_while_starting_is_one_line(capsys):
    """Programs import TensorFlow (seconds) before `cli.run_command` handles signals: a Ctrl-C then is one line and
    status 130, not an import traceback."""
    from rga_keras.cli.common import starting

    with pytest.raises(SystemExit) as stop:
        with starting("rga-eval"):
            raise KeyboardInterrupt  # as SIGINT raises it in the middle of an import
    assert stop.value.code == 130
    one_line(capsys, "rga-eval", "interrupted by SIGINT while starting; nothing was done")


def test_an_unexpected_error_is_one_line_with_the_saved_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)

    def bug():
        raise ZeroDivisionError("division by zero\n  deep inside")

    assert cli.run_command("rga-embed", bug) == cli.EXIT_UNEXPECTED == 70
    err = one_line(capsys, "rga-embed", "unexpected error", "ZeroDivisionError: division by zero deep inside")
    saved = Path(err.rsplit("traceback saved to ", 1)[1])
    assert saved.parent == tmp_path and "Traceback" in saved.read_text()


def test_a_full_disk_during_export_is_one_line(monkeypatch, capsys, tmp_path):
    from rga_keras import export, models

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "rga_v1_int8.tflite"))

    monkeypatch.setattr(models, "load_reid_model", lambda path: None)
    monkeypatch.setattr(export, "export_all", full)
    assert rga_export(["--model", "m.keras", "--out", str(tmp_path / "out")]) == 2
    one_line(capsys, "rga-export", "no space left on the device writing", "rga_v1_int8.tflite")

    def full_in_tensorflow(*args, **kwargs):  # TensorFlow and h5py carry only the C library's message
        import tensorflow as tf

        raise tf.errors.UnknownError(None, None, "out/saved_model/variables.data: No space left on device")

    monkeypatch.setattr(export, "export_all", full_in_tensorflow)
    assert rga_export(["--model", "m.keras", "--out", str(tmp_path / "out")]) == 2
    one_line(capsys, "rga-export", "no space left on the device")


def test_an_interrupted_export_publishes_nothing(monkeypatch, capsys, tmp_path):
    """Ctrl-C swallowed inside the export (as a converter may do) still stops it before publishing."""
    from rga_keras import models
    from rga_keras.export import exporter

    def swallowing_converter(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pass  # swallowed, as C++ code may
        return {}

    monkeypatch.setattr(models, "load_reid_model", lambda path: object())
    monkeypatch.setattr(exporter, "reid_model_info", lambda model: {"input_size": [64, 32]})
    monkeypatch.setattr(exporter, "check_embeddings", lambda model, feature, size: None)
    monkeypatch.setattr(exporter, "_build", swallowing_converter)
    out = tmp_path / "out"
    killed = out / f".export-rga-v7-{_dead_pid()}@{socket.gethostname()}~x1"  # a kill -9'd export's staging
    (killed / "saved_model").mkdir(parents=True)
    assert rga_export(["--model", "m.keras", "--out", str(out), "--formats", "tflite_float32",
                       "--skip-parity-check"]) == 130
    one_line(capsys, "rga-export", "interrupted by SIGINT", "nothing was published")
    assert sorted(p.name for p in out.iterdir()) == []  # no report, no artefact, no staging folder, old or new


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_rga_synth_removes_what_a_killed_run_left(tmp_path, capsys):
    out = tmp_path / "synth"
    left = [tmp_path / f".synth.tmp-{_dead_pid()}@{socket.gethostname()}~ab", tmp_path / ".synth.old-1@elsewhere~c"]
    for folder in left:
        (folder / "query").mkdir(parents=True)
    old = time.time() - 2 * 24 * 3600
    os.utime(left[1], (old, old))
    assert synth.main([str(out), "--ids", "2", "--images-per-id", "4", "--cameras", "2",
                           "--size", "32", "16"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


def test_imagenet_weights_offline_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RGA_KERAS_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    resnet50 = ["-o", "model.stage_blocks=[3, 4, 6, 3]", "-o", "model.stage_widths=[64, 128, 256, 512]"]
    assert rga_train(TINY + resnet50 + ["--run-dir", str(tmp_path / "run"), "-o", "model.backbone_weights=imagenet"]) == 2
    one_line(capsys, "rga-train", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
             "-o model.backbone_weights=null")


def test_a_finished_run_is_never_mixed_with_another(tmp_path, capsys):
    """Re-running into a finished run, or resuming one with another config, is refused before the record
    changes, naming the keys that differ and --fresh."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = training_config.load_config(None, ["training.epochs=3"], base=training_config.demo_config(str(run_dir)))
    record = yaml.safe_dump(config, sort_keys=False)
    (run_dir / "config.yaml").write_text(record)
    (run_dir / "last.keras").write_bytes(b"checkpoint")
    args = ["--demo", "--run-dir", str(run_dir)]
    assert rga_train(args + ["--epochs", "5"]) == 2  # unfinished, another config
    one_line(capsys, "rga-train", "unfinished run of another config", "training.epochs: 3 → 5", "--fresh")
    (run_dir / "summary.json").write_text("{}")
    assert rga_train(args + ["--epochs", "3"]) == 2  # finished, same config
    one_line(capsys, "rga-train", "holds a finished run", "--fresh")
    assert rga_train(args + ["-o", "model.attention=s"]) == 2  # finished, another config
    one_line(capsys, "rga-train", "finished run", "model.attention: 'sc' → 's'")
    assert (run_dir / "config.yaml").read_text() == record and (run_dir / "last.keras").read_bytes() == b"checkpoint"


def test_every_program_module_imports_without_tensorflow():
    """setup.py's entry points load TensorFlow only inside ``main`` (where `starting` turns a Ctrl-C into one line):
    importing each program's module must not import it."""
    import re
    import sys

    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    modules = re.findall(r'"rga-[a-z]+=([\w.]+):main"', setup)
    assert len(modules) == 9, modules
    code = (f"import os, sys; import {', '.join(modules)}; "
            "print('tensorflow' in sys.modules, os.environ.get('TF_CPP_MIN_LOG_LEVEL'))")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, env=env,
                         capture_output=True, text=True, timeout=120)
    # and each sets the native log level (quiet start-up, native_logs.py) unless the user chose one
    assert run.returncode == 0 and run.stdout.strip() == "False 2", (run.stdout, run.stderr[-2000:])


# ---- second round (issue 25): one writer per output, signals, values, errors naming files, run folders ------

def _holder_process(output: Path, inside: bool) -> subprocess.Popen:
    """Another process holding ``output``'s writer lock until killed (rga_keras.locks imports nothing heavy)."""
    code = ("import sys, time; from rga_keras.locks import writer_lock\n"
            f"with writer_lock({str(output)!r}, inside={inside}):\n    print('held', flush=True); time.sleep(600)")
    process = subprocess.Popen([__import__("sys").executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parent.parent)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_is_refused_and_kill_9_leaves_no_stale_lock(tmp_path):
    """The lock names its holder (pid, host); the OS releases it when the holder dies, even by kill -9."""
    from rga_keras.locks import OutputLocked, writer_lock

    out = tmp_path / "features.h5"
    holder = _holder_process(out, inside=False)
    try:
        with pytest.raises(OutputLocked, match=rf"features.h5 is being written by another process \(pid "
                                               rf"{holder.pid} on host {socket.gethostname()}, -c, since "):
            with writer_lock(out, inside=False):
                pass
    finally:
        holder.kill()
        holder.wait()
    with writer_lock(out, inside=False) as lock:  # kill -9 left the file, never the lock
        assert lock.read_text().startswith(f"pid {os.getpid()} on host ")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the lock file goes with its holder


@pytest.fixture
def locked(tmp_path):
    """Hold an output's writer lock from this process (flock locks per open file, so a second taking conflicts)."""
    from rga_keras.locks import writer_lock

    with contextlib.ExitStack() as stack:
        yield lambda output, inside: stack.enter_context(writer_lock(output, inside=inside))


def test_rga_train_refuses_a_run_folder_another_run_writes(tmp_path, monkeypatch, capsys, locked):
    monkeypatch.setenv("RGA_KERAS_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    locked(run_dir, True)
    assert rga_train(TINY + ["--run-dir", str(run_dir)]) == 2
    one_line(capsys, "rga-train", f"{run_dir} is being written by another process (pid {os.getpid()} on host "
                                  f"{socket.gethostname()}", "wait for it to end or stop it, or write elsewhere")
    assert sorted(p.name for p in run_dir.iterdir()) == [".rga-keras.lock"]  # the holder's only


def _stub_export(monkeypatch, model_info=None, build=None):
    """rga-export with no model: loading, its description, its embedding check and the build stubbed."""
    from rga_keras import models
    from rga_keras.export import exporter

    monkeypatch.setattr(models, "load_reid_model", lambda path: object())
    monkeypatch.setattr(exporter, "reid_model_info", model_info or (lambda model: {"input_size": [64, 32]}))
    monkeypatch.setattr(exporter, "check_embeddings", lambda model, feature, size: None)
    if build is not None:
        monkeypatch.setattr(exporter, "_build", build)


def test_rga_export_refuses_a_folder_another_export_writes(tmp_path, monkeypatch, capsys, locked):
    _stub_export(monkeypatch, build=lambda *a: pytest.fail("built while another export held the folder"))
    out = tmp_path / "out"
    locked(out, True)
    assert rga_export(["--model", "m.keras", "--out", str(out), "--formats", "tflite_float32",
                       "--skip-parity-check"]) == 2
    one_line(capsys, "rga-export", f"{out} is being written by another process (pid {os.getpid()}")
    assert sorted(p.name for p in out.iterdir()) == [".rga-keras.lock"]


def test_rga_visualize_refuses_a_folder_another_run_draws_into(tmp_path, capsys, locked):
    out = tmp_path / "pictures"
    locked(out, True)
    assert visualize.main([str(tmp_path / "m.keras"), "--dataset", "synthetic", "--out", str(out)]) == 2
    one_line(capsys, "rga-visualize", f"{out} is being written by another process (pid {os.getpid()}")


def test_signals_at_start_up_and_during_the_work_are_one_line_each(capsys):
    """SIGHUP, SIGQUIT and SIGTERM, while the library imports (`starting`) and during the work (`run_command`):
    one line each and 128 + N; a signal ignored on entry (nohup's SIGHUP) stays ignored."""
    from rga_keras.cli.common import starting

    for signum, status in ((signal.SIGHUP, 129), (signal.SIGQUIT, 131), (signal.SIGTERM, 143)):
        with pytest.raises(SystemExit) as stop:
            with starting("rga-eval"):
                os.kill(os.getpid(), signum)
        assert stop.value.code == status
        one_line(capsys, "rga-eval", f"interrupted by {signal.Signals(signum).name} while starting; nothing was done")
        assert cli.run_command("rga-embed", lambda: os.kill(os.getpid(), signum) or 0,
                               on_interrupt=lambda: "nothing was written") == status
        one_line(capsys, "rga-embed", f"interrupted by {signal.Signals(signum).name}; nothing was written")
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert cli.run_command("rga-eval", lambda: os.kill(os.getpid(), signal.SIGHUP) or 0) == 0
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_sighup_to_a_starting_program_is_one_line_and_129():
    """A real SIGHUP (a closed terminal) to rga-search while it starts: one line and 129, not a silent death (its
    start-up: the cheapest phase of a real program). The start-up is held until the signal comes, so the signal
    lands inside it on any machine (a fixed wait of 0.5 s raced the start-up's own length)."""
    import sys

    held = ("import sys, time; from rga_keras.cli import search\n"
            "def held_parser():\n    print('starting', flush=True)\n    time.sleep(120)\n"
            "search.build_parser = held_parser\n"
            "sys.exit(search.main(['q.jpg', '--gallery', 'g.h5']))")
    process = subprocess.Popen([sys.executable, "-c", held], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=Path(__file__).resolve().parent.parent)
    assert process.stdout.readline().strip() == "starting"
    process.send_signal(signal.SIGHUP)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 129, err
    assert err.strip() == "rga-search: interrupted by SIGHUP while starting; nothing was done"


@pytest.mark.parametrize("phase", ["starting", "work"])
def test_a_signal_inside_a_native_import_is_one_line(phase, capsys):
    """A signal landing while a C extension initialises (TensorFlow's, inside an import) comes back as
    ``ImportError: initialization failed`` raised from the interruption: a CI run's SIGHUP at start-up printed
    that traceback and ended with 1. Both phases answer it as the signal."""
    from rga_keras.interrupts import Interrupted

    def native_import():
        try:
            raise Interrupted(signal.SIGHUP)
        except Interrupted as err:
            raise ImportError("initialization failed") from err

    if phase == "starting":
        with pytest.raises(SystemExit) as ended:
            with cli.starting("rga-search"):
                native_import()
        assert ended.value.code == 129
        one_line(capsys, "rga-search", "interrupted by SIGHUP while starting; nothing was done")
    else:
        assert cli.run_command("rga-search", native_import) == 129
        one_line(capsys, "rga-search", "interrupted by SIGHUP")

    def a_real_import_error():
        raise ImportError("no module named x")  # without an interruption behind it: bad input (a missing package)

    assert cli.run_command("rga-search", a_real_import_error) == 2
    one_line(capsys, "rga-search", "error: no module named x")


def test_a_cleanup_that_fails_after_a_signal_ends_as_the_signal(capsys):
    """Ctrl-C, then a cleanup on the way out raises (a full disk, a file already gone): the signal came first and
    is what the user did, so the run ends as the signal (130), not as the cleanup's error (2)."""
    def interrupted_work():
        try:
            raise KeyboardInterrupt
        finally:
            raise OSError(errno.ENOSPC, "No space left on device", "run/last.keras")  # the cleanup's own error

    assert cli.run_command("rga-train", interrupted_work) == 130
    one_line(capsys, "rga-train", "interrupted by SIGINT")


def test_sigquit_during_an_export_removes_its_staging_folder(monkeypatch, capsys, tmp_path):
    def quit_while_building(formats, job):
        (job.staging / "saved_model").mkdir()
        (job.staging / "saved_model" / "variables.data").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGQUIT)

    _stub_export(monkeypatch, build=quit_while_building)
    out = tmp_path / "out"
    assert rga_export(["--model", "m.keras", "--out", str(out), "--formats", "saved_model",
                       "--skip-parity-check"]) == 131
    one_line(capsys, "rga-export", "interrupted by SIGQUIT; nothing was published", "staging folder was removed")
    assert not out.exists()  # made for this export, left empty: removed with its lock


def test_a_closed_stdout_pipe_ends_quietly_with_141(capsys):
    def write_to_closed_pipe():
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    saved = os.dup(1)
    try:
        assert cli.run_command("rga-search", write_to_closed_pipe) == 141
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert capsys.readouterr().err == ""


def test_rga_train_interrupted_while_reading_data_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    from rga_keras.training import run as training_run

    monkeypatch.setenv("RGA_KERAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(training_run, "load_data", lambda config: os.kill(os.getpid(), signal.SIGTERM))
    assert rga_train(TINY + ["--run-dir", str(tmp_path / "runs" / "demo")]) == 143
    one_line(capsys, "rga-train", "interrupted by SIGTERM")
    assert not (tmp_path / "runs").exists()


def test_a_start_refused_after_the_config_is_recorded_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    from rga_keras.training import run as training_run

    def refuse(*args, **kwargs):
        assert (tmp_path / "run" / "config.yaml").is_file()  # recorded by now
        raise ValueError("model.backbone_weights: not a weights file")

    monkeypatch.setenv("RGA_KERAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(training_run, "compiled_model", refuse)
    assert rga_train(TINY + ["--run-dir", str(tmp_path / "run")]) == 2
    one_line(capsys, "rga-train", "not a weights file")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,message", [
    ("optimizer.base_lr=.inf", "config key 'optimizer.base_lr' must be a finite number, found inf"),
    ("training.diverge_factor=-.inf", "config key 'training.diverge_factor' must be a finite number, found -inf"),
])
def test_non_finite_config_numbers_are_refused_naming_the_key(override, message, capsys, tmp_path):
    assert rga_train(TINY + ["--run-dir", str(tmp_path / "run"), "-o", override]) == 2
    one_line(capsys, "rga-train", message)
    assert not (tmp_path / "run").exists()


def test_a_duplicate_yaml_key_is_refused_naming_it(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("base: " + str(training_config.config_path("market1501_rga_sc")) + "\n"
                      "training:\n  epochs: 3\n  seed: 1\n  epochs: 4\n")
    assert rga_train(["--config", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    one_line(capsys, "rga-train", "mine.yaml: key 'training.epochs' appears twice (lines 3 and 5); keep one")


def test_a_batch_that_cannot_fit_is_refused_before_the_work(tmp_path, monkeypatch, capsys):
    """Said before the work, naming the option (the batch is first cut to the images there are); running out of
    memory during the work names it too."""
    from rga_keras import memory, retrieval
    from tests.test_bad_input_data import stand_in_embedder

    monkeypatch.setattr(retrieval, "load_embedder", lambda path, feature: stand_in_embedder(path))
    crops = tmp_path / "crops"
    from tests.bad_images import write_images
    write_images(crops, ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / "model.keras").write_bytes(b"stand-in")
    argv = [str(tmp_path / "model.keras"), str(crops), "--out", str(tmp_path / "f.h5"), "--batch-size", "100000000"]
    monkeypatch.setattr(memory, "physical_memory", lambda: 16 * 1024)
    assert embed.main(argv) == 2
    one_line(capsys, "rga-embed", "--batch-size: one batch of 3 images of 64x32 needs 72 KiB for its pixels alone, "
                                  "more than this machine's 16 KiB of memory; lower --batch-size")
    monkeypatch.setattr(memory, "physical_memory", lambda: None)
    monkeypatch.setattr(retrieval, "embed_images", lambda *a, **k: np.zeros((2**25, 2**25)))  # 8 PiB
    assert embed.main(argv) == 2
    one_line(capsys, "rga-embed", "out of memory while embedding (Unable to allocate", "lower --batch-size (was 3)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops", "model.keras"]


def test_a_damaged_backup_is_named_with_what_to_do(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "backup").mkdir(parents=True)
    (run_dir / "backup" / "training_metadata.json").write_text('{"epoch": 3,')  # cut short
    assert rga_train(TINY + ["--run-dir", str(run_dir)]) == 2
    one_line(capsys, "rga-train", f"{run_dir / 'backup' / 'training_metadata.json'}: not valid JSON (line 1, column 13",
             "pass --fresh to start over")
    assert sorted(p.name for p in run_dir.rglob("*")) == ["backup", "training_metadata.json"]  # as it was


@pytest.mark.parametrize("linked", [False, True], ids=["weights.h5", "keras"])
def test_a_truncated_backup_of_weights_is_named(tmp_path, linked):
    """Keras' restore reads the backup with h5py (latest.weights.h5) or zipfile (latest.keras, the chief's link to
    last.keras), whose errors name no file ("truncated file: eof = …", "File is not a zip file")."""
    from rga_keras.training.callbacks import AtomicBackupAndRestore, AtomicCheckpoint

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    last = AtomicCheckpoint(str(tmp_path / "last.keras")) if linked else None
    backup = AtomicBackupAndRestore(str(tmp_path / "backup"), copy_of=last)
    for cb in (last, backup) if linked else (backup,):
        cb.set_model(model)
        cb.on_epoch_end(0)
    weights = Path(backup._weights_path)
    assert weights.name == ("latest.keras" if linked else "latest.weights.h5")
    weights.write_bytes(weights.read_bytes()[:1000])
    error = "File is not a zip file" if linked else ".*truncated file: eof = 1000.*"
    with pytest.raises(ValueError, match=rf"^{weights}: cannot be read as the weights of a backup to resume from "
                                         rf"\({error}\).*pass --fresh to start over"):
        backup.on_train_begin()


def test_a_run_folder_that_cannot_be_made_says_so(capsys):
    assert rga_train(TINY + ["--run-dir", "/proc/no-such-process/run"]) == 2
    one_line(capsys, "rga-train", "cannot make the folder /proc/no-such-process to write /proc/no-such-process/run "
                                  "(No such file or directory): choose a folder you can write to")


def test_rga_eval_says_why_no_image_of_a_folder_was_usable(tmp_path, capsys):
    from tests.bad_images import write_images

    root = tmp_path / "market"
    write_images(root / "bounding_box_train", ["0001_c1s1_000001_01.jpg", "0002_c1s1_000001_01.jpg"])
    write_images(root / "query", ["holiday.jpg", "beach.jpg"])
    write_images(root / "bounding_box_test", ["0001_c2s1_000001_01.jpg"])
    assert evaluate.main([str(tmp_path / "m.keras"), "--data-root", str(root)]) == 2
    one_line(capsys, "rga-eval", f"none of the 2 images in {root / 'query'} could be used; the first, beach.jpg: "
                                 "file name does not start with PPPP_cC (person id, camera)")


def test_rga_eval_says_which_split_is_empty(tmp_path, capsys):
    from tests.bad_images import write_images

    data = tmp_path / "data"
    write_images(data / "img", ["a.jpg"])
    (data / "query.csv").write_text("img/a.jpg,1,1\n")
    (data / "gallery.csv").write_text("path,person_id,camera_id\n")
    assert evaluate.main([str(tmp_path / "m.keras"), "--dataset", "csv", "--data-root", str(data)]) == 2
    one_line(capsys, "rga-eval", f"csv: the gallery split is empty ({data / 'gallery.csv'} gives no usable image); "
                                 "rga-eval needs query and gallery images")


def test_rga_eval_counts_the_images_it_evaluated():
    from types import SimpleNamespace

    results = {"after_bn": {"num_query_images": 3, "num_gallery_images": 9}}
    data = SimpleNamespace(query=[0] * 4, gallery=[0] * 10)
    assert evaluate.images_line(results, data) == "3 query and 9 gallery images (2 unreadable images left out)"


def test_a_signal_landing_in_a_gc_callback_is_answered_in_one_line(capsys):
    """Python cannot raise an exception inside a garbage collector callback (JAX registers one): the probe's
    SIGTERM to rga-embed printed "Exception ignored in … Traceback …" before its line. It is delivered again, in
    the program's own code: one line, 143."""
    import gc

    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # the handler runs here, inside the callback

    def work():
        gc.callbacks.append(callback)
        try:
            gc.collect()
            for _ in range(500):  # interrupted here, a moment later
                time.sleep(0.01)
        finally:
            gc.callbacks.remove(callback)
        return 0

    assert cli.run_command("rga-embed", work, on_interrupt=lambda: "nothing was written") == 143
    assert fired
    one_line(capsys, "rga-embed", "interrupted by SIGTERM; nothing was written")


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM])
def test_rga_serve_stops_on_every_signal_in_one_line(signum, capsys):
    """uvicorn shuts down on SIGINT and SIGTERM and raises them again; SIGHUP and SIGQUIT, which it leaves
    alone, raised inside its event loop and logged a traceback: now they stop it the same way."""
    import threading

    import uvicorn

    from rga_keras.cli.serve import serve_until_signalled

    async def app(scope, receive, send):  # never called: nothing connects
        raise AssertionError(scope)

    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off"))  # no handlers bound to capsys
    listener = socket.create_server(("127.0.0.1", 0))

    def send_when_serving():
        for _ in range(3000):
            if server.started:
                os.kill(os.getpid(), signum)
                break
            time.sleep(0.01)
        time.sleep(60)
        server.should_exit = True  # the signal did not stop it: end the test with a failure, not a hang

    def work():
        threading.Thread(target=send_when_serving, daemon=True).start()
        with listener:
            serve_until_signalled(server, listener)
        return 0

    assert cli.run_command("rga-serve", work) == 128 + signum
    one_line(capsys, "rga-serve", f"interrupted by {signal.Signals(signum).name}")


def test_an_empty_config_file_is_refused_naming_it(tmp_path, capsys):
    """An empty YAML file ran the defaults unasked and failed on a sampler setting the user never wrote."""
    config = tmp_path / "mine.yaml"
    config.write_text("# to do\n")
    assert rga_train(["--config", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    one_line(capsys, "rga-train", f"{config}: the config is empty; give the keys to set, or `base: RECIPE`")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]
