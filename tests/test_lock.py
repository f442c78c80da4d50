"""One writer per run (pipeline/lock.py): a second command on a run in use refuses with one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from core.errors import PipelineError
from pipeline.lock import LOCK_NAME, run_lock
from tests.conftest import REPO_ROOT, kill_processes, run_cli

HOLD = "import sys, time; from pathlib import Path; from pipeline.lock import run_lock\n" \
       "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)\n"


def start_holder(run_dir: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_held_lock_is_refused_with_its_holder_and_freed_by_sigkill(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    holder = start_holder(run_dir)
    try:
        with pytest.raises(PipelineError, match=rf"run .*r is in use by pid {holder.pid} on .*one command at a time"):
            with run_lock(run_dir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock: nothing stale to clean up.
    with run_lock(run_dir):
        info = json.loads((run_dir / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"]


def test_the_lock_is_released_when_the_block_ends(tmp_path):
    with run_lock(tmp_path / "r"):
        pass
    with run_lock(tmp_path / "r"):
        pass


def test_two_concurrent_commands_on_one_run(tmp_path, tiny_model):
    """A real round holds the run; a second command on it refuses at once; the first is then killed."""
    output = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.Popen([sys.executable, "-m", "pipeline", "round", "1", "--config", "configs/smoke.yaml",
                              "--run", "same", "--output", str(output)], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family = []
    try:
        lock = output / "same" / LOCK_NAME
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text() and json.loads(lock.read_text())["pid"] == first.pid):
            assert first.poll() is None and time.monotonic() < deadline, "the first command never took the lock"
            time.sleep(0.05)
        second = run_cli("round", "1", "--config", "configs/smoke.yaml", "--run", "same", "--output", str(output),
                         timeout=120)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert lines[0].startswith("error: run ") and f"in use by pid {first.pid}" in lines[0]
    finally:
        if first.poll() is None:
            family = psutil.Process(first.pid).children(recursive=True)
            first.send_signal(signal.SIGKILL)
        first.wait()
        alive = kill_processes(family)
    assert not alive, f"processes the test started still run: {alive}"
