"""A failure under Ray's wrappers comes out as its innermost cause, on one line, without colour codes,
and Ray Train does not retry what a retry would only repeat."""

import errno
import time

import pytest
import ray
from ray.exceptions import RayTaskError
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from core.errors import TrainingDiverged
from core.failures import describe, is_disk_full, is_retry_pointless, root_cause
from stages.train.stage import NoPointlessRetries

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


@pytest.mark.parametrize("error, retried, line", [
    (TrainingDiverged("step 2 of 8: the loss is nan"), False, "TrainingDiverged: step 2 of 8: the loss is nan"),
    (OSError(errno.ENOSPC, "No space left on device", "/disk/model.safetensors"), False,
     "the disk is full: no space left writing /disk/model.safetensors (OSError: [Errno 28])"),
    (RuntimeError("a library error that may not come back"), True,
     "RuntimeError: a library error that may not come back"),
])
def test_ray_train_retries_only_what_a_retry_may_fix(tmp_path, local_ray, error, retried, line):
    attempts = tmp_path / "attempts"

    def failing_loop(config):  # defined here so that Ray ships it by value to its workers
        with open(config["attempts"], "a") as f:
            f.write("x")
        raise config["error"]

    trainer = TorchTrainer(failing_loop, train_loop_config={"attempts": str(attempts), "error": error},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name="retry", storage_path=str(tmp_path / "train"),
                                                failure_config=FailureConfig(max_failures=1),
                                                callbacks=[NoPointlessRetries()]))
    with pytest.raises(Exception) as raised:
        trainer.fit()
    assert len(attempts.read_text()) == (2 if retried else 1)
    assert type(root_cause(raised.value)) is type(error)
    assert describe(raised.value) == line


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
