"""The package's shape: no import cycles between its modules (imports inside functions included) and
no function longer than a screen. Read from the source with ast, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "refframe"
MAX_FUNCTION_LINES = 80
EXTENSIONS = {"refframe._C"}  # compiled modules: leaves of the graph
ENTRY_POINTS = {"refframe.__main__"}  # `python -m refframe`: above everything


def module_name(path: Path) -> str:
    parts = ["refframe", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST, here: str, is_package: bool, known: set[str]) -> list[str]:
    """The refframe modules an import statement loads (`from . import x` loads refframe.x when x is
    a module, else the package itself)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = here.split(".") if is_package else here.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("refframe"):
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in known else target)
    return [m for m in out if m in known]


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods) | EXTENSIONS
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):  # every import, at module level or inside a function
            edges.update(imported(node, name, path.name == "__init__.py", known))
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_import_graph_is_read():
    graph = import_graph()
    assert len(graph) >= 20
    # a few edges every version of the layout has: the walk must see imports inside functions too
    assert "refframe.cli.build" in graph["refframe.cli.command"]  # imported inside _command
    assert "refframe.ops" in graph["refframe.build"]
    assert "refframe.tensorfile" in graph["refframe.frame"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_lower_layers_do_not_import_the_cli_or_benchmarks():
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith(("refframe.cli", "refframe.bench")) or name in ENTRY_POINTS:
            continue
        above = sorted(e for e in edges if e.startswith(("refframe.cli", "refframe.bench")))
        assert not above, f"{name} imports {above}"
    for name, edges in graph.items():
        if name.startswith("refframe.bench"):
            assert not any(e.startswith("refframe.cli") for e in edges), f"{name} imports the CLI"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_fit_on_a_screen(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    long = [
        f"{node.name} (line {node.lineno}: {node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
