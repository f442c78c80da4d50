"""Shared fixtures: the repository root and the prepared embedded models."""

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Tests never reach a W&B server, even on a machine logged in to one (pipeline/tracking.py).
os.environ["WANDB_MODE"] = "offline"
# The smoke run reports to every tracker, which tests/test_e2e_rounds.py reads back.
TRACK_ALL = "tracking=[tensorboard,mlflow,wandb]"


def kill_processes(processes) -> list[psutil.Process]:
    """SIGKILL every process that still runs and wait for them; those still alive after 30 s."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return psutil.wait_procs(list(processes), timeout=30)[1]


def survivors(processes, timeout: float = 60) -> list[psutil.Process]:
    """The processes (zombies aside) still running `timeout` s from now; killed, so no test leaks them."""
    alive = psutil.wait_procs(list(processes), timeout=timeout)[1]
    left = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    kill_processes(left)
    return left


RAY_PROCESS = re.compile(r"^ray::|^(gcs_server|raylet)$|/ray/(_private|dashboard|autoscaler)/")


def ray_orphans_since(start: float, keep: set[int] = frozenset()) -> list[psutil.Process]:
    """Ray processes created since `start` that lost their parent (re-parented to init): what a command
    that ended would leave behind. The tests run one at a time, so none of these is another test's."""
    found = []
    for process in psutil.process_iter(["ppid", "create_time", "name", "cmdline"]):
        info = process.info
        if info["ppid"] != 1 or info["create_time"] < start or process.pid in keep:
            continue
        if RAY_PROCESS.search(info["name"] or "") or RAY_PROCESS.search(" ".join(info["cmdline"] or ())):
            found.append(process)
    return found


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of the test's own for tests that call the worker pools directly; its workers import this checkout."""
    import ray

    ray.init(address="local", num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    path = REPO_ROOT / ".cache" / "models" / "tiny-random-llama"
    if not (path / "config.json").is_file():
        pytest.fail(f"{path} is missing: run `make setup` before the tests")
    return path


# The installed console script (pyproject.toml), which does not put the checkout on sys.path:
# only what the package installs can be imported through it.
LARPO = Path(sys.executable).with_name("larpo")


def run_cli(*args: str, timeout: float = 900, command: tuple[str, ...] = (sys.executable, "-m", "pipeline"),
            ) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` (or `command ...`) from the repository root, as a user would run it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([*command, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    # Config files name paths relative to the repository, as `make` runs them.
    monkeypatch.chdir(REPO_ROOT)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, tiny_model) -> Path:
    """Two rounds of configs/smoke.yaml through the installed `larpo` command (as the README runs
    them), run once for every test that reads them."""
    output = tmp_path_factory.mktemp("runs")
    result = run_cli("rounds", "2", "--config", "configs/smoke.yaml", "--run", "e2e", "--output", str(output),
                     TRACK_ALL, timeout=1200, command=(str(LARPO),))
    assert result.returncode == 0, result.stderr[-5000:]
    # What the terminal showed, for tests/test_e2e_rounds.py's check of a quiet console.
    (output / "console.txt").write_text(result.stdout + result.stderr)
    return output / "e2e"
