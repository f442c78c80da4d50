"""reference.in_train_workers: the train workers' reference scoring leaves what the reference stage would.

The same lists (this round's and replayed ones) scored by the reference stage's
Ray task and by `score_reference` on a model loaded the way a train worker
loads it: equal rows and log-probs, and a done marker that later stages and
`inspect` read as the reference stage's.
"""

import os
import socket
import time
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from core.layout import RunLayout, shard_name
from core.timing import Timings
from pipeline.settings import load_config
from pools.logprob_scorer import load_policy, merge_parts, score_lists
from stages.reference import stage as reference
from stages.reference.in_train_workers import ReferenceJob, score_reference
from stages.reference.lists import reference_inputs
from stages.reference.placement import scored_in_train_workers
from tests.test_replay import item_logps, other_reference, write_lists  # noqa: F401 (fixtures)


def test_workers_score_the_reference_as_the_reference_stage_does(tmp_path, other_reference, local_ray):
    config = load_config("configs/smoke.yaml", ["train.replay=previous"])
    separate, fused = RunLayout.at(tmp_path, "separate"), RunLayout.at(tmp_path, "fused")
    for run in (separate, fused):
        write_lists(run, 1), write_lists(run, 2)

    plan = SimpleNamespace(config=config, run=separate, round=separate.round(2), reference=str(other_reference),
                           engines=None)
    out_dir = separate.round(2).begin_stage("reference")
    stats = reference.run_stage(plan, out_dir)
    expected = pq.read_table(out_dir / shard_name(0)).to_pylist()

    rows, current = reference_inputs(fused, fused.round(2), config.train.replay)
    job = ReferenceJob(rows, current, str(other_reference), fused.round(2),
                       str(fused.round(2).begin_stage("reference")), config.reference.batch_size)
    assert job.pending()
    clock, started = Timings(), time.perf_counter()
    with clock("startup"):
        model, tokenizer = load_policy(str(other_reference), config.train.dtype)
    score_reference(job, model, tokenizer, config.train, rank=0, world=1, clock=clock, started=started)

    assert not job.pending()
    got = pq.read_table(fused.round(2).train / shard_name(0)).to_pylist()
    assert [(r["prompt_id"], r["round"]) for r in got] == [(r["prompt_id"], r["round"]) for r in expected]
    for ours, theirs in zip(got, expected, strict=True):
        assert item_logps(ours) == pytest.approx(item_logps(theirs), abs=1e-5)
        assert ours["reference"] == theirs["reference"] == str(other_reference)
    marker = fused.round(2).stage_stats("reference")
    assert marker["in_train_workers"] is True
    assert {k: marker[k] for k in ("lists", "lists_current", "lists_replayed", "items")} == \
        {k: stats[k] for k in ("lists", "lists_current", "lists_replayed", "items")}
    assert marker["startup_seconds"] > 0 and marker["wall_seconds"] >= marker["startup_seconds"]
    fused.round(2).check_output("reference")  # the file list a later stage checks against


@pytest.mark.parametrize("overrides, policy_in, reference_path, fused", [
    ([], "policy-1", "policy-1", True),
    (["reference.in_train_workers=false"], "policy-1", "policy-1", False),
    # reference.policy=initial from round 2 on: the reference is not the model the workers train.
    (["reference.policy=initial"], "policy-1", "base", False),
])
def test_only_a_reference_equal_to_the_starting_policy_is_scored_in_the_workers(overrides, policy_in,
                                                                                 reference_path, fused):
    plan = SimpleNamespace(config=load_config("configs/smoke.yaml", overrides), policy_in=policy_in,
                           reference=reference_path)
    assert scored_in_train_workers(plan) is fused


def test_parts_of_the_batches_join_to_the_scores_of_one_scorer(tiny_model):
    train = load_config("configs/smoke.yaml").train
    model, tokenizer = load_policy(str(tiny_model), train.dtype)
    lists = [([{"role": "user", "content": f"Say {i}."}], [f"Answer {j}. " * (i + 1) for j in range(2 + i % 2)])
             for i in range(7)]
    lists.append(([{"role": "user", "content": "Nothing."}], []))  # no items: nothing to score, in every part

    def score(part):
        return score_lists(model, tokenizer, lists, train.max_length, 3, train.logprob_chunk_size, part=part)

    whole = merge_parts([score((0, 1))])
    parts = [score((rank, 3)) for rank in range(3)]
    assert all(any(logps is not None and logps for logps in part) for part in parts)  # every rank had work
    assert merge_parts(parts) == whole  # the same batches, so the very same numbers
    assert whole[-1] == [] and all(len(logps) == len(items) for logps, (_, items) in zip(whole, lists))


def test_merging_parts_refuses_a_list_scored_twice_or_never():
    with pytest.raises(ValueError, match="list 0 was scored by 2 parts"):
        merge_parts([[[-1.0]], [[-1.0]]])
    with pytest.raises(ValueError, match="list 1 was scored by 0 parts"):
        merge_parts([[[-1.0], None], [None, None]])


def score_as_worker(rank: int, world: int, port: int, root: str, reference_path: str) -> None:
    """One of `world` train workers (gloo on CPU) running the reference scoring of run `root`/fused, round 2."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        config = load_config("configs/smoke.yaml", ["train.replay=previous"])
        run = RunLayout.at(root, "fused")
        rows, current = reference_inputs(run, run.round(2), config.train.replay)
        job = ReferenceJob(rows, current, reference_path, run.round(2), str(run.round(2).partial("reference", "train")),
                           batch_size=2)  # 4 lists of 2 items: 4 batches, 2 a worker
        model, tokenizer = load_policy(reference_path, config.train.dtype)
        score_reference(job, model, tokenizer, config.train, rank, world, Timings(), time.perf_counter())
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_workers_share_the_scoring_and_leave_what_one_does(tmp_path, other_reference):
    shards = {}
    for world in (1, 2):
        run = RunLayout.at(tmp_path / f"world-{world}", "fused")
        write_lists(run, 1), write_lists(run, 2)
        run.round(2).begin_stage("reference")
        mp.spawn(score_as_worker, args=(world, free_port(), str(tmp_path / f"world-{world}"), str(other_reference)),
                 nprocs=world, join=True)
        shards[world] = pq.read_table(run.round(2).train / shard_name(0)).to_pylist()
        assert run.round(2).stage_stats("reference")["lists"] == 4
    assert [(r["prompt_id"], r["round"]) for r in shards[2]] == [(r["prompt_id"], r["round"]) for r in shards[1]]
    for two, one in zip(shards[2], shards[1], strict=True):
        assert item_logps(two) == pytest.approx(item_logps(one), abs=1e-5)
