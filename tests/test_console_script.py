"""The `larpo` console script (pyproject.toml) is `python -m pipeline` under a shorter name."""

import subprocess
import sys
from pathlib import Path

LARPO = Path(sys.executable).with_name("larpo")


def test_larpo_is_installed_and_names_itself():
    result = subprocess.run([str(LARPO), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: larpo ")
    for command in ("round", "rounds", "inspect", "report"):
        assert command in result.stdout


def test_larpo_runs_the_same_commands(tmp_path):
    result = subprocess.run([str(LARPO), "report", str(tmp_path / "nope")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: run directory {tmp_path / 'nope'} does not exist"
