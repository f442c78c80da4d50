"""The reward scorer pool: reward models in Ray actors, scoring candidates in length-sorted batches.

Rerank scores a round's candidates through `score_candidates`, evaluate the
held-out answers; each hands back the rewards and leaves the rows to its stage.
A reward actor that dies is replaced by the driver and sent again the batches it
had not answered, up to `worker_retries` times (core/retries.py).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import ray

from core import timing
from core.config import RewardConfig
from core.errors import PipelineError
from core.gpu_layout import hide_unassigned_gpus, where_this_runs
from core.retries import WorkerRetries, worker_died
from rewards import Sample, build_reward_from_config
from rewards.base import needs_whole_prompts


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

    def counts(self) -> dict[str, int]:
        """What the reward counted, a composite's components' summed: `comparisons` of a pairwise
        reranker, and whatever a reward's `counters()` returns (an LLM judge's judge_calls...)."""
        rewards = [self.reward, *(part for _, part in getattr(self.reward, "parts", []))]
        counted = {"comparisons": sum(int(getattr(reward, "comparisons", 0)) for reward in rewards)}
        for reward in rewards:
            counters = getattr(reward, "counters", None)
            for key, value in (counters() if callable(counters) else {}).items():
                counted[key] = counted.get(key, 0) + int(value)
        return counted

    def where(self) -> str:
        return self.placement


def reward_actor_options(num_gpus: float) -> dict[str, Any]:
    """What a reward actor asks of Ray: `num_gpus` GPUs (none: it hides every GPU from itself,
    RewardWorker). Ray does not start it again when it dies: score_candidates does, so that the
    retry is logged and counted like any worker's."""
    return {"num_gpus": num_gpus}


def score_candidates(rows: list[dict[str, Any]], reward_config: RewardConfig, retries: WorkerRetries | None = None,
                     num_gpus: float = 0.0, tally: dict[str, int] | None = None) -> list[float]:
    """Rewards for candidate rows, in order, as the reward model returns them (NaN included).

    Batches hold responses of similar length (less padding for a neural
    reward) and go round-robin to `reward.num_actors` Ray actors, each holding
    `num_gpus` (the round's GpuLayout.reward_actor). `retries` replaces the actors
    that die (the stage's, counted in its statistics); without it a death fails the call.
    A reward that compares candidates gets each prompt's candidates in one batch
    (`batch_rows`). `tally` receives what the rewards counted (`comparisons` of a pairwise one, a
    reward's `counters()`: RewardWorker.counts).
    """
    if not rows:
        return []
    retries = retries if retries is not None else WorkerRetries("score", "reward_actor", 0)
    batches = batch_rows([row["prompt_id"] for row in rows], [len(row["response"]) for row in rows],
                         reward_config.batch_size, whole_prompts=needs_whole_prompts(reward_config))
    actors = RewardActors(reward_config, num_gpus, min(reward_config.num_actors, len(batches)))
    try:
        results = actors.score([[to_sample(rows[i]) for i in batch] for batch in batches], retries)
        counted = actors.report()
    finally:
        actors.kill()
    if tally is not None:
        for key, value in counted.items():
            tally[key] = tally.get(key, 0) + value
    rewards = [math.nan] * len(rows)
    for batch, scores in zip(batches, results, strict=True):
        if len(scores) != len(batch):
            raise PipelineError(f"reward '{reward_config.name}' returned {len(scores)} rewards "
                                f"for a batch of {len(batch)} samples")
        for i, reward in zip(batch, scores):
            rewards[i] = reward
    return rewards


def batch_rows(prompt_ids: list[str], lengths: list[int], size: int, whole_prompts: bool) -> list[list[int]]:
    """Row indices in batches of about `size`, of similar lengths (less padding for a neural reward).

    With `whole_prompts`, a prompt's rows are never split: prompts, ordered by their longest
    answer, are packed whole into batches of up to `size` rows, and a prompt with more rows
    than `size` is a batch of its own."""
    if not whole_prompts:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return [order[i:i + size] for i in range(0, len(order), size)]
    groups: dict[str, list[int]] = {}
    for i, prompt_id in enumerate(prompt_ids):
        groups.setdefault(prompt_id, []).append(i)
    batches: list[list[int]] = []
    for group in sorted(groups.values(), key=lambda g: max(lengths[i] for i in g)):
        if batches and len(batches[-1]) + len(group) <= size:
            batches[-1].extend(group)
        else:
            batches.append(list(group))
    return batches


class RewardActors:
    """The reward actors of one call: batch n goes to slot n mod count, whose actor is replaced
    when it dies."""

    def __init__(self, reward_config: RewardConfig, num_gpus: float, count: int):
        self.reward_config, self.num_gpus = reward_config, num_gpus
        self.slots = [self.start() for _ in range(count)]
        self.started = list(self.slots)  # the dead ones too: each is killed at the end

    def start(self) -> Any:
        return RewardWorker.options(**reward_actor_options(self.num_gpus)).remote(self.reward_config)

    def score(self, batches: list[list[Sample]], retries: WorkerRetries) -> list[list[float]]:
        """Each batch's rewards, in order. A dead actor's unanswered batches all fail: the first
        counts its death and starts another; each is sent again to the slot's new actor."""
        pending: dict[Any, tuple[int, Any]] = {}

        def send(n: int) -> None:
            actor = self.slots[n % len(self.slots)]
            pending[actor.score.remote(batches[n])] = (n, actor)

        for n in range(len(batches)):
            send(n)
        results: dict[int, list[float]] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            n, actor = pending.pop(ready[0])
            try:
                results[n] = ray.get(ready[0])
            except Exception as exc:
                if not worker_died(exc):
                    raise  # the reward's own error: another actor would raise it too
                self.replace(n % len(self.slots), actor, retries, exc)
                send(n)
        return [results[n] for n in range(len(batches))]

    def replace(self, slot: int, dead: Any, retries: WorkerRetries, exc: BaseException) -> None:
        if self.slots[slot] is not dead:
            return  # replaced already, at the first of its batches that failed
        retries.died(f"reward actor {slot}", exc)
        self.slots[slot] = self.start()
        self.started.append(self.slots[slot])

    def report(self) -> dict[str, int]:
        """The actors' timings and placements into the stage's log; what their rewards counted, summed."""
        timing.add_slowest(ray.get([actor.timings.remote() for actor in self.slots]))
        for n, where in enumerate(ray.get([actor.where.remote() for actor in self.slots])):
            # Into the stage's log (stderr is captured there), not onto the terminal.
            print(f"reward actor {n} ({self.reward_config.name}) ran on {where}", file=sys.stderr, flush=True)
        counted: dict[str, int] = {}
        for counts in ray.get([actor.counts.remote() for actor in self.slots]):
            for key, value in counts.items():
                counted[key] = counted.get(key, 0) + value
        return counted

    def kill(self) -> None:
        for actor in self.started:
            ray.kill(actor)


def to_sample(row: dict[str, Any]) -> Sample:
    return Sample(row["prompt_id"], row["prompt"], row["response"], json.loads(row["metadata"]))
