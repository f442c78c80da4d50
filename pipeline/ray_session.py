"""The command's Ray: its own local instance, bound to it explicitly, watched, and stopped with all it started.

Why a Ray of its own per command rather than one shared local Ray: a shared
instance has no owner to stop it, outlives the commands that started it, and
ties every run on the host to the first run's resources and environment. So
`start_own_ray` starts a fresh head (`address="local"`), never joining whatever
`/tmp/ray/ray_current_cluster` names (a `ray start` of another user or a test
suite, possibly long dead). Ray's own helpers that look for "the" local cluster
(Ray Train's placement-group cleaner, the state API) would find several on such
a host and pick the wrong one, so every worker of the command gets
`RAY_ADDRESS` set to this instance's GCS. With `RAY_ADDRESS` set by the user
(`ray job submit`, a cluster) the command joins that cluster instead.

`watch_ray` notices the loss of the head's `gcs_server` or `raylet`, which Ray
itself reports only by ending the driver a minute later with nothing said.
`adopt_orphans` and `stop_descendants` make sure no process the command started
outlives it, even one whose parent (the raylet) was killed first.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass

log = logging.getLogger("pipeline")

# The head processes whose loss ends the Ray instance (its workers die with them).
VITAL_PROCESSES = ("gcs_server", "raylet")
WATCH_INTERVAL_SECONDS = 0.2
# prctl(2): orphaned descendants are re-parented to this process instead of init.
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class LostProcess:
    name: str   # "gcs_server" or "raylet"
    pid: int
    logs: str   # the Ray session's log directory, where that process wrote its last words


def free_port(host: str = "") -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_own_ray(env_vars: dict[str, str], attempts: int = 3) -> str:
    """Start a new local Ray for this command alone; its GCS address.

    The GCS port is picked here, before Ray starts, so that the address can go
    into the workers' environment (the job's runtime env is fixed at start-up).
    Another process may take the port between the pick and Ray's bind: then a
    new port is tried.
    """
    import ray

    last_error: Exception | None = None
    for _ in range(attempts):
        host = ray.util.get_node_ip_address()
        port = free_port()
        address = f"{host}:{port}"
        saved = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        try:
            ray.init(address="local", runtime_env={"env_vars": {**env_vars, "RAY_ADDRESS": address}},
                     log_to_driver=True)
            return address
        except (ConnectionError, RuntimeError) as exc:
            last_error = exc
            if ray.is_initialized():
                ray.shutdown()
        finally:
            if saved is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = saved
    assert last_error is not None
    raise last_error


def vital_processes() -> dict[str, object]:
    """The gcs_server and raylet Popen objects of the Ray this process started; {} if it joined one."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not getattr(node, "head", False):
        return {}
    found = {}
    for name in VITAL_PROCESSES:
        infos = node.all_processes.get(name) or []
        if infos:
            found[name] = infos[0].process
    return found


def session_logs() -> str:
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return os.path.join(node.get_session_dir_path(), "logs") if node else "the Ray session's logs"


class RayWatch:
    """A daemon thread that calls `on_lost` once if the head's gcs_server or raylet exits."""

    def __init__(self, on_lost: Callable[[LostProcess], None]):
        self.processes = vital_processes()
        self.logs = session_logs()
        self.on_lost = on_lost
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="ray-watch", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stopped.wait(WATCH_INTERVAL_SECONDS):
            for name, process in self.processes.items():
                if process.poll() is not None and not self.stopped.is_set():
                    self.stopped.set()
                    self.on_lost(LostProcess(name, process.pid, self.logs))
                    return

    def stop(self) -> None:
        """Before a deliberate shutdown, which ends those processes on purpose."""
        self.stopped.set()


_watch: list[RayWatch] = []
_on_lost: list[Callable[[LostProcess], None]] = []


def watch_ray(on_lost: Callable[[LostProcess], None]) -> None:
    """Call `on_lost` if this process's own Ray loses its head (the command line's handler ends the command)."""
    _on_lost[:] = [on_lost]


def start_watching() -> None:
    """Watch the Ray just started, if a handler was registered with `watch_ray`."""
    if _on_lost and vital_processes():
        _watch[:] = [RayWatch(_on_lost[0])]


def stop_watching() -> None:
    for watch in _watch:
        watch.stop()
    _watch.clear()


# Processes that were this process's descendants before the command began (a test's own Ray):
# not the command's to stop.
_before: set[int] = set()


def adopt_orphans() -> bool:
    """Become the reaper of this process's orphaned descendants (Linux); whether it took.

    Ray's agents and workers are the raylet's children: when the raylet dies
    they would be re-parented to init and escape `stop_descendants`. The
    descendants this process already had are remembered and left alone.
    """
    import psutil

    _before.update(p.pid for p in psutil.Process().children(recursive=True))
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


# Ray's processes by name or command line: its head (gcs_server, raylet, the dashboard, monitors
# under ray/), its workers and agents (renamed "ray::..."), and vLLM's engine cores in them.
RAY_PROCESS = re.compile(r"^ray::|^(gcs_server|raylet)$|^VLLM|EngineCore|/site-packages/ray/")


def is_ray_process(process) -> bool:
    import psutil

    try:
        return bool(RAY_PROCESS.search(process.name()) or RAY_PROCESS.search(" ".join(process.cmdline())))
    except psutil.Error:
        return False


def ray_descendants() -> list:
    """The Ray processes this one started since `adopt_orphans`, with everything under them, orphans
    adopted from a dead raylet included; not the command's other children (a tracker's service,
    which its own exit handler still talks to)."""
    import psutil

    family = []
    for child in psutil.Process().children():
        if child.pid in _before or not is_ray_process(child):
            continue
        try:
            family += [child, *child.children(recursive=True)]
        except psutil.Error:
            family.append(child)
    return family


def stop_descendants(grace_seconds: float = 3.0) -> list[int]:
    """Terminate the Ray processes this one started (`ray_descendants`), then kill what is left; their pids."""
    import psutil

    family = ray_descendants()
    for process in family:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace_seconds)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_seconds)
    reap_zombies()
    return [process.pid for process in family]


def reap_zombies() -> None:
    """Collect the exit status of adopted processes that have ended (they would stay as zombies).

    Only those that are not this process's own children from before: waiting on those
    would take their status from whoever holds their Popen."""
    import psutil

    for process in psutil.Process().children():
        if process.pid in _before:
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(process.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            pass
