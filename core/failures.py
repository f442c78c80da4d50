"""A failure as one line: the innermost exception under Ray's wrappers, its type and first line, no colour codes.

Ray wraps an error raised in a worker in layers (RayTaskError, Ray Train's
WorkerGroupError, ControllerError and UserExceptionWithTraceback), whose own
first line names the actor and its pid but not what went wrong. Read by
attribute, not by class, so that this module imports no Ray.
"""

from __future__ import annotations

import errno
import re

from core.errors import PipelineError

# Terminal colour and cursor codes that Ray puts in its messages ("\x1b[36m(pid=...)").
ANSI_CODE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# errno values that mean the disk (or the user's quota on it) has no room left.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def inner_exception(exc: BaseException) -> BaseException | None:
    """The exception `exc` wraps, if it wraps one."""
    # Ray Train's wrappers (a worker's error, the controller's, a failed health check), then RayTaskError.
    for attr in ("_base_exc", "controller_failure", "health_check_failure", "cause"):
        inner = getattr(exc, attr, None)
        if isinstance(inner, BaseException) and inner is not exc:
            return inner
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        # Rank order: when one rank fails, the others often fail only because it did.
        return failures[min(failures)]
    return exc.__cause__


def root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while (inner := inner_exception(exc)) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def plain(text: str) -> str:
    return ANSI_CODE.sub("", text)


def first_line(text: str) -> str:
    lines = [line.strip() for line in plain(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


# How libraries that do their own I/O outside Python (safetensors, Arrow) say it.
DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (?:28|122)\b")


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in DISK_FULL_ERRNOS
    return bool(DISK_FULL_TEXT.search(str(exc)))


def describe(exc: BaseException) -> str:
    """`Type: first line of the message` of the innermost exception, without Ray's wrapper name.

    A RayTaskError made "as an instance of its cause" is named after the cause's class
    ("RayTaskError(RuntimeError)"): the cause's own name is what the user knows."""
    cause = root_cause(exc)
    name = type(cause).__name__
    match = re.fullmatch(r"\w+\((\w+)\)", name)
    if match:
        name = match.group(1)
    message = first_line(str(cause))
    if message.startswith("ray::"):
        # A RayTaskError whose cause could not be rebuilt: its text is the worker's traceback,
        # whose last line is the error itself.
        message = plain(str(cause)).strip().splitlines()[-1].strip()
        name, _, rest = message.partition(": ")
        return message if rest else name
    if is_disk_full(cause):
        if isinstance(cause, OSError):
            where = f" writing {cause.filename}" if cause.filename else ""
            return f"the disk is full: no space left{where} ({name}: [Errno {cause.errno}])"
        return f"the disk is full ({name}: {message})"
    return f"{name}: {message}" if message else name


def is_retry_pointless(exc: BaseException) -> bool:
    """A failure that a new worker would meet again: a full disk, diverged training, a bad input."""
    cause = root_cause(exc)
    return is_disk_full(cause) or isinstance(cause, PipelineError)
