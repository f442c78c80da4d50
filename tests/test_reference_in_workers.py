"""reference.in_train_workers: the train workers' reference scoring leaves what the reference stage would.

The same lists (this round's and replayed ones) scored by the reference stage's
Ray task and by `score_reference` on a model loaded the way a train worker
loads it: equal rows and log-probs, and a done marker that later stages and
`inspect` read as the reference stage's.
"""

import time
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.layout import RunLayout, shard_name
from pipeline.timing import Timings
from pools.logprob_scorer import load_policy
from pools.reference_lists import reference_inputs, scored_in_train_workers
from stages import reference
from stages.train.reference_in_workers import ReferenceJob, score_reference
from tests.test_replay import item_logps, other_reference, ray_started, write_lists  # noqa: F401 (fixtures)


def test_workers_score_the_reference_as_the_reference_stage_does(tmp_path, other_reference, ray_started):
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
