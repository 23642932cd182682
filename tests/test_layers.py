"""The shape of the house (decision 0043): every top-level package is one concept, imports
run one way, and there is no import circle anywhere, between packages or between the
modules of one package. This test reads the source with `ast` (no import is executed),
so it holds for lazy imports inside functions too; only `if TYPE_CHECKING:` blocks are
skipped (they never run)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Each package and what it may import of ours. Lower layers first; a package may import
# only packages listed for it (never itself upward). `protocol` is the Island wire format,
# shared by the coordinator's Island link and the reference agent, and imports nothing.
ALLOWED: dict[str, set[str]] = {
    "store": set(),
    "routing": set(),
    "protocol": set(),
    "ledger": {"store"},
    "scheduler": {"store", "ledger", "routing", "protocol"},
    "projections": {"store", "ledger", "scheduler"},
    "config": {"store", "ledger", "routing", "scheduler"},
    "streams": {"store", "ledger", "scheduler"},
    "islandlink": {"store", "ledger", "routing", "scheduler", "protocol", "streams", "config"},
    "api": {"store", "ledger", "routing", "scheduler", "protocol", "projections", "streams", "config"},
    "admin": {"store", "ledger", "routing", "scheduler", "projections", "streams", "config", "api"},
    "web": {"store", "ledger", "routing", "scheduler", "projections", "streams", "config", "api"},
    "simulations": {"store", "ledger", "routing", "scheduler", "projections"},
    "island": {"protocol"},
    "coordinator": {"store", "ledger", "routing", "scheduler", "protocol", "projections", "config", "streams",
                    "islandlink", "api", "admin", "simulations", "island", "web"},
}
PACKAGES = set(ALLOWED)


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: pathlib.Path, tree: ast.AST | None = None) -> list[tuple[str, int]]:
    """(imported module, line) for every import of one of our packages in the file."""
    tree = tree or ast.parse(path.read_text(), filename=str(path))
    mod = module_name(path)
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                base = base if is_pkg else base[:-1]
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # `from pkg import module` imports pkg.module
            for alias in node.names:
                found.append((f"{target}.{alias.name}", node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [(m, line) for m, line in found if m.split(".")[0] in PACKAGES]


def source_files() -> list[pathlib.Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def module_graph(files: list[pathlib.Path]) -> dict[str, set[str]]:
    """Module -> modules of ours it imports (only modules that exist as files)."""
    known = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        mod = module_name(path)
        graph[mod] = {m for m, _ in imports_of(path) if m in known and m != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    white, grey, black = 0, 1, 2
    color = {m: white for m in graph}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        color[m] = grey
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if color.get(n, black) == grey:
                return stack[stack.index(n):] + [n]
            if color.get(n) == white:
                found = dfs(n)
                if found:
                    return found
        stack.pop()
        color[m] = black
        return None

    for m in sorted(graph):
        if color[m] == white:
            found = dfs(m)
            if found:
                return found
    return None


def layer_violations(files: list[pathlib.Path]) -> list[str]:
    out = []
    for path in files:
        pkg = module_name(path).split(".")[0]
        for target, line in imports_of(path):
            tpkg = target.split(".")[0]
            if tpkg != pkg and tpkg not in ALLOWED[pkg]:
                out.append(f"{path.relative_to(ROOT)}:{line}: {pkg} may not import {target}")
    return sorted(set(out))


def test_every_package_is_listed():
    """A new top-level package must be given its place in the layer order."""
    ours = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench", "docs", "scripts"}
    assert ours <= PACKAGES, f"packages without a layer: {sorted(ours - PACKAGES)}"


def test_no_import_against_the_layer_order():
    assert layer_violations(source_files()) == []


def test_no_import_circle():
    cycle = find_cycle(module_graph(source_files()))
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_package_graph_is_acyclic():
    """The allowed edges themselves form no circle, so the order is a real layering."""
    graph = {p: set(deps) for p, deps in ALLOWED.items()}
    assert find_cycle(graph) is None


@pytest.mark.parametrize("case", ["circle", "upward"])
def test_the_checks_catch_a_planted_fault(tmp_path, case, monkeypatch):
    """The checks themselves can fail: plant a circle (two modules importing each other)
    and an upward import (scheduler importing api) in a copy and see them reported."""
    a = ROOT / "scheduler" / "jobs.py"
    b = ROOT / "scheduler" / "islands.py"
    files = source_files()
    src = {a: a.read_text(), b: b.read_text()}
    if case == "circle":
        planted = {a: src[a] + "\nfrom scheduler import islands as _planted\n",
                   b: src[b] + "\nfrom scheduler.jobs import Job as _planted\n"}
    else:
        planted = {a: src[a] + "\nfrom api.errors import ApiError as _planted\n", b: src[b]}

    real_parse = ast.parse

    def parse(text, filename="<unknown>", *args, **kwargs):  # noqa: ANN001 - ast.parse's signature
        path = pathlib.Path(filename)
        return real_parse(planted.get(path, text), filename, *args, **kwargs)

    monkeypatch.setattr(ast, "parse", parse)
    if case == "circle":
        assert find_cycle(module_graph(files)) is not None
    else:
        assert any("scheduler may not import api.errors" in v for v in layer_violations(files))
