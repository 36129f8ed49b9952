"""The house: no import circles in the package (imports inside functions count), the library never imports a
program, and an installed wheel holds only ``rga_keras`` with every program and bundled recipe working from
another directory."""
import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rga_keras"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imported(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file: ``from a.b import c`` names the module
    a.b.c where that is one, else a.b; relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # "import rga_keras.data.pipeline as p" names the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


GRAPH = {name: _imported(name, path) for name, path in MODULES.items()}


def test_the_circle_finder_finds_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_the_package():
    assert _circles(GRAPH) == []


def test_the_library_never_imports_a_program():
    library = {name for name in GRAPH if not name.startswith("rga_keras.cli")}
    offenders = {name: sorted(t for t in GRAPH[name] if t.startswith("rga_keras.cli")) for name in library}
    assert {k: v for k, v in offenders.items() if v} == {}
    for path in ROOT.joinpath("rga_keras").rglob("*.py"):  # nor a top-level train/export module of the repository
        tree = ast.parse(path.read_text())
        tops = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
        tops |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        assert not tops & {"train", "export"}, path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the source tree (an in-place build would leave build/ in the checkout, and an
    old build/ there would slip stale modules into the wheel)."""
    source, out = tmp_path_factory.mktemp("source") / "rga-keras", tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("rga_keras-*.whl")
    return path


def test_the_wheel_installs_only_rga_keras_with_its_recipes(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"rga_keras"}
    recipes = {Path(n).stem for n in names if n.startswith("rga_keras/training/configs/") and n.endswith(".yaml")}
    assert recipes == {p.stem for p in (ROOT / "train" / "configs").glob("*.yaml")} and "market1501_rga_sc" in recipes
    programs = dict(line.split(" = ") for line in entry_points.splitlines() if " = " in line)
    assert set(programs) == {"rga-train", "rga-eval", "rga-export", "rga-synth", "rga-visualize", "rga-embed",
                             "rga-search", "rga-gallery", "rga-serve"}
    assert "rga_keras/retrieval/page.html" in names  # rga-serve's page
    assert all(target.startswith("rga_keras.cli.") for target in programs.values())


def test_installed_programs_and_recipes_work_from_another_directory(wheel, tmp_path):
    """The wheel installed (no dependencies: they are this environment's) into a folder of its own, run from
    elsewhere: every program's script and module are there, and rga-train finds its bundled recipes."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "RGA_KERAS_CACHE": str(tmp_path / "cache")}

    def run(*args):
        done = subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        return done.stdout

    programs = ("train", "evaluate", "export", "synth", "visualize", "embed", "search", "gallery", "serve")
    assert all((target / "bin" / f"rga-{p if p != 'evaluate' else 'eval'}").is_file() for p in programs)
    assert "usage: rga-synth" in run(str(target / "bin" / "rga-synth"), "--help")
    code = (f"import rga_keras, rga_keras.cli.{', rga_keras.cli.'.join(programs)}; print(rga_keras.__file__); "
            "from rga_keras.cli.train import main; main(['--list-configs']); "
            "from rga_keras.training.config import config_path, load_config; "
            "print(load_config(config_path('market1501_rga_sc'))['model']['attention'])")
    where, *listed, attention = run("-c", code).splitlines()
    assert Path(where).is_relative_to(target) and attention == "sc"
    assert {line.split()[0] for line in listed} == {p.stem for p in (ROOT / "train" / "configs").glob("*.yaml")}


def test_the_thin_scripts_run_the_programs_from_a_checkout(tmp_path):
    """train/train.py and export/export.py are the programs themselves, found from any working directory."""
    for script, program in (("train/train.py", "rga-train"), ("export/export.py", "rga-export")):
        text = (ROOT / script).read_text()
        assert f"from rga_keras.cli.{Path(script).stem} import main" in text
    run = subprocess.run([sys.executable, str(ROOT / "train" / "train.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage: rga-train"), run.stderr[-2000:]
