"""One way to survive a dead worker: the driver notices, says so in one line, starts another.

Every kind of worker a stage runs (a vLLM engine, a reward actor, the reference task, the Ray
Train worker group) is retried the same way, up to `worker_retries` times each: Ray's own
restarts (`max_restarts`, `max_task_retries`, `max_retries`, Ray Train's `FailureConfig`) are
left off, so that every retry is seen by the driver, logged with the same line and counted
in the stage's statistics. Only a worker's death is retried: an error the worker raised
would come back from any other worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from core.errors import PipelineError
from core.failures import describe, inner_exception

log = logging.getLogger("pipeline")
T = TypeVar("T")

# Ray's exceptions for a worker process (or its node) that went away, by class name: this module
# is imported where Ray may not be (a unit test of a stage's math). A dead vLLM engine core
# arrives as a RayTaskError whose cause is the engine's EngineDied (pools/vllm_engines.py). A
# killed Ray Train worker arrives as a WorkerGroupError whose failure for that rank is a
# WorkerHealthCheckFailedError: a death only where the check failed on the dead actor
# (its `health_check_failure`), not where it failed to read back what the worker sent.
DEATHS = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
                    "NodeDiedError", "OwnerDiedError", "EngineDied"})


def worker_died(exc: BaseException) -> bool:
    """Whether `exc` means the worker is gone (so another may redo its work), under any of Ray's wrappers."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "actor_init_failed", False):
            # Its constructor raised (a bad model path, say): another actor's would raise the same.
            return False
        if any(kind.__name__ in DEATHS for kind in type(exc).__mro__):
            return True
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            # Ray Train: the group died if any of its workers did (the others fail because it did).
            return any(worker_died(failure) for failure in failures.values())
        exc = inner_exception(exc)
    return False


class WorkerDiedTooOften(PipelineError):
    """A worker died more often than `worker_retries` allows."""


@dataclass
class WorkerRetries:
    """The retries of one stage's workers: who died how often, with one log line per retry.

    `stage` names the stage in the log line; `kind` names the counter in the stage's
    statistics (`<kind>_retries`).
    """

    stage: str
    kind: str
    limit: int
    deaths: dict[str, int] = field(default_factory=dict)

    def died(self, worker: str, exc: BaseException) -> None:
        """Count `worker`'s death and log it; raise WorkerDiedTooOften once past the limit."""
        count = self.deaths[worker] = self.deaths.get(worker, 0) + 1
        if count > self.limit:
            raise WorkerDiedTooOften(f"{self.stage}: the {worker} died {count} times (worker_retries is "
                                     f"{self.limit}); last: {describe(exc)}") from None
        log.warning("%s: the %s died; starting another (retry %d of %d)", self.stage, worker, count, self.limit)

    def run(self, worker: str, attempt: Callable[[], T]) -> T:
        """`attempt()` until it returns, starting over each time its worker dies."""
        while True:
            try:
                return attempt()
            except Exception as exc:
                if not worker_died(exc):
                    raise
                self.died(worker, exc)

    @property
    def total(self) -> int:
        return sum(self.deaths.values())

    def stats(self) -> dict[str, int]:
        return {f"{self.kind}_retries": self.total}
