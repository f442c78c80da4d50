"""One floor per layer: every import of ours points down (README, "Architecture").

core/ (the ground floor) imports nothing of ours; rewards/ imports core; pools/ imports core and
rewards; stages/ imports those; pipeline/ (the command line and the driver) imports everything.
Function-local imports count too: a cycle dodged by importing inside a function is still a cycle.
"""

import ast

from tests.conftest import REPO_ROOT

FLOORS = {"core": 0, "rewards": 1, "pools": 2, "stages": 3, "pipeline": 4}


def imported_packages(path) -> set[tuple[str, int]]:
    """(top-level package of ours, line) for every import in the file, wherever it is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update((name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in FLOORS)
    return found


def test_every_import_of_ours_points_down_or_sideways_within_a_floor():
    upward = []
    for floor, rank in FLOORS.items():
        for path in sorted((REPO_ROOT / floor).rglob("*.py")):
            for package, line in imported_packages(path):
                if FLOORS[package] > rank:
                    upward.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {package}")
    assert not upward, "imports that point up a floor:\n" + "\n".join(sorted(upward))


def test_the_ground_floor_is_whole():
    modules = {path.stem for path in (REPO_ROOT / "core").glob("*.py")}
    assert {"config", "layout", "schema", "errors", "seeds", "stats", "objectives"} <= modules
