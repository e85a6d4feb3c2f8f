"""The package's shape: imports point one way between stages, and the light sides never import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PHOTOS, ROOT

PACKAGE = ROOT / "vitok"


def _imports(path: Path) -> set[str]:
    """Absolute names of the vitok modules a file imports (relative imports resolved)."""
    module = path.relative_to(ROOT).with_suffix("").parts
    package = module[:-1] if module[-1] != "__init__" else module[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found |= {name} | {f"{name}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("vitok")}


# The stages in flow order (docs/architecture.md draws it): a stage imports only the stages before it. The
# exceptions are named: the store's layout is a leaf of names that the input walk reads (never to enter a store), the
# key rules a leaf the input readers ask (which keys a store can hold), and the store's plan reads what the inputs are
# (listings, archive descriptions), never how they are decoded.
STAGES = ("inputs", "encoder", "storage", "pipeline", "run", "consumers", "cli")
ALLOWED = {
    "inputs": ("vitok.storage.layout", "vitok.storage.keys"),
    "storage": ("vitok.inputs.sources", "vitok.inputs.archives"),
}
LEAVES = ("vitok/version.py", "vitok/errors.py", "vitok/processes.py", "vitok/storage/layout.py",
          "vitok/storage/keys.py")


def _stage_rules():
    for i, stage in enumerate(STAGES):
        later = tuple(f"vitok.{s}" for s in STAGES[i + 1:])
        if stage != "cli":  # the CLI has a bench command; integrations adapt the whole library to other tools
            later += ("vitok.integrations", "vitok.bench")
        if stage == "storage":  # the store's readers and writers never need the encoder or how inputs decode
            later += ("vitok.encoder", "vitok.inputs")
        if stage == "inputs":
            later += ("vitok.encoder", "vitok.storage")
        yield stage, later


@pytest.mark.parametrize("stage, forbidden", list(_stage_rules()))
def test_imports_point_one_way(stage, forbidden):
    allowed = ALLOWED.get(stage, ())
    wrong = [f"{path.relative_to(ROOT)} imports {name}"
             for path in sorted((PACKAGE / stage).rglob("*.py")) for name in sorted(_imports(path))
             if name.startswith(forbidden) and not name.startswith(allowed)]
    assert not wrong, wrong


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_nothing_of_vitok(leaf):
    assert not _imports(ROOT / leaf), _imports(ROOT / leaf)


def test_the_library_never_imports_the_cli_framework():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "cli") or path.is_relative_to(PACKAGE / "bench"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            wrong += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("typer", "rich", "click")]
    assert not wrong, wrong


def _python(code: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, cwd=cwd)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("layout") / "out"
    import vitok

    vitok.extract([str(PHOTOS)], out, model="qwen3-vl-tiny", workers=0, pool="mean")
    return out


READ_WITHOUT_TORCH = """
import sys, time
start = time.perf_counter()
import vitok
store = vitok.open(sys.argv[1])
key = store.keys()[0]
store[key]
elapsed = time.perf_counter() - start
assert 'torch' not in sys.modules, 'torch imported'
print(elapsed)
"""


def test_reading_a_store_imports_no_torch(small_store):
    result = subprocess.run([sys.executable, "-c", READ_WITHOUT_TORCH, str(small_store)], capture_output=True,
                            text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 2.0  # cold start; about 0.2 s on the 2-core CI machines


CLI_WITHOUT_TORCH = """
import sys
from vitok.cli.app import main
sys.argv = ['vitok', *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
print('CODE', code, 'TORCH', 'torch' in sys.modules)
"""


@pytest.mark.parametrize("command", [["info"], ["verify"], ["export", "{dest}", "--pool", "mean"]])
def test_store_commands_import_no_torch(small_store, tmp_path, command):
    argv = [part.format(dest=tmp_path / "index") for part in command]
    argv.insert(1, str(small_store))
    result = subprocess.run([sys.executable, "-c", CLI_WITHOUT_TORCH, *argv], capture_output=True, text=True,
                            timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert "CODE 0 TORCH False" in result.stdout, result.stdout + result.stderr


def test_usage_errors_come_before_torch(tmp_path):
    result = subprocess.run([sys.executable, "-c", CLI_WITHOUT_TORCH, "extract", "--model", "qwen3-vl-tiny", "-o",
                             str(tmp_path / "new")], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert "CODE 2 TORCH False" in result.stdout, result.stdout + result.stderr
    assert "give at least one source" in result.stderr
