"""A round killed with SIGKILL mid-stage finishes when run again: no duplicated, no missing rows.

Round 1 of the session's uninterrupted smoke run (conftest.py's `smoke_run`) is
the baseline. Another run of the same round is killed during generation, run
again and killed during training (right after its first in-training
checkpoint), then run a third time to the end. Its shards must match the
baseline's row for row, and training must have resumed, not restarted.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, kill_processes, run_cli

pytestmark = pytest.mark.e2e

# Neither changes what is trained: evaluation is off, and a checkpoint after every step
# leaves a window to kill training in before its last step.
OVERRIDES = ("prompts.eval_size=0", "train.checkpoint_every=1")


def round_command(output: Path, run: str) -> list[str]:
    return ["round", "1", "--config", "configs/smoke.yaml", "--run", run, "--output", str(output), *OVERRIDES]


def kill_when(output: Path, run: str, ready, timeout: float = 600) -> str:
    """Start the round, SIGKILL it (and, as a crashed node would, everything it started) once `ready()`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log = output / f"{run}-killed.log"
    with log.open("a") as sink:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", *round_command(output, run)], cwd=REPO_ROOT,
                                   env=env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, f"the round ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
            time.sleep(0.05)
        family = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGKILL)
        process.wait()
    kill_processes(family)
    return log.read_text()


def rows(directory: Path) -> list[dict]:
    return pq.read_table(directory).to_pylist()


def training_log(round_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (round_dir / "policy" / "training_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def baseline(smoke_run) -> Path:
    return smoke_run / "round_001"


def test_killed_during_generation_and_training_finishes_like_an_uninterrupted_round(baseline, tmp_path):
    round_dir = tmp_path / "resume" / "round_001"
    started = {}

    def generating() -> bool:
        # Two seconds into the stage: the engine is starting or sampling.
        if (round_dir / "candidates.partial").is_dir():
            started.setdefault("at", time.monotonic())
            return time.monotonic() - started["at"] > 2
        return False

    kill_when(tmp_path, "resume", generating)
    assert not (round_dir / "_done" / "generate").exists()
    assert not (round_dir / "candidates").exists()

    checkpoint = round_dir / "policy.partial" / "checkpoint.pt"
    kill_when(tmp_path, "resume", checkpoint.is_file)
    assert not (round_dir / "_done" / "train").exists()
    saved_steps = len(torch.load(checkpoint, weights_only=True)["history"])

    result = run_cli(*round_command(tmp_path, "resume"), timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    # The worker's own line is in the train stage's log, not on the terminal.
    train_log = tmp_path / "resume" / "logs" / "round_001" / "train.log"
    assert f"resuming training after step {saved_steps}" in train_log.read_text()

    for name in ("candidates", "lists", "train"):
        resumed, uninterrupted = rows(round_dir / name), rows(baseline / name)
        assert len(resumed) == len(uninterrupted), name
        keys = Counter((row["prompt_id"], row.get("sample_index")) for row in resumed)
        assert max(keys.values()) == 1, f"{name} has duplicated rows"
        assert keys == Counter((row["prompt_id"], row.get("sample_index")) for row in uninterrupted), name
    # Same seed, same CPU: the same answers, so the same lists.
    assert sorted(r["response"] for r in rows(round_dir / "candidates")) == \
        sorted(r["response"] for r in rows(baseline / "candidates"))

    log, reference_log = training_log(round_dir), training_log(baseline)
    assert [r["step"] for r in log] == list(range(1, len(reference_log) + 1))
    assert saved_steps < len(log)
    for resumed, uninterrupted in zip(log, reference_log):
        assert resumed["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-4, abs=1e-6)
    weights, reference = load_file(round_dir / "policy" / "model.safetensors"), \
        load_file(baseline / "policy" / "model.safetensors")
    assert all(torch.allclose(weights[k], reference[k], atol=1e-4) for k in reference)
    assert not checkpoint.exists() and not (round_dir / "policy" / "checkpoint.pt").exists()
