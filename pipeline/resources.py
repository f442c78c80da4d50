"""Requests a Ray cluster cannot meet, found before any stage runs.

Ray queues a request for resources that never come (a Ray Train worker group
waits for its workers forever), so a round that asks for more workers, actors or
GPUs than the cluster has is refused at the start instead, with the key to change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from core.errors import PipelineError


def resource_problems(config, resources: Mapping[str, float]) -> list[str]:
    """One sentence per config key whose request exceeds `resources` (ray.cluster_resources())."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    have = f"the cluster has {cpus:g} CPUs and {gpus:g} GPUs"
    problems = []
    train, gen, reward = config.train, config.generate, config.reward
    # Each Ray Train worker takes a GPU where there are GPUs, else at least one CPU (stages/train/stage.py).
    if gpus and train.num_workers > gpus:
        problems.append(f"'train.num_workers' is {train.num_workers}, one GPU each, but {have}")
    elif not gpus and train.num_workers > cpus:
        problems.append(f"'train.num_workers' is {train.num_workers}, one CPU each at least, but {have}")
    # Each engine holds one CPU, and tensor_parallel_size GPUs on GPU hosts (stages/generate.py).
    if gpus and gen.num_actors * gen.tensor_parallel_size > gpus:
        problems.append(f"'generate.num_actors' x 'generate.tensor_parallel_size' is "
                        f"{gen.num_actors} x {gen.tensor_parallel_size} GPUs, but {have}")
    if gen.num_actors > cpus:
        problems.append(f"'generate.num_actors' is {gen.num_actors}, one CPU each, but {have}")
    if not gpus and gen.tensor_parallel_size > 1:
        problems.append(f"'generate.tensor_parallel_size' is {gen.tensor_parallel_size}, which needs GPUs, but {have}")
    # auto asks for what the cluster has (core/gpu_layout.py); only a number can ask too much.
    if reward.num_gpus_per_actor not in ("auto", 0) and reward.num_actors * reward.num_gpus_per_actor > gpus:
        problems.append(f"'reward.num_actors' x 'reward.num_gpus_per_actor' is {reward.num_actors} x "
                        f"{reward.num_gpus_per_actor:g} GPUs, but {have}")
    return problems


def check_resources(config, resources: Mapping[str, float]) -> None:
    problems = resource_problems(config, resources)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PipelineError(f"config key {problems[0]}: lower it or add nodes{more}")


def wait_for_resources(config, cluster_resources: Callable[[], Mapping[str, float]],
                       clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                       poll_seconds: float = 5.0) -> None:
    """check_resources, giving an autoscaling cluster `resources_wait_seconds` to grow first."""
    deadline = clock() + config.resources_wait_seconds
    while resource_problems(config, cluster_resources()) and clock() < deadline:
        sleep(min(poll_seconds, max(0.0, deadline - clock())))
    check_resources(config, cluster_resources())
