"""svdfuse's modules import one way: no import cycle, lazy imports (inside functions) included.

Read from the source with `ast`, so an import that runs only on some path counts as much as one at
the top. An edge goes to the module named (`from svdfuse import methods` -> `svdfuse.methods`,
`from svdfuse import __version__` -> `svdfuse`); the package `__init__` that Python runs before a
submodule is loading order, not a dependency, and is not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "svdfuse"

# Imports that close a cycle today, (importer, imported), each to be removed and then deleted
# from this list; none is left.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports anywhere in its source."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                # `import svdfuse._C` names a compiled module, no source: no edge
                targets = [alias.name for alias in node.names if alias.name in modules]
            elif isinstance(node, ast.ImportFrom):
                origin = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    origin = ".".join(up + ([origin] if origin else []))
                targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> str:
    """The shortest import path from the component's first module back to it, 'a -> b -> a'."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}  # module -> the module it was first reached from
    frontier = [start]
    while start not in previous:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    path = [start]
    while path[-1] != start or len(path) == 1:
        path.append(previous[path[-1]])
    return " -> ".join(reversed(path))


def test_the_package_has_no_import_cycle_but_the_known_ones():
    graph = import_graph(PACKAGE)
    for importer, imported in KNOWN_CYCLE_EDGES:
        graph[importer].discard(imported)
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(a_cycle(graph, c) for c in found)


def test_every_known_cycle_edge_is_still_there():
    # a removed edge leaves the list, so that it cannot hide a cycle that comes back
    graph = import_graph(PACKAGE)
    gone = sorted(edge for edge in KNOWN_CYCLE_EDGES if edge[1] not in graph[edge[0]])
    assert not gone, f"no longer imported, delete from KNOWN_CYCLE_EDGES: {gone}"


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    """Whether importing `start` can lead, through any chain of imports, to `goal`."""
    seen, todo = {start}, [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            if w == goal:
                return True
            seen.add(w)
            todo.append(w)
    return False


@pytest.mark.parametrize("data, consumer", [("svdfuse.mergekit_config", "svdfuse.config"), ("svdfuse.study", "svdfuse.cli")])
def test_a_schema_or_a_library_never_imports_its_consumer(data, consumer):
    graph = import_graph(PACKAGE)  # with every import, the known cycles' too
    assert reaches(graph, consumer, data) and not reaches(graph, data, consumer)


def test_the_graph_sees_lazy_relative_and_from_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg import a\n__version__ = '1'\n")
    (package / "a.py").write_text("from .b import f\n")
    (package / "b.py").write_text("def f():\n    import pkg.sub.c\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("def g():\n    from ..a import f\n    from pkg import __version__\n")
    graph = import_graph(package)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"}, "pkg.sub": set(), "pkg.sub.c": {"pkg.a", "pkg"}}
    assert cycles(graph) == [["pkg", "pkg.a", "pkg.b", "pkg.sub.c"]]
    assert a_cycle(graph, cycles(graph)[0]) == "pkg -> pkg.a -> pkg.b -> pkg.sub.c -> pkg"
    assert reaches(graph, "pkg.b", "pkg") and not reaches(graph, "pkg.sub", "pkg")
