"""SIGTERM and SIGINT mid-round: one line, exit 143 / 130, and nothing the command started outlives it."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO_ROOT, survivors

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_stage_ends_the_command_cleanly(tmp_path, tiny_model, signum, code):
    output = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "round", "1", "--config", "configs/smoke.yaml",
                                "--run", "sig", "--output", str(output), "prompts.eval_size=0"], cwd=REPO_ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = output / "sig" / "pipeline.log"
    deadline = time.monotonic() + 600
    # Wait until the generation actor is up and sampling: the stage's partial shards exist.
    while not (log.is_file() and "generate started" in log.read_text()
               and any((output / "sig" / "round_001").glob("candidates.partial/*"))):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "generation never started"
        time.sleep(0.2)
    family = psutil.Process(process.pid).children(recursive=True)
    assert family, "the round started no process: nothing to check"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last == (f"error: interrupted ({signal.Signals(signum).name}) during generate of round 1; "
                    "run the same command to resume")
    leftover = survivors(family)
    assert not leftover, f"still running after the command ended: {leftover}"
