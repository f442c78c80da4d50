"""bench/'s modules import each other one way: no cycle, however the import is written.

bench/common.py and bench/experiment_store.py hold what several scripts share, so that a
script never imports another that imports it back. Function-local imports count too
(a cycle dodged by importing inside a function is still a cycle), as in tests/test_layers.py.
"""

import ast

from tests.conftest import REPO_ROOT

BENCH = REPO_ROOT / "bench"


def bench_imports() -> dict[str, set[str]]:
    """{module: the bench modules it imports anywhere in its file}."""
    modules = {path.stem for path in BENCH.glob("*.py")}
    graph = {}
    for path in sorted(BENCH.glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.ImportFrom):  # relative: `from . import x`, `from .x import y`
                names = [f"bench.{node.module}" if node.module else f"bench.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found |= {name.split(".")[1] for name in names
                      if name.startswith("bench.") and name.split(".")[1] in modules}
        graph[path.stem] = found - {path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk, each as the path that closes it."""
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph.get(module, ())):
            if state.get(other) == "open":
                found.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, [*path, other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_bench_modules_import_each_other_without_a_cycle():
    graph = bench_imports()
    assert {"experiment", "experiment_summary", "common"} <= set(graph)
    assert cycles(graph) == [], "bench/ import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles(graph))


def test_the_shared_modules_are_at_the_bottom():
    graph = bench_imports()
    assert graph["common"] == set()
    assert graph["experiment_store"] <= {"common"}


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
