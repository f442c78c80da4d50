"""Train stage entry: run the LarPO loop under Ray Train and leave policy N as an HF checkpoint."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from core import failures, timing
from core.gpu_layout import cluster_gpu_count, layout_of
from core.layout import shard_name
from core.seeds import derive_seed
from pools.reference_lists import reference_inputs
from stages.train.loop import TIMINGS_FILE, LoopConfig, summarize, train_loop_per_worker
from stages.train.reference_in_workers import ReferenceJob

log = logging.getLogger("pipeline")


def scaling_config(num_workers: int, gpus_per_worker: float) -> ScalingConfig:
    """`gpus_per_worker`: the round's GpuLayout.train_worker (core/gpu_layout.py); 0 on CPUs."""
    if gpus_per_worker:
        return ScalingConfig(num_workers=num_workers, use_gpu=True, resources_per_worker={"GPU": gpus_per_worker})
    # Ray counts CPUs only to schedule; the loop sets its own thread count.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // num_workers)
    return ScalingConfig(num_workers=num_workers, use_gpu=False, resources_per_worker={"CPU": cpus})


def worker_env() -> dict[str, str]:
    """Environment of the training workers (a value set in the driver's environment wins).

    THP_MEM_ALLOC_ENABLE=1 makes PyTorch's CPU allocator ask for transparent huge pages on
    buffers of 2 MiB and more. Off by default: where it was measured, it saved a tenth of
    the trainer's peak memory at equal speed on one machine, and slowed training and
    reference scoring by half or more on others (docs/benchmarks.md), so it is for a user
    who is short of memory to turn on. It must be in the environment before torch starts,
    so it goes into the workers' runtime env rather than os.environ.
    """
    return {"THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0")}


class StopTraining(Exception):
    """A worker's error that a retry would only meet again; it ends the run instead of a restart."""

    def __init__(self, worker_error: BaseException):
        super().__init__(worker_error)
        self.cause = worker_error  # where core/failures.py looks for what is inside


class NoPointlessRetries(UserCallback):
    """Ray Train restarts the workers on any error, up to FailureConfig.max_failures. A full disk,
    diverged training or a bad input would fail the same way again, after the start-up and the
    steps since the last checkpoint: an error raised here ends the run at once (Ray Train does
    not retry errors of its controller's callbacks)."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            if failures.is_retry_pointless(worker_exceptions[rank]):
                raise StopTraining(failures.root_cause(worker_exceptions[rank]))


def fit(loop_config: LoopConfig, num_workers: int, storage_path: Path, name: str, retries: int = 0,
        gpus_per_worker: float | None = None) -> None:
    """Run the training loop on `num_workers` Ray Train workers.

    A worker that dies makes Ray Train start the group again, up to `retries` times;
    the loop then resumes from its last in-training checkpoint (stages/train/checkpoint.py).
    `gpus_per_worker` None: one GPU each on a GPU cluster, none on CPUs.
    """
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if cluster_gpu_count() else 0.0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop_config},
        scaling_config=scaling_config(num_workers, gpus_per_worker),
        run_config=RunConfig(name=name, storage_path=os.fspath(storage_path),
                             failure_config=FailureConfig(max_failures=retries),
                             callbacks=[NoPointlessRetries()],
                             worker_runtime_env={"env_vars": worker_env()}),
    )
    trainer.fit()


def reference_job(plan) -> ReferenceJob | None:
    """The reference stage for the workers to run first, when the driver left it to them
    (pools/reference_lists.py, scored_in_train_workers); None when it is done."""
    if plan.round.is_done("reference"):
        return None
    rows, current = reference_inputs(plan.run, plan.round, plan.config.train.replay)
    out_dir = plan.round.begin_stage("reference")
    return ReferenceJob(rows, current, plan.reference, plan.round, str(out_dir), plan.config.reference.batch_size)


def run_stage(plan, out_dir: Path) -> dict[str, Any]:
    config = plan.config
    reference = reference_job(plan)
    loop_config = LoopConfig(train=config.train, seed=derive_seed(config.seed, "train", plan.round.number),
                             policy_in=plan.policy_in, trust_remote_code=config.model.trust_remote_code,
                             train_shard=str(plan.round.train / shard_name(0)), output_dir=str(out_dir),
                             reference=reference)
    fit(loop_config, config.train.num_workers, plan.run.dir / ".ray_train", f"round_{plan.round.number:03d}",
        config.worker_retries, layout_of(plan).train_worker)
    if not (out_dir / "config.json").is_file():
        raise RuntimeError(f"training finished without writing a checkpoint to {out_dir}")
    if reference and not plan.round.is_done("reference"):
        raise RuntimeError(f"the train workers scored the reference but left no {plan.round.done_marker('reference')}")
    # The reference stage's seconds are inside this stage's wall time (bench/round_breakdown.py).
    inside = {"reference_seconds_inside": plan.round.stage_stats("reference")["wall_seconds"]} if reference else {}
    history = [json.loads(line) for line in (out_dir / "training_log.jsonl").read_text().splitlines()]
    # Not part of the checkpoint: its numbers go into the stage's stats.
    timings_file = out_dir / TIMINGS_FILE
    if timings_file.is_file():
        timing.add(json.loads(timings_file.read_text()))
        timings_file.unlink()
    else:
        # Not worth failing the round over: only the train stage's time breakdown is lost.
        log.warning("training wrote no %s: the breakdown of the train stage will be missing (its start-up, "
                    "work and save seconds stay 0, and bench/round_breakdown.py would count all of train as "
                    "Ray & orchestration)", timings_file)
    return {**summarize(history), "objective": config.train.objective, "policy_in": plan.policy_in, **inside}
