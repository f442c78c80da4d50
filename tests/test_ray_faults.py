"""Ray failing under a round: one `error:` line naming what died, exit 2, nothing left running;
and two runs on one host beside a third Ray, each on a Ray of its own."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO_ROOT, ray_orphans_since, survivors

pytestmark = pytest.mark.e2e

ANSI = re.compile(r"\x1b\[")


def start_round(output: Path, run: str, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "pipeline", "round", "1", "--config", "configs/smoke.yaml",
                             "--run", run, "--output", str(output), "prompts.eval_size=0", *overrides],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_stage(process: subprocess.Popen, log: Path, stage: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not (log.is_file() and f"{stage} started" in log.read_text()):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{stage} never started"
        time.sleep(0.2)


def ray_process(process: subprocess.Popen, name: str) -> psutil.Process:
    found = [p for p in psutil.Process(process.pid).children(recursive=True) if p.name() == name]
    assert len(found) == 1, f"expected one {name} under the command, found {found}"
    return found[0]


@pytest.mark.parametrize("victim, stage", [("gcs_server", "generate"), ("raylet", "train")])
def test_a_lost_gcs_or_raylet_is_one_line_and_leaves_nothing(tmp_path, tiny_model, victim, stage):
    output = tmp_path / "runs"
    process = start_round(output, "lost")
    wait_for_stage(process, output / "lost" / "pipeline.log", stage)
    time.sleep(2)  # the stage's workers are up
    family = psutil.Process(process.pid).children(recursive=True)
    target = ray_process(process, victim)
    target.kill()
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 2, stderr[-3000:]
    assert not ANSI.search(stderr), stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    assert errors[0].startswith(f"error: Ray's {victim} (pid {target.pid}) died during {stage} of round 1; "
                                "its logs are in "), errors[0]
    assert errors[0].endswith("run the same command to resume")
    assert f"{victim} (pid {target.pid}) died" in (output / "lost" / "pipeline.log").read_text()
    assert not (output / "lost" / "round_001" / "_done" / stage).exists()
    leftover = survivors(family)
    assert not leftover, f"still running after the command ended: {leftover}"


def test_a_ray_that_cannot_start_is_one_line(tmp_path, tiny_model):
    output = tmp_path / "runs"
    start = time.time() - 1
    # Ray keeps its sessions under RAY_TMPDIR: a path no one can create makes ray.init fail.
    process = start_round(output, "nostart", env={"RAY_TMPDIR": "/proc/no-such-dir/ray"})
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: Ray could not start: "), stderr[-3000:]
    assert "/proc/no-such-dir" in lines[0]
    assert not ANSI.search(stderr)
    leftover = survivors(ray_orphans_since(start), timeout=10)
    assert not leftover, f"still running after the command ended: {leftover}"


@pytest.fixture
def third_ray(tmp_path):
    """Another user's `ray start --head` on the same host, the cluster that `ray.init()` would join."""
    current = Path("/tmp/ray/ray_current_cluster")
    saved = current.read_bytes() if current.exists() else None
    ray = Path(sys.executable).with_name("ray")
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    from pipeline.ray_session import free_port

    head = subprocess.Popen([str(ray), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=1",
                             "--include-dashboard=false"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(p.name() == "raylet" for p in psutil.Process(head.pid).children(recursive=True)):
        assert head.poll() is None and time.monotonic() < deadline, "the third Ray did not start"
        time.sleep(0.5)
    try:
        yield head
    finally:
        family = psutil.Process(head.pid).children(recursive=True) + [psutil.Process(head.pid)]
        os.killpg(head.pid, signal.SIGTERM)
        survivors(family, timeout=5)  # what is left then is killed
        # Leave the host's record of "the" cluster as it was, for the other tests' own Rays.
        if saved is None:
            current.unlink(missing_ok=True)
        else:
            current.write_bytes(saved)


def test_two_runs_beside_a_third_ray_both_finish(tmp_path, tiny_model, third_ray):
    output = tmp_path / "runs"
    start = time.time() - 1
    runs = {name: start_round(output, name) for name in ("first", "second")}
    results = {name: process.communicate(timeout=1200) for name, process in runs.items()}
    for name, process in runs.items():
        assert process.returncode == 0, f"{name}: {results[name][1][-3000:]}"
        assert (output / name / "round_001" / "_done" / "evaluate").is_file()
    other_ray = {p.pid for p in psutil.Process(third_ray.pid).children(recursive=True)}
    leftover = survivors(ray_orphans_since(start, keep=other_ray), timeout=10)
    assert not leftover, f"still running after the commands ended: {leftover}"
    head = psutil.Process(third_ray.pid)
    raylets = [p for p in head.children(recursive=True) if p.name() == "raylet"]
    assert raylets and all(p.status() != psutil.STATUS_ZOMBIE for p in raylets), "a run stopped the other Ray"
