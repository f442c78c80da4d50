"""The reward scorer pool: reward models in Ray actors, scoring candidates in length-sorted batches.

Rerank scores a round's candidates through `score_candidates`, evaluate the
held-out answers.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import ray

from core import timing
from core.errors import PipelineError
from core.gpu_layout import hide_unassigned_gpus, where_this_runs
from rewards import Sample, build_reward_from_config


@ray.remote
class RewardWorker:
    """Owns one reward model; scores batches of samples."""

    def __init__(self, reward_config):
        self.clock = timing.Timings()
        with self.clock("startup"):
            hide_unassigned_gpus()
            import torch

            self.placement = where_this_runs()
            # Ray gives an actor OMP_NUM_THREADS=1; a model reward on a CPU host should
            # share the cores with the other reward actors instead.
            if not torch.cuda.is_available():
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // reward_config.num_actors))
            self.reward = build_reward_from_config(reward_config)

    def score(self, samples: list[Sample]) -> list[float]:
        with self.clock("work"):
            return [float(r) for r in self.reward.score(samples)]

    def timings(self) -> dict[str, float]:
        return self.clock.seconds

    def where(self) -> str:
        return self.placement


def reward_actor_options(num_gpus: float, retries: int) -> dict[str, Any]:
    """What a reward actor asks of Ray: `num_gpus` GPUs (none: it hides every GPU from itself,
    RewardWorker), and to be started again when its process dies."""
    return {"num_gpus": num_gpus, "max_restarts": retries, "max_task_retries": retries}


def score_candidates(rows: list[dict[str, Any]], reward_config, retries: int = 0, num_gpus: float = 0.0
                     ) -> list[float]:
    """Rewards for candidate rows, in order, as the reward model returns them (NaN included).

    Batches hold responses of similar length (less padding for a neural
    reward) and go round-robin to `reward.num_actors` Ray actors, each holding
    `num_gpus` (the round's GpuLayout.reward_actor).
    """
    if not rows:
        return []
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["response"]))
    size = reward_config.batch_size
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    # A reward actor whose process dies is started again by Ray (its model reloaded), and the
    # batches it had not answered are sent to it again: up to `retries` times each.
    workers = [RewardWorker.options(**reward_actor_options(num_gpus, retries)).remote(reward_config)
               for _ in range(min(reward_config.num_actors, len(batches)))]
    try:
        futures = [workers[n % len(workers)].score.remote([to_sample(rows[i]) for i in batch])
                   for n, batch in enumerate(batches)]
        results = ray.get(futures)
        timing.add_slowest(ray.get([worker.timings.remote() for worker in workers]))
        for n, where in enumerate(ray.get([worker.where.remote() for worker in workers])):
            # Into the stage's log (stderr is captured there), not onto the terminal.
            print(f"reward actor {n} ({reward_config.name}) ran on {where}", file=sys.stderr, flush=True)
    finally:
        for worker in workers:
            ray.kill(worker)
    rewards = [math.nan] * len(rows)
    for batch, scores in zip(batches, results, strict=True):
        if len(scores) != len(batch):
            raise PipelineError(f"reward '{reward_config.name}' returned {len(scores)} rewards "
                                f"for a batch of {len(batch)} samples")
        for i, reward in zip(batch, scores):
            rewards[i] = reward
    return rewards


def to_sample(row: dict[str, Any]) -> Sample:
    return Sample(row["prompt_id"], row["prompt"], row["response"], json.loads(row["metadata"]))
