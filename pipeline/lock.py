"""One writer per run: an exclusive OS file lock held for a whole `round` / `rounds` command.

The lock is `flock` on `<run>/.lock`, so the kernel drops it when the process
ends, however it ends (a SIGKILL leaves no stale lock). The file records who
holds it (host, pid, start time) for the refusal message. flock is reliable on
local filesystems; on NFS it depends on the server and client (Linux maps it to
POSIX byte-range locks over NFSv4, which works with a lock manager), and on
some FUSE-based shared mounts it only guards processes on the same host, so
start one command per run yourself on such mounts (README, "GPU clusters").
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import PipelineError

LOCK_NAME = ".lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return "another command"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} (since {started})"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run's lock for the block; refuse with one line naming the holder if it is taken."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise PipelineError(f"cannot create the run lock {run_dir / LOCK_NAME} ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise PipelineError(f"run {run_dir} is in use by {_holder(run_dir / LOCK_NAME)}: one command at a "
                                "time per run; wait for it to end or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.time()}).encode())
        yield
    finally:
        os.close(fd)  # closing drops the lock
