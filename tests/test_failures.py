"""A failure under Ray's wrappers comes out as its innermost cause, on one line, without colour codes,
and the train stage retries its Ray Train worker group only when a worker died."""

import errno
import logging
import time

import pytest
import ray
from ray.exceptions import RayTaskError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from core.errors import TrainingDiverged
from core.failures import describe, is_disk_full, is_retry_pointless, root_cause
from stages.train.stage import fit

ENGINE_REFUSAL = "Unsupported CPU attention configuration: head_dim=16 is not supported"


def test_the_innermost_cause_is_found_under_every_wrapper():
    cause = RuntimeError(ENGINE_REFUSAL)
    task_error = RayTaskError("GenerationWorker.generate", "Traceback ...\nRuntimeError: ...", cause)
    user = UserExceptionWithTraceback(cause, "Traceback ...")
    for wrapped in (task_error, task_error.as_instanceof_cause(), user,
                    WorkerGroupError("worker 0 failed", {1: ValueError("collateral"), 0: user}),
                    ControllerError(task_error)):
        assert root_cause(wrapped) is cause
        assert describe(wrapped) == f"RuntimeError: {ENGINE_REFUSAL}"


def test_colour_codes_and_ray_headers_stay_out_of_the_line():
    coloured = RuntimeError(f"\x1b[36m(GenerationWorker pid=5343)\x1b[0m {ENGINE_REFUSAL}\nmore")
    assert describe(coloured) == f"RuntimeError: (GenerationWorker pid=5343) {ENGINE_REFUSAL}"
    # A RayTaskError whose cause could not be rebuilt keeps only the worker's traceback text.
    text = ("ray::GenerationWorker.generate() (pid=5343, ip=10.0.0.1, actor_id=abc)\n  File \"x.py\", line 1\n"
            f"\x1b[31mRuntimeError: {ENGINE_REFUSAL}\x1b[0m\n")
    assert describe(Exception(text)) == f"RuntimeError: {ENGINE_REFUSAL}"


def test_a_full_disk_is_named_whoever_reports_it():
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/round_001/policy.partial/model.safetensors")
    assert describe(WorkerGroupError("w", {0: full})) == (
        "the disk is full: no space left writing /runs/x/round_001/policy.partial/model.safetensors "
        "(OSError: [Errno 28])")
    safetensors_error = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert is_disk_full(safetensors_error)
    assert describe(safetensors_error).startswith("the disk is full (Exception: Error while serializing")
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("os error 280"))


def test_which_failures_a_retry_would_only_repeat():
    assert is_retry_pointless(WorkerGroupError("w", {0: TrainingDiverged("step 2 of 8: the loss is nan")}))
    assert is_retry_pointless(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_retry_pointless(WorkerGroupError("w", {0: RuntimeError("the worker's process was killed")}))


# The worker's process is SIGKILLed in its first attempt; the next attempt trains to the end.
KILLED = "killed"


@pytest.mark.parametrize("error, attempts_made, line", [
    (TrainingDiverged("step 2 of 8: the loss is nan"), 1, "TrainingDiverged: step 2 of 8: the loss is nan"),
    (OSError(errno.ENOSPC, "No space left on device", "/disk/model.safetensors"), 1,
     "the disk is full: no space left writing /disk/model.safetensors (OSError: [Errno 28])"),
    # Raised by the worker's own code, so not a death: another worker group would meet it again.
    (RuntimeError("a library error that may not come back"), 1,
     "RuntimeError: a library error that may not come back"),
    (KILLED, 2, None),
])
def test_ray_train_retries_only_what_a_retry_may_fix(tmp_path, local_ray, caplog, error, attempts_made, line):
    attempts = tmp_path / "attempts"

    def failing_loop(config):  # defined here so that Ray ships it by value to its workers
        import os
        import signal

        loop = config["loop"]
        with open(loop["attempts"], "a") as f:
            f.write("x")
        if loop["error"] != "killed":
            raise loop["error"]
        with open(loop["attempts"]) as f:
            if len(f.read()) == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    def run():
        return fit({"attempts": str(attempts), "error": error}, 1, tmp_path / "train", "retry", retries=1,
                   gpus_per_worker=0.0, train_loop=failing_loop)

    if error is KILLED:
        with caplog.at_level(logging.WARNING, logger="pipeline"):
            assert run() == {"train_group_retries": 1}
        assert "train: the Ray Train worker group died; starting another (retry 1 of 1)" in caplog.text
    else:
        with pytest.raises(Exception) as raised:
            run()
        assert type(root_cause(raised.value)) is type(error)
        assert describe(raised.value) == line
    assert len(attempts.read_text()) == attempts_made


def test_an_actors_error_reaches_the_driver_as_its_cause(local_ray):
    @ray.remote(num_cpus=0)
    class Refuses:
        def generate(self):
            raise RuntimeError(ENGINE_REFUSAL)

    actor = Refuses.remote()
    start = time.monotonic()
    with pytest.raises(Exception) as raised:
        ray.get(actor.generate.remote(), timeout=60)
    assert time.monotonic() - start < 60
    assert describe(raised.value) == f"RuntimeError: {ENGINE_REFUSAL}"
    assert "\x1b[" not in describe(raised.value)
