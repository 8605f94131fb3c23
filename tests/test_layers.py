"""The package's layers, checked from the code's own imports (docs/architecture.md).

    cli  >  daemon  >  analyzer  >  edges  >  core

Each layer imports only the layers below it (and itself). The core imports no library
that talks to the outside world, so every decision in it is tested with plain values.
Imports are read from the source (ast), at any depth: a lazy import inside a function
counts, an import only for type annotations (`if TYPE_CHECKING:`) does not.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "supervisor"
LAYERS = ("core", "edges", "analyzer", "daemon", "cli")
# Libraries that talk to the outside world (or drag it in): never imported by the core.
# (The config checks `step_up_at` with APScheduler's cron parser: that parses text only.)
IO_LIBRARIES = frozenset(
    {
        "docker",
        "pynvml",
        "requests",
        "urllib3",
        "gguf",
        "numpy",
        "jinja2",
        "fcntl",
        "socket",
        "subprocess",
        "threading",
        "prometheus_client",
        "loguru",
        "rich",
        "click",
    }
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports at run time (absolute names)."""
    tree = ast.parse(path.read_text(), str(path))
    package = (
        _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    )
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            if module == "supervisor" or module.startswith("supervisor."):
                found.update(f"{module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {_module_name(p): imports_of(p) for p in SOURCES}
MODULES = set(GRAPH)


def test_every_module_sits_in_a_layer() -> None:
    loose = sorted(m for m in MODULES if m != "supervisor" and _layer(m) is None)
    assert loose == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_runs_up(module: str) -> None:
    layer = _layer(module)
    if layer is None:
        return
    rank = LAYERS.index(layer)
    upward = sorted(
        target
        for target in GRAPH[module]
        if target in MODULES
        and (other := _layer(target)) is not None
        and LAYERS.index(other) > rank
    )
    assert upward == [], f"{module} ({layer}) imports from a higher layer"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "core"))
def test_the_core_imports_no_io_library(module: str) -> None:
    libraries = {name.split(".")[0] for name in GRAPH[module]}
    assert sorted(libraries & IO_LIBRARIES) == []


def test_no_import_cycles() -> None:
    edges = {m: {t for t in GRAPH[m] if t in MODULES and t != m} for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            # a package and the modules its __init__ re-exports are not a cycle of concern
            if len(component) > 1 and not any(c == "supervisor" for c in component):
                cycles.append(sorted(component))

    for module in sorted(MODULES):
        if module not in index:
            strongconnect(module)
    assert cycles == []


def test_importing_the_core_loads_no_io_library() -> None:
    # What the core's imports drag in, too (pydantic's own use of socket is not the core's).
    core = sorted(m for m in MODULES if _layer(m) == "core")
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in core)
        + "print(' '.join(sorted(n for n in sys.modules if n.split('.')[0] in set(sys.argv[1:]))))"
    )
    watched = sorted(IO_LIBRARIES - {"socket", "threading", "subprocess", "fcntl"})
    done = subprocess.run(
        [sys.executable, "-c", code, *watched], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == []


def test_the_daemon_does_not_load_the_analyzers_heavy_libraries() -> None:
    # numpy and gguf price a rung from a model file; jinja2 renders compose files.
    code = (
        "import sys, supervisor.daemon\n"
        "print(' '.join(m for m in ('numpy', 'gguf', 'jinja2', 'rich') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == []
