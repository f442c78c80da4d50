"""Reference log-probs of every list item, stored beside the lists.

The trainer then holds no reference model: it reads `ref_logp` from the
train shard. Scoring runs in one Ray task through the log-prob scorer the
trainer uses (pools/logprob_scorer.py), with its dtype and batch layout
(`train.share_prompt`), so that log pi_theta - log pi_ref is zero, to fp32
rounding, before the first update.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from pipeline import schema, timing
from pipeline.hardware import cluster_has_gpus
from pipeline.layout import EARLIER_ROUNDS, read_parquet_dir, shard_name, write_parquet
from pools.logprob_scorer import score_items


def replayed_lists(plan) -> list[dict[str, Any]]:
    """The lists of the earlier rounds `train.replay` names, each row marked with its round."""
    rows = []
    for earlier in EARLIER_ROUNDS[plan.config.train.replay](plan.round.number):
        rows += [{**row, "round": earlier} for row in read_parquet_dir(plan.run.round(earlier).lists).to_pylist()]
    return rows


def run_stage(plan, out_dir: Path) -> dict[str, Any]:
    config = plan.config
    with timing.timed("io"):
        current = [{**row, "round": plan.round.number} for row in read_parquet_dir(plan.round.lists).to_pylist()]
        # Scored below under this round's reference, as the current lists are: the log-probs
        # stored with them in their own round were under that round's reference.
        rows = current + replayed_lists(plan)
    lists = [(row["prompt"], [item["response"] for item in row["positives"] + row["negatives"]]) for row in rows]
    gpus = 1 if cluster_has_gpus() else 0
    logps: list[list[float]] = []
    if rows:
        # Ray runs the task again in a new process when its process dies (a system failure).
        logps, seconds = ray.get(score_items.options(num_gpus=gpus, max_retries=config.worker_retries).remote(
            plan.reference, lists, config.train.dtype, config.train.max_length, config.reference.batch_size,
            config.train.logprob_chunk_size, config.model.trust_remote_code, config.train.autocast,
            config.train.share_prompt))
        timing.add(seconds)
    for row, values in zip(rows, logps):
        values = iter(values)
        row["positives"] = [{**item, "ref_logp": next(values)} for item in row["positives"]]
        row["negatives"] = [{**item, "ref_logp": next(values)} for item in row["negatives"]]
        row["reference"] = plan.reference
    with timing.timed("io"):
        write_parquet(pa.Table.from_pylist(rows, schema=schema.TRAIN), out_dir / shard_name(0))
    return {"lists": len(rows), "lists_current": len(current), "lists_replayed": len(rows) - len(current),
            "items": sum(len(responses) for _, responses in lists), "reference": plan.reference}
