"""The package layering: the engine imports no engine library, no backend and not the
application layer; nothing in ``ssd_core`` imports in a circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "ssd_core"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ssd_core module ``path`` imports (relative imports resolved), at any depth
    in the file: a function-level import counts the same as a top-level one."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            # ``from . import x`` / ``from .pkg import mod`` may name submodules.
            for a in node.names:
                out.add(f"{mod}.{a.name}")
    return {m for m in out if m == "ssd_core" or m.startswith("ssd_core.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in CORE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def test_ssd_core_imports_no_engine_backend_or_app():
    code = (
        "import sys, ssd_core\n"
        "bad = [m for m in ('torch', 'llama_cpp', 'onnxruntime', 'transformers', 'backends',"
        " 'conformance', 'ssd_core.app') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_app_layer_loads_no_engine_library_either():
    code = (
        "import sys, ssd_core.app, ssd_core.app.cli, ssd_core.app.bench\n"
        "bad = [m for m in ('torch', 'llama_cpp', 'onnxruntime', 'transformers') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_engine_never_imports_the_app_layer():
    graph = _graph()
    offenders = {
        mod: sorted(m for m in deps if m.startswith("ssd_core.app"))
        for mod, deps in graph.items()
        if not mod.startswith("ssd_core.app")
    }
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_app_layer_uses_only_public_engine_names():
    graph = _graph()
    private = {
        mod: sorted(d for d in deps if d.startswith("ssd_core._"))
        for mod, deps in graph.items()
        if mod.startswith("ssd_core.app")
    }
    assert {m: d for m, d in private.items() if d} == {}


def test_no_import_cycle_in_ssd_core():
    graph = _graph()
    # A module that imports its own package (``from . import x``, ``import ssd_core``)
    # has an edge to the package's __init__, so re-export loops count as cycles too.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if state.get(dep) is None:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node)


def test_nothing_outside_the_engine_reaches_into_its_private_modules():
    """conformance/, backends/, tests/, scripts/ and examples/ use ssd_core's public
    names and ssd_core.testing only: a private refactor never breaks them."""
    offenders = []
    for folder in ("conformance", "backends", "tests", "scripts", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text("utf-8"))):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                bad = [n for n in names if n.startswith("ssd_core._")]
                if bad:
                    offenders.append(f"{path.relative_to(ROOT)}: {bad[0]}")
    assert offenders == []
