"""The reference stage run inside the train workers (`reference.in_train_workers`; the round plan's
`reference_in_train_workers`, decided at planning by placement.py).

Where the reference is the round's starting policy, the model the workers load
to train is the reference until the first step. Scoring the lists with it there
saves the reference stage's own model load and process start, and gives the
same log-probs: the same loader and LogprobSpec (dtype, batch layout, autocast;
pools/logprob_scorer.py). The workers share the batches and rank 0 gathers
their log-probs; it writes `train/part-00000.parquet` and the
reference stage's done marker before any worker reads the shard to train, so
resume and `inspect` see what a separate reference stage leaves; a restarted
worker group finds the marker and goes straight to training.

Under FSDP (`train.sharding: fsdp`) the workers score once the model is
sharded, so that no worker holds the whole model (stages/train/loop.py,
`set_up`); every forward is then a collective, and a worker with fewer batches
runs a short one again, unscored, until all have run as many. The sharded model
computes in FSDP's mixed precision (`mixed_precision`): with bf16 autocast its
weights are bf16 copies, so the log-probs are the ones the workers' policy
computes at step 0 rather than, to the last bf16 rounding, a separate
reference stage's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from core.layout import RoundLayout
from core.timing import Timings
from pools.logprob_scorer import LogprobSpec, merge_parts, score_with
from stages.reference.lists import items_to_score, reference_stats, with_reference, write_train_shard


@dataclass(frozen=True)
class ReferenceJob:
    """What the workers score (the rows the reference stage would) and where it goes."""

    rows: list[dict[str, Any]]
    current: int          # how many rows are the round's own lists (the rest are replayed)
    reference: str        # the checkpoint: the round's starting policy
    round: RoundLayout
    out_dir: str          # the reference stage's train.partial/
    batch_size: int       # reference.batch_size
    trust_remote_code: bool = False  # model.trust_remote_code, as the workers loaded the model

    def pending(self) -> bool:
        return not self.round.is_done("reference")

    def spec(self, train) -> LogprobSpec:
        """The reference stage's LogprobSpec (LogprobSpec.of), from the train config the workers hold."""
        return LogprobSpec.of_train(train, self.batch_size, self.trust_remote_code)


def score_reference(job: ReferenceJob, model, tokenizer, train, rank: int, world: int, clock: Timings,
                    started: float, sharded: bool = False) -> None:
    """Score `job` with the freshly loaded `model` (`sharded`: by FSDP across the workers); rank 0
    finishes the reference stage.

    `clock` already holds the model load (the stage's start-up) and `started` is when it began.
    """
    with clock.active():
        logps = score_part(job, model, tokenizer, train, rank, world, sharded)
        if rank == 0:
            write_train_shard(with_reference(job.rows, logps, job.reference), Path(job.out_dir))
    if rank == 0:
        import psutil

        stats = {**reference_stats(job.rows, job.current, job.reference), "in_train_workers": True,
                 "wall_seconds": round(time.perf_counter() - started, 2), **clock.stats(),
                 # Sampled once, at its end: the stage has no memory monitor of its own here.
                 "peak_memory_gib": round(psutil.virtual_memory().used / 2**30, 2)}
        job.round.finish_stage("reference", stats)
    if world > 1:
        dist.barrier()  # the others read the shard rank 0 has just written


def score_part(job: ReferenceJob, model, tokenizer, train, rank: int, world: int,
               sharded: bool = False) -> list[list[float]]:
    """Every rank scores its share of the batches; rank 0 gets all the log-probs, the others []."""
    if not job.rows:
        return []
    mine = score_with(job.spec(train), model, tokenizer, items_to_score(job.rows), part=(rank, world),
                      collective=sharded)
    if world == 1:
        return merge_parts([mine])
    parts = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return merge_parts(parts) if rank == 0 else []
