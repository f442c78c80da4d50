"""The reference stage run as a stage of its own: one Ray task scores the lists (task.py).

Scoring uses the log-prob scorer the trainer uses (pools/logprob_scorer.py),
with its dtype and batch layout (`train.share_prompt`), so that
log pi_theta - log pi_ref is zero, to fp32 rounding, before the first update.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.gpu_layout import layout_of
from core.retries import WorkerRetries
from pools.logprob_scorer import LogprobSpec
from stages.reference.lists import items_to_score, reference_inputs, reference_stats, with_reference, write_train_shard
from stages.reference.task import score_in_task


def run_stage(plan, out_dir: Path) -> dict[str, Any]:
    config = plan.config
    rows, current = reference_inputs(plan.run, plan.round, config.train.replay)
    retries = WorkerRetries(stage="reference", kind="reference_task", limit=config.worker_retries)
    logps: list[list[float]] = []
    if rows:
        # One GPU, or beside a kept engine what it leaves of one (core/gpu_layout.py).
        logps = score_in_task(plan.reference, items_to_score(rows), LogprobSpec.of(config),
                              layout_of(plan).reference, retries)
    write_train_shard(with_reference(rows, logps, plan.reference), out_dir)
    return {**reference_stats(rows, current, plan.reference), **retries.stats()}
