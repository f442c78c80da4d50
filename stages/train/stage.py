"""Train stage entry: run the LarPO loop under Ray Train and leave policy N as an HF checkpoint."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from core import timing
from core.gpu_layout import cluster_gpu_count, layout_of
from core.layout import shard_name
from core.retries import WorkerRetries, worker_died
from core.seeds import derive_seed
from stages.reference.in_train_workers import ReferenceJob
from stages.reference.lists import reference_inputs
from stages.train.loop import TIMINGS_FILE, LoopConfig, summarize, train_loop_per_worker

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
    buffers of 2 MiB and more. Off by default: where it was measured, it saved some of
    the trainer's peak memory at equal speed on one machine, and slowed training and
    reference scoring badly on others (docs/benchmarks.md, "Allocator setting"), so it is for a user
    who is short of memory to turn on. It must be in the environment before torch starts,
    so it goes into the workers' runtime env rather than os.environ.
    """
    return {"THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0")}


def fit(loop_config: Any, num_workers: int, storage_path: Path, name: str, retries: int = 0,
        gpus_per_worker: float | None = None, train_loop: Callable[[dict], None] = train_loop_per_worker
        ) -> dict[str, int]:
    """Run `train_loop` (one Ray Train worker's; given `{"loop": loop_config}`) on `num_workers` workers;
    the retries' statistics.

    A worker that dies ends the group's fit; the driver starts a fresh group, up to `retries` times
    (core/retries.py), and the loop resumes from its own last in-training checkpoint
    (stages/train/checkpoint.py), not from Ray Train's. Ray Train retries nothing itself: any other
    error (a full disk, TrainingDiverged, a bug) would only come back, so it ends the stage at once.
    `gpus_per_worker` None: one GPU each on a GPU cluster, none on CPUs.
    """
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if cluster_gpu_count() else 0.0

    def fit_once() -> None:
        before = placement_groups()
        try:
            TorchTrainer(
                train_loop,
                train_loop_config={"loop": loop_config},
                scaling_config=scaling_config(num_workers, gpus_per_worker),
                run_config=RunConfig(name=name, storage_path=os.fspath(storage_path),
                                     failure_config=FailureConfig(max_failures=0),
                                     worker_runtime_env={"env_vars": worker_env()}),
            ).fit()
        except Exception as exc:
            if worker_died(exc):
                # Ray Train shuts a group down through its workers, so a group with a dead worker
                # keeps its placement group, and the next group would wait for its GPUs forever.
                release(placement_groups() - before)
            raise

    group = WorkerRetries(stage="train", kind="train_group", limit=retries)
    group.run("Ray Train worker group", fit_once)
    return group.stats()


def placement_groups() -> set[str]:
    """The ids of the cluster's placement groups that hold (or wait for) resources."""
    return {pg_id for pg_id, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}


def release(pg_ids: set[str]) -> None:
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id in pg_ids:
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))


def reference_job(plan) -> ReferenceJob | None:
    """The reference stage for the workers to run first, where the plan leaves it to them
    (`reference_in_train_workers`, decided at planning); None otherwise, or when it is done."""
    if not plan.reference_in_train_workers or plan.round.is_done("reference"):
        return None
    rows, current = reference_inputs(plan.run, plan.round, plan.config.train.replay)
    out_dir = plan.round.begin_stage("reference")
    return ReferenceJob(rows, current, plan.reference, plan.round, str(out_dir), plan.config.reference.batch_size,
                        plan.config.model.trust_remote_code)


def run_stage(plan, out_dir: Path) -> dict[str, Any]:
    config = plan.config
    reference = reference_job(plan)
    loop_config = LoopConfig(train=config.train, seed=derive_seed(config.seed, "train", plan.round.number),
                             policy_in=plan.policy_in, trust_remote_code=config.model.trust_remote_code,
                             train_shard=str(plan.round.train / shard_name(0)), output_dir=str(out_dir),
                             reference=reference)
    retries = fit(loop_config, config.train.num_workers, plan.run.dir / ".ray_train",
                  f"round_{plan.round.number:03d}", config.worker_retries, layout_of(plan).train_worker)
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
    return {**summarize(history), "objective": config.train.objective, "policy_in": plan.policy_in, **inside,
            **retries}
