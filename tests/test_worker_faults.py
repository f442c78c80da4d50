"""A worker killed mid-stage is replaced and only its unfinished part redone (config `worker_retries`).

One smoke round, with evaluation off and a checkpoint after every step as in
test_resume.py: its vLLM generation engine is SIGKILLed while it samples, and
its Ray Train worker while it scores the reference (reference.in_train_workers)
and again right after the first in-training checkpoint. The command
must finish by itself, log the retries, and leave the same rows as the
session's uninterrupted smoke round.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import psutil
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO_ROOT, survivors

pytestmark = pytest.mark.e2e


def workers_named(root: psutil.Process, name: str) -> list[psutil.Process]:
    found = []
    for process in root.children(recursive=True):
        try:
            if name in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def run_and_kill(tmp_path, run: str, targets, *overrides: str) -> tuple[int, str, list[str]]:
    """Run a smoke round; for each (process name, ready, delay) in turn, SIGKILL that worker once
    `ready()` holds and it is running. Returns the exit status, the output and what was killed."""
    round_dir = tmp_path / run / "round_001"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / f"{run}.log"
    command = [sys.executable, "-m", "pipeline", "round", "1", "--config", "configs/smoke.yaml", "--run", run,
               "--output", str(tmp_path), "prompts.eval_size=0", "train.checkpoint_every=1", *overrides]
    killed, family = [], set()
    with log_path.open("w") as sink:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        driver = psutil.Process(process.pid)
        deadline = time.monotonic() + 900
        try:
            for name, ready, delay in targets:
                while not (ready(round_dir) and workers_named(driver, name)):
                    assert process.poll() is None, log_path.read_text()[-3000:]
                    assert time.monotonic() < deadline, f"never saw a {name} at work"
                    time.sleep(0.01)
                time.sleep(delay)
                for worker in workers_named(driver, name):
                    worker.send_signal(signal.SIGKILL)
                    killed.append(name)
            while process.poll() is None:  # to the end, noting every process the round starts
                assert time.monotonic() < deadline, "the round did not finish"
                try:
                    family.update(driver.children(recursive=True))
                except psutil.NoSuchProcess:
                    pass
                time.sleep(0.2)
        finally:
            if process.poll() is None:
                process.kill()
    left = survivors(family)
    assert not left, f"still running after the round ended: {left}"
    return process.returncode, log_path.read_text(), killed


def assert_same_rows(round_dir, baseline) -> None:
    for name in ("candidates", "lists", "train"):
        ours, clean = pq.read_table(round_dir / name).to_pylist(), pq.read_table(baseline / name).to_pylist()
        keys = Counter((row["prompt_id"], row.get("sample_index")) for row in ours)
        assert max(keys.values()) == 1, f"{name} has duplicated rows"
        assert keys == Counter((row["prompt_id"], row.get("sample_index")) for row in clean), name
    # The replacement engine has the lost one's seed: the same answers.
    assert sorted(r["response"] for r in pq.read_table(round_dir / "candidates").to_pylist()) == \
        sorted(r["response"] for r in pq.read_table(baseline / "candidates").to_pylist())


def test_a_killed_engine_and_train_worker_are_replaced(smoke_run, tmp_path):
    baseline = smoke_run / "round_001"
    code, output, killed = run_and_kill(tmp_path, "faults", [
        ("GenerationWorker", lambda d: (d / "candidates.partial").is_dir(), 2.0),  # starting its engine or sampling
        # Loading the policy or scoring the reference with it.
        ("RayTrainWorker", lambda d: (d / "train.partial").is_dir() and not (d / "_done" / "reference").exists(), 0.0),
        ("RayTrainWorker", lambda d: (d / "policy.partial" / "checkpoint.pt").is_file(), 0.0),
    ])
    round_dir = tmp_path / "faults" / "round_001"
    assert code == 0, output[-5000:]
    assert killed.count("RayTrainWorker") >= 2 and "GenerationWorker" in killed
    assert json.loads((round_dir / "_done" / "reference").read_text())["in_train_workers"] is True
    assert "generate: the vLLM engine of shard 0 died; starting another (retry 1 of 2)" in output
    assert json.loads((round_dir / "_done" / "generate").read_text())["engine_retries"] == 1
    assert_same_rows(round_dir, baseline)
    # Ray Train started the group again, and the loop went on from its checkpoint: every step once.
    assert "resuming training after step" in (tmp_path / "faults" / "logs" / "round_001" / "train.log").read_text()
    log_lines = (round_dir / "policy" / "training_log.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log_lines]
    clean_steps = (baseline / "policy" / "training_log.jsonl").read_text().splitlines()
    assert steps == list(range(1, len(clean_steps) + 1))


def test_a_killed_reward_actor_and_reference_task_are_replaced(smoke_run, tmp_path):
    """Killed while their stage runs (its marker not yet written): Ray starts them again. The
    reference as its own stage (one Ray task), as when it is not the round's starting policy."""
    baseline = smoke_run / "round_001"
    code, output, killed = run_and_kill(tmp_path, "faults2", [
        ("RewardWorker", lambda d: (d / "lists.partial").is_dir() and not (d / "_done" / "rerank").exists(), 0.0),
        ("score_items", lambda d: (d / "train.partial").is_dir() and not (d / "_done" / "reference").exists(), 0.0),
    ], "reference.in_train_workers=false")
    assert code == 0, output[-5000:]
    assert {"RewardWorker", "score_items"} <= set(killed)
    assert_same_rows(tmp_path / "faults2" / "round_001", baseline)
