"""The layout's promises, computed from the source (ast), imports inside functions included:
no import cycle between vopd's modules, and the core imports neither the tools nor the tiny world."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "vopd"
#: Sub-packages that are not the core (README, "Layout"); the loss math and the teachers may be imported by it.
OUTSIDE_CORE = ("vopd.tools", "vopd.world")


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str], root: Path = SRC) -> set[str]:
    """Every vopd module ``path`` imports, at any depth of the file (functions included; ``TYPE_CHECKING`` blocks
    too: a cycle through type names is still a cycle a reader has to untangle)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from vopd.x import y` imports vopd.x.y when y is a module, else vopd.x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != "vopd":
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, modules) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path a -> ... -> a, or None (depth-first search with colours)."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if node not in colour and (cycle := visit(node)):
            return cycle
    return None


def is_core(name: str) -> bool:
    return not name.startswith(OUTSIDE_CORE) and name != "vopd.cli"  # the CLI dispatches to every command


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_core_imports_neither_tools_nor_world():
    bad = sorted((a, b) for a, targets in import_graph().items() if is_core(a)
                 for b in targets if b.startswith(OUTSIDE_CORE))
    assert not bad, f"core modules import tools/world: {bad}"


def test_the_cli_names_commands_by_module_path_only():
    """The dispatcher imports command modules by their dotted names at run time: each must exist."""
    from vopd.cli import COMMANDS

    files = {module_name(p) for p in PACKAGE.rglob("*.py")}
    missing = [module for module, _help in COMMANDS.values() if module not in files]
    assert not missing, missing


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"a2"}, "a2": set(), "b": {"a"}}, None),
])
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_imports_inside_functions_count(tmp_path):
    pkg = tmp_path / "vopd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from vopd.b import g\n    return g\n")
    (pkg / "b.py").write_text("from vopd import a\n")
    modules = {"vopd", "vopd.a", "vopd.b"}
    assert imports_of(pkg / "a.py", modules, tmp_path) == {"vopd.b"}
    assert imports_of(pkg / "b.py", modules, tmp_path) == {"vopd.a"}
    assert find_cycle({m: imports_of(pkg / f"{m[5:]}.py", modules, tmp_path) for m in ("vopd.a", "vopd.b")})
