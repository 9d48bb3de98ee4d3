"""docs/ARCHITECTURE.md's picture matches the imports: each module imports only from layers below it."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ring_attention"
DOC = PACKAGE.parent / "docs" / "ARCHITECTURE.md"


def _layers() -> list[set[str]]:
    """The doc's layers, lowest first: the lines of its ``layers`` block, one layer per line."""
    block = re.search(r"```layers\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/ARCHITECTURE.md has no ```layers block"
    return [set(line.split(":", 1)[1].split()) for line in block.group(1).splitlines() if line.strip()]


def _imports(module: str) -> set[str]:
    """The package modules ``module`` imports (``from . import x``, ``from .x import y``)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ring_attention"):
            parts = node.module.split(".")
            found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def test_every_module_is_in_one_layer_of_the_doc():
    layers = _layers()
    placed = [m for layer in layers for m in layer]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    assert set(placed) == {p.stem for p in PACKAGE.glob("*.py")}


def test_every_module_has_its_test_module():
    """Tests mirror the package: ``ring_attention/x.py`` is tested in ``tests/test_x.py``."""
    tests = PACKAGE.parent / "tests"
    missing = [p.name for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__" and not (tests / f"test_{p.stem}.py").exists()]
    assert not missing, f"no tests/test_<module>.py for: {', '.join(missing)}"


def test_no_module_imports_its_layer_or_one_above():
    layer_of = {m: i for i, layer in enumerate(_layers()) for m in layer}
    upward = [
        f"{m} (layer {layer_of[m]}) imports {d} (layer {layer_of[d]})"
        for m in layer_of for d in sorted(_imports(m)) if layer_of[d] >= layer_of[m]
    ]
    assert not upward, "\n".join(upward)


def _imported_names(path: pathlib.Path) -> set[str]:
    """Every absolute module name ``path`` imports, and ``.x`` for its relative imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.update([base] if node.module else [base + a.name for a in node.names])
    return names


def test_the_core_never_imports_an_integration():
    """Integrations are optional extras: no core module names one or its library, and
    importing the package loads neither (the extras may be absent)."""
    offending = {
        p.name: sorted(n for n in _imported_names(p)
                       if n.split(".")[0] == "transformers" or "integrations" in n.split("."))
        for p in PACKAGE.glob("*.py")
    }
    assert not {k: v for k, v in offending.items() if v}
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, ring_attention; print(sorted(m for m in sys.modules "
         "if m.split('.')[0] == 'transformers' or m.startswith('ring_attention.integrations')))"],
        capture_output=True, text=True, check=True, cwd=PACKAGE.parent,
    ).stdout.strip()
    assert loaded == "[]"
