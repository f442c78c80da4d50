"""A disk that fills up mid-round: one line that says so, no retry of the same error, nothing left
running, and the same command resumes once there is room."""

import subprocess
import time

import psutil
import pytest

from tests.conftest import REPO_ROOT, ray_orphans_since, run_cli, survivors

pytestmark = pytest.mark.e2e

# Room for the round's shards and logs, not for the policy checkpoint (the tiny model's is larger).
SMALL_DISK = "20m"
ROOMY_DISK = "400m"


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of SMALL_DISK (tmpfs), which the kernel reports full with ENOSPC."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"this machine does not let the tests mount a small filesystem: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def children_after(before: set[int]) -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]


def test_a_full_disk_is_named_not_retried_and_the_round_resumes_after(small_disk, tiny_model):
    output = small_disk / "runs"
    args = ("round", "1", "--config", "configs/smoke.yaml", "--run", "full", "--output", str(output),
            "prompts.eval_size=0")
    start = time.time() - 1
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-3000:]
    # The stages' summary lines, then the one error line; no Ray traceback after it.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "TrainController" not in result.stderr, result.stderr[-3000:]
    assert errors[0].startswith("error: train of round 1 failed: the disk is full"), errors[0]
    assert "free space there and run the same command to resume" in errors[0]
    assert not (output / "full" / "round_001" / "_done" / "train").exists()
    train_log = (output / "full" / "logs" / "round_001" / "train.log").read_text()
    assert train_log.count("Started training worker group") == 1, "the same error was retried"
    assert not survivors(children_after(before) + ray_orphans_since(start), timeout=10)

    # Room again: the same command finishes the round, keeping the stages already done.
    subprocess.run(["mount", "-o", f"remount,size={ROOMY_DISK}", str(small_disk)], check=True)
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (output / "full" / "pipeline.log").read_text()
    assert "round 1: generate already done, skipped" in log
    assert (output / "full" / "round_001" / "_done" / "evaluate").is_file()
    assert not (REPO_ROOT / "runs" / "full").exists()
