"""core/retries.py: one retry policy for every kind of worker, with one log line and one counter."""

import logging

import pytest
from ray.exceptions import ActorDiedError, RayTaskError, WorkerCrashedError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2.api.exceptions import WorkerGroupError

from core.retries import WorkerDiedTooOften, WorkerRetries, worker_died


class EngineDied(RuntimeError):
    """Stands for pools/vllm_engines.py's: a death is recognized by the class name alone."""


def test_deaths_are_told_from_errors_under_any_wrapper():
    assert worker_died(ActorDiedError())
    assert worker_died(WorkerCrashedError())
    assert worker_died(RayTaskError("generate", "tb", EngineDied("engine core gone")))
    assert worker_died(WorkerGroupError("w", {0: ValueError("collateral"), 1: ActorDiedError()}))
    assert not worker_died(RayTaskError("generate", "tb", RuntimeError("bad request")))
    assert not worker_died(WorkerGroupError("w", {0: ValueError("a bug")}))


def test_a_killed_train_worker_is_a_death_under_ray_trains_wrappers():
    # What Ray Train's controller reports when a worker's process is gone: its poll of the worker failed.
    killed = WorkerHealthCheckFailedError("A worker health check failed.", failure=ActorDiedError())
    assert worker_died(WorkerGroupError("w", {0: killed}))
    assert worker_died(WorkerGroupError("w", {0: RuntimeError("gloo: connection closed by peer"), 1: killed}))
    # The poll came back but what the worker sent could not be read: another worker would send it too.
    unreadable = WorkerHealthCheckFailedError("A worker health check failed.", failure=TypeError("cannot pickle"))
    assert not worker_died(WorkerGroupError("w", {0: unreadable}))


def test_a_death_is_retried_with_one_line_and_counted(caplog):
    retries = WorkerRetries("generate", "engine", limit=2)
    calls = iter([ActorDiedError(), ActorDiedError(), "rows"])

    def attempt():
        outcome = next(calls)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert retries.run("vLLM engine of shard 0", attempt) == "rows"
    assert "generate: the vLLM engine of shard 0 died; starting another (retry 2 of 2)" in caplog.text
    assert retries.stats() == {"engine_retries": 2}


def test_past_the_limit_is_one_line_naming_the_worker_and_the_cause():
    retries = WorkerRetries("rerank", "reward_actor", limit=1)

    def attempt():
        raise ActorDiedError()

    with pytest.raises(WorkerDiedTooOften, match=r"^rerank: the reward actor 0 died 2 times \(worker_retries is 1\); "
                                                 r"last: ActorDiedError"):
        retries.run("reward actor 0", attempt)


def test_an_error_the_worker_raised_is_not_retried():
    retries = WorkerRetries("reference", "reference_task", limit=2)

    def attempt():
        raise ValueError("a bad shard")

    with pytest.raises(ValueError):
        retries.run("reference task", attempt)
    assert retries.total == 0


def test_an_actor_whose_constructor_raised_is_no_death():
    # A bad reward model path fails every actor's __init__ alike: retrying only reloads the same error.
    failed_init = ActorDiedError(cause=RayTaskError("RewardWorker.__init__", "tb", ValueError("no such model")))
    assert not worker_died(failed_init)
    assert not worker_died(RayTaskError("score", "tb", failed_init))
    assert worker_died(ActorDiedError())
