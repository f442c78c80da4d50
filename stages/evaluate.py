"""Evaluate: one response per held-out prompt from the new policy, scored by the reward."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline import schema
from pipeline.layout import read_parquet_dir, shard_name, write_parquet
from pipeline.prompts import Prompt
from stages.generate import SamplingSpec, generate_shards
from stages.rerank import score_candidates


def eval_rows(prompts: list[Prompt], outputs: list[list[dict]], round_number: int, policy: str) -> list[dict]:
    return [{"prompt_id": p.prompt_id, "prompt": p.messages, "response": out[0]["text"], "reward": None,
             "num_tokens": out[0]["num_tokens"], "round": round_number, "policy": policy,
             "metadata": json.dumps(p.metadata, sort_keys=True)}
            for p, out in zip(prompts, outputs, strict=True)]


def eval_metrics(rewards: list[float], num_tokens: list[int]) -> dict[str, float]:
    """Mean reward, share of responses that meet every constraint (reward 1), mean length."""
    n = len(rewards)
    return {"eval_prompts": n, "reward_mean": sum(rewards) / n,
            "pass_rate": sum(r >= 1.0 for r in rewards) / n, "response_tokens_mean": sum(num_tokens) / n}


def run_stage(plan, out_dir: Path) -> dict[str, Any]:
    config = plan.config
    if not plan.heldout:
        write_parquet(pa.Table.from_pylist([], schema=schema.EVAL), out_dir / shard_name(0))
        return {"eval_prompts": 0}
    policy = str(plan.round.policy)
    spec = SamplingSpec(1, config.evaluate.temperature, 1.0, config.evaluate.max_tokens)
    samples_dir = out_dir / "samples"

    def make_table(prompts: list[Prompt], outputs: list[list[dict]]) -> pa.Table:
        return pa.Table.from_pylist(eval_rows(prompts, outputs, plan.round.number, policy), schema=schema.EVAL)

    stats = generate_shards(plan.heldout, policy, spec, config, samples_dir, config.seed, make_table)
    rows = read_parquet_dir(samples_dir).to_pylist()
    rewards = score_candidates(rows, config.reward)
    for row, reward in zip(rows, rewards, strict=True):
        row["reward"] = reward
    write_parquet(pa.Table.from_pylist(rows, schema=schema.EVAL), out_dir / shard_name(0))
    shutil.rmtree(samples_dir)
    return {**eval_metrics(rewards, [r["num_tokens"] for r in rows]), **stats, "policy": policy}
