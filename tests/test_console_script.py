"""The `larpo` console script (pyproject.toml) is `python -m pipeline` under a shorter name."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import LARPO


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


def test_every_package_of_the_checkout_is_installed(tmp_path):
    # -I: neither the current directory nor PYTHONPATH on sys.path, as for the console script
    # or in vLLM's and Ray's worker processes, which import pools by name.
    code = "import pipeline.cli, pools.vllm_engines, pools.engine_extension, stages.generate, rewards.base"
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_project_cites_only_its_own_files():
    # The contracts the README and the code cite are in docs/, which a clone has.
    from tests.conftest import REPO_ROOT

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.split()
    assert "docs/contracts.md" in tracked
    outside = [name for name in tracked if (REPO_ROOT / name).is_file() and name != "tests/test_console_script.py"
               and "../shared" in (REPO_ROOT / name).read_text(errors="ignore")]
    assert outside == []
