"""Reference log-probs of every list item, stored beside the lists.

The trainer then holds no reference model: it reads `ref_logp` from the
train shard. Scoring runs in one Ray task through the log-prob scorer the
trainer uses (pools/logprob_scorer.py), with its dtype and batch layout
(`train.share_prompt`), so that log pi_theta - log pi_ref is zero, to fp32
rounding, before the first update. Where the reference is the policy the
round trains (`reference.in_train_workers`), the train stage's workers do
this instead, from the model they load anyway (stages/train/stage.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from core import timing
from core.gpu_layout import layout_of
from pools.logprob_scorer import score_items
from pools.reference_lists import items_to_score, reference_inputs, reference_stats, with_reference, write_train_shard


def run_stage(plan, out_dir: Path) -> dict[str, Any]:
    config = plan.config
    rows, current = reference_inputs(plan.run, plan.round, config.train.replay)
    # One GPU, or beside a kept engine what it leaves of one (core/gpu_layout.py).
    gpus = layout_of(plan).reference
    logps: list[list[float]] = []
    if rows:
        # Ray runs the task again in a new process when its process dies (a system failure).
        logps, seconds = ray.get(ray.remote(score_items).options(num_gpus=gpus, max_retries=config.worker_retries).remote(
            plan.reference, items_to_score(rows), config.train.dtype, config.train.max_length,
            config.reference.batch_size, config.train.logprob_chunk_size, config.model.trust_remote_code,
            config.train.autocast, config.train.share_prompt))
        timing.add(seconds)
    write_train_shard(with_reference(rows, logps, plan.reference), out_dir)
    return reference_stats(rows, current, plan.reference)
