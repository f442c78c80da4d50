"""`report` and `export` on a run whose filesystem is mounted read-only: one line naming the path."""

import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_export import write_lists
from tests.test_report import write_round


@pytest.fixture
def read_only_run(tmp_path) -> Path:
    """A finished-looking run, seen through a read-only bind mount (EROFS even for root)."""
    run = tmp_path / "source" / "myrun"
    write_round(run, 0, {"reward_mean": 0.25, "win_rate": 0.5, "pass_rate": 0.125, "response_tokens_mean": 20.0})
    round_dir = write_round(run, 1, {"reward_mean": 0.5, "win_rate": 0.6, "pass_rate": 0.25,
                                     "response_tokens_mean": 18.5}, losses=[2.0, 1.5], lists=2)
    write_lists(round_dir)
    view = tmp_path / "view"
    view.mkdir()
    steps = [["mount", "--bind", str(run), str(view)], ["mount", "-o", "remount,bind,ro", str(view)]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", str(view)], capture_output=True)
            pytest.skip(f"this machine does not let the tests mount a read-only view: {done.stderr.strip()}")
    try:
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)


def one_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def test_report_into_a_read_only_run_is_one_line(read_only_run):
    line = one_line(run_cli("report", str(read_only_run), timeout=300))
    assert f"cannot write the report into {read_only_run}: Read-only file system" in line


@pytest.mark.parametrize("form", ["trl", "hf"])
def test_export_into_a_read_only_run_is_one_line(read_only_run, form):
    line = one_line(run_cli("export", str(read_only_run / "round_001"), "--format", form, timeout=300))
    assert "cannot write" in line and str(read_only_run / "round_001") in line and "Read-only file system" in line
