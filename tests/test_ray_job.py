"""A smoke round submitted with `ray job submit` to a Ray head this test starts.

The head runs on ports of its own, with its own temp dir and auth token, so it
cannot meet another Ray on the machine; teardown stops exactly the processes
it started (never `ray stop`, which stops every Ray of the user).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from core.layout import STAGES
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e

SMOKE = yaml.safe_load((REPO_ROOT / "configs" / "smoke.yaml").read_text())
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
PORT_NAMES = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
              "dashboard-agent-grpc-port", "dashboard-agent-listen-port", "metrics-export-port",
              "runtime-env-agent-port")
WORKER_PORTS = 64


@dataclass
class Head:
    address: str          # the dashboard's HTTP address: what `ray job submit --address` takes
    env: dict[str, str]   # what a client needs in its environment (the auth token)
    temp_dir: Path


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_port_block(size: int) -> int:
    """The first of `size` consecutive free ports below Linux's ephemeral range (32768+)."""
    for _ in range(50):
        base = random.randrange(20000, 32768 - size)
        if all(_port_is_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} consecutive free ports found")


def _client_env(token: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    # Ray 2.60 turns token authentication on for every head; a client only sends
    # the token when RAY_AUTH_MODE=token. A token of our own, rather than
    # ~/.ray/auth_token, keeps this head private to the test.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def _started_processes(session: int, marker: str) -> list[psutil.Process]:
    """Processes of the head: in the session `ray start` ran in, or naming its temp dir, and their children."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(proc.pid) == session or marker in " ".join(proc.info["cmdline"] or ()):
                found[proc.pid] = proc
        except (OSError, psutil.Error):
            continue
    for proc in list(found.values()):
        try:
            found.update((child.pid, child) for child in proc.children(recursive=True))
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop(session: int, marker: str, grace: float = 5.0) -> list[str]:
    """SIGTERM the head's processes, SIGKILL what is left after `grace` seconds; return any survivors.

    Most exit within two seconds of SIGTERM; the GCS server and a monitor were
    seen to linger for 15 s and more, which is not worth waiting for here.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0), (signal.SIGKILL, 5.0)):
        procs = _started_processes(session, marker)
        if not procs:
            return []
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=wait)
    survivors = []
    for proc in _started_processes(session, marker):
        try:
            survivors.append(f"{proc.pid} {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            continue
    return survivors


@pytest.fixture(scope="module")
def ray_head():
    # Short: Ray puts unix sockets under it, and their paths must stay under ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))
    base = _free_port_block(len(PORT_NAMES) + WORKER_PORTS)
    ports = dict(zip(PORT_NAMES, range(base, base + len(PORT_NAMES))))
    worker_min = base + len(PORT_NAMES)
    token = secrets.token_hex(32)
    env = _client_env(token)
    # The head's workers run the entrypoint's `python`: make it this venv's, as an activated venv would.
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    command = [str(RAY), "start", "--head", "--disable-usage-stats", "--num-cpus", "2",
               "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--temp-dir", str(temp_dir),
               "--object-store-memory", str(300 * 2**20),
               *(f"--{name}={port}" for name, port in ports.items()),
               f"--min-worker-port={worker_min}", f"--max-worker-port={worker_min + WORKER_PORTS - 1}"]
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "w") as log_file:
        # A session of its own: every process the head spawns stays in it, which is how teardown finds them.
        starter = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    session = starter.pid
    survivors: list[str] = []
    try:
        try:
            returncode = starter.wait(timeout=180)
        except subprocess.TimeoutExpired:
            returncode = None
        assert returncode == 0, f"ray start failed ({returncode}):\n{log_path.read_text()[-5000:]}"
        client_env = _client_env(token)
        yield Head(f"http://127.0.0.1:{ports['dashboard-port']}", client_env, temp_dir)
    finally:
        survivors = _stop(session, str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not survivors, f"processes of the test's Ray head survived teardown: {survivors}"


def _job_logs(head: Head, submission_id: str) -> str:
    result = subprocess.run([str(RAY), "job", "logs", "--address", head.address, submission_id],
                            env=head.env, capture_output=True, text=True, timeout=60, check=False)
    return result.stdout[-8000:] + result.stderr[-2000:]


def test_smoke_round_as_ray_job(ray_head, tmp_path, tiny_model):
    output = tmp_path / "runs"
    run = "job"
    submission_id = f"larpo-smoke-{secrets.token_hex(4)}"
    # The upload honours .gitignore, so the prepared models in .cache/ stay behind:
    # LARPO_CACHE points the job at them, as a cluster points at a shared mount.
    runtime_env = {"env_vars": {"LARPO_CACHE": str(REPO_ROOT / ".cache")}}
    command = [str(RAY), "job", "submit", "--address", ray_head.address, "--submission-id", submission_id,
               "--working-dir", str(REPO_ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "-m", "pipeline", "round", "1", "--config", "configs/smoke.yaml", "--run", run,
               "--output", str(output), "prompts.eval_size=0"]
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, env=ray_head.env, capture_output=True, text=True,
                                timeout=600, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job did not finish in 600 s; its logs:\n{_job_logs(ray_head, submission_id)}")
    assert result.returncode == 0, (f"ray job submit exited {result.returncode}\n--- stdout\n"
                                    f"{result.stdout[-8000:]}\n--- stderr\n{result.stderr[-3000:]}")
    assert "succeeded" in result.stdout, result.stdout[-8000:]

    round_dir = output / run / "round_001"
    assert (output / run / "config.yaml").is_file()
    assert sorted(p.name for p in (round_dir / "_done").iterdir()) == sorted(STAGES)
    for name in ("candidates", "lists", "train"):
        assert (round_dir / name / "part-00000.parquet").is_file(), name
    assert (round_dir / "policy" / "config.json").is_file()
    assert list((round_dir / "policy").glob("*.safetensors"))
    candidates = pq.read_table(round_dir / "candidates")
    assert candidates.num_rows == SMOKE["prompts"]["per_round"] * SMOKE["generate"]["num_samples"]
    # The job ran the base model from LARPO_CACHE, not a copy inside the uploaded working dir.
    assert set(candidates.column("policy").to_pylist()) == {str(tiny_model.resolve())}
    metrics = json.loads((round_dir / "metrics.json").read_text())
    assert metrics["round"] == 1
    assert set(metrics["stage_seconds"]) == set(STAGES)
