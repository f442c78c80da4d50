"""docs/faults.md's table names tests that exist: a row whose test was renamed or removed is caught."""

import fnmatch
import re

from tests.conftest import REPO_ROOT

REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?(?:::([\w*\[\]-]+))?`")


def referenced_tests() -> list[tuple[str, str | None]]:
    """(file, test name or pattern) for every test a row names; `::name` alone is in the file named before it."""
    found = []
    for line in (REPO_ROOT / "docs" / "faults.md").read_text().splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        test_cell = line.rstrip().rstrip("|").rsplit("|", 1)[-1]
        current = None
        for file, name in REFERENCE.findall(test_cell):
            current = file or current
            if current:
                found.append((current, name or None))
    return found


def test_every_test_the_faults_table_names_exists():
    references = referenced_tests()
    assert len(references) > 40
    missing = []
    for file, name in references:
        path = REPO_ROOT / file
        if not path.is_file():
            missing.append(file)
            continue
        if name:
            defined = re.findall(r"^def (test_\w+)", path.read_text(), flags=re.MULTILINE)
            if not fnmatch.filter(defined, name.split("[")[0]):
                missing.append(f"{file}::{name}")
    assert not missing, f"docs/faults.md names tests that do not exist: {missing}"


def test_every_row_names_a_test():
    rows = [line for line in (REPO_ROOT / "docs" / "faults.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| bad input or fault")]
    untested = [row[:80] for row in rows if "tests/" not in row.rstrip().rstrip("|").rsplit("|", 1)[-1]]
    assert not untested, f"rows without a test: {untested}"
