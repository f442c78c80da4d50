"""Rerank: score every candidate with the reward model and build ranked lists.

A list row holds one prompt's positives and hard negatives, each best-first,
with every positive's reward at least every negative's. Prompts whose
candidates all score the same carry no ranking signal: they are left out and
counted.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import ray

from pipeline import schema
from pipeline.layout import read_parquet_dir, shard_name, write_parquet
from rewards import Sample, build_reward_from_config

ITEM_FIELDS = ("response", "sample_index", "round", "num_tokens")


@ray.remote
class RewardWorker:
    """Owns one reward model; scores batches of samples."""

    def __init__(self, reward_config):
        self.reward = build_reward_from_config(reward_config)

    def score(self, samples: list[Sample]) -> list[float]:
        return [float(r) for r in self.reward.score(samples)]


def score_candidates(rows: list[dict[str, Any]], reward_config) -> list[float]:
    """Rewards for candidate rows, in order, scored in batches by one Ray actor."""
    batch_size = reward_config.batch_size
    worker = RewardWorker.remote(reward_config)
    try:
        samples = [Sample(r["prompt_id"], r["prompt"], r["response"], json.loads(r["metadata"])) for r in rows]
        batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
        results = ray.get([worker.score.remote(batch) for batch in batches])
    finally:
        ray.kill(worker)
    return [reward for batch in results for reward in batch]


def top_rest(items: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """The best item is the positive; every other item is a negative, hardest first."""
    return items[:1], items[1:]


LIST_STRATEGIES: dict[str, Callable[[list[dict]], tuple[list[dict], list[dict]]]] = {
    "top_rest": top_rest,
}


def build_lists(scored: list[dict[str, Any]], strategy: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Group scored candidates by prompt and split each group into positives and negatives.

    `scored` rows are candidate rows with a `reward`. Items are sorted by
    reward, best first; equal rewards keep sample order so the result is
    deterministic.
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in scored:
        groups[row["prompt_id"]].append(row)
    split = LIST_STRATEGIES[strategy]
    lists, all_tied = [], 0
    for prompt_id, rows in groups.items():
        rows = sorted(rows, key=lambda r: (-r["reward"], r["round"], r["sample_index"]))
        if rows[0]["reward"] == rows[-1]["reward"]:
            all_tied += 1
            continue
        items = [{**{k: r[k] for k in ITEM_FIELDS}, "reward": r["reward"]} for r in rows]
        positives, negatives = split(items)
        lists.append({"prompt_id": prompt_id, "prompt": rows[0]["prompt"], "positives": positives,
                      "negatives": negatives, "metadata": rows[0]["metadata"]})
    return lists, {"prompts": len(groups), "lists": len(lists), "all_tied_dropped": all_tied}


def run_stage(plan, out_dir: Path) -> dict[str, Any]:
    config = plan.config
    candidates = read_parquet_dir(plan.round.candidates).to_pylist()
    rewards = score_candidates(candidates, config.reward)
    scored = [{**row, "reward": reward} for row, reward in zip(candidates, rewards, strict=True)]
    lists, counts = build_lists(scored, config.lists.strategy)
    write_parquet(pa.Table.from_pylist(lists, schema=schema.LISTS), out_dir / shard_name(0))
    return {**counts, "candidates": len(candidates), **reward_summary(rewards)}


def reward_summary(rewards: list[float]) -> dict[str, float]:
    ordered = sorted(rewards)
    return {
        "reward_mean": round(sum(ordered) / len(ordered), 4),
        "reward_min": ordered[0],
        "reward_median": ordered[len(ordered) // 2],
        "reward_max": ordered[-1],
    }
