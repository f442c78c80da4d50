"""The rerank stage's I/O on hand-made rounds: scored shards, memorization across rounds, invalid rewards.

The reward is a stand-in (a lookup by response text) except in the last test,
which scores through real Ray actors.
"""

import json
import math
import shutil
from types import SimpleNamespace

import pyarrow as pa
import pytest

from core import schema
from core.errors import ConfigError, PipelineError
from core.layout import RunLayout, read_parquet_dir, shard_name, write_parquet
from pipeline.settings import load_config
from pools import reward_scorers
from stages import rerank
from tests.conftest import REPO_ROOT

CONSTRAINTS = json.dumps({"constraints": [{"kind": "max_words", "limit": 3}]})


def candidate_row(prompt_id: str, sample_index: int, response: str, round_number: int) -> dict:
    return {"prompt_id": prompt_id, "prompt": [{"role": "user", "content": f"Answer {prompt_id} in 3 words."}],
            "response": response, "sample_index": sample_index, "round": round_number, "policy": "base",
            # A long answer stands for one the engine cut at max_tokens.
            "temperature": 1.0, "num_tokens": len(response.split()),
            "finish_reason": "length" if len(response.split()) >= 50 else "stop",
            "metadata": CONSTRAINTS, "response_token_ids": [len(response), sample_index, 2]}


def make_plan(tmp_path, number: int, *overrides: str) -> SimpleNamespace:
    config = load_config(None, [f"output={tmp_path}", *overrides])
    run = RunLayout.at(tmp_path, "run")
    return SimpleNamespace(config=config, run=run, round=run.round(number))


def generate(plan, responses: dict[str, list[str]]) -> list[dict]:
    """Write a finished candidates output, as the generate stage leaves it."""
    rows = [candidate_row(pid, i, text, plan.round.number) for pid, texts in responses.items()
            for i, text in enumerate(texts)]
    out = plan.round.begin_stage("generate")
    write_parquet(pa.Table.from_pylist(rows, schema=schema.CANDIDATES), out / shard_name(0))
    plan.round.finish_stage("generate", {})
    return rows


def run_rerank(plan, monkeypatch, rewards: dict[str, float]) -> tuple[dict, list[dict]]:
    """Run the stage as the driver does, with rewards looked up by response; returns (stats, rows scored)."""
    scored_rows: list[dict] = []

    def fake_score(rows, reward_config, retries=0, num_gpus=0.0, tally=None):
        scored_rows.extend(rows)
        return [rewards[row["response"]] for row in rows]

    monkeypatch.setattr(rerank, "score_candidates", fake_score)
    out = plan.round.begin_stage("rerank")
    stats = rerank.run_stage(plan, out)
    plan.round.finish_stage("rerank", stats)
    return stats, scored_rows


def lists_of(plan) -> dict[str, dict]:
    return {row["prompt_id"]: row for row in read_parquet_dir(plan.round.lists).to_pylist()}


def summary(items: list[dict]) -> list[tuple]:
    return [(item["response"], item["reward"], item["round"]) for item in items]


# --- one round -------------------------------------------------------------------------

def test_stage_writes_lists_and_every_scored_candidate(tmp_path, monkeypatch):
    plan = make_plan(tmp_path, 1)
    rows = generate(plan, {"a": ["best", "mid", "low", "also best"], "tied": ["t1", "t2"], "dup": ["x", "x", "y"]})
    rewards = {"best": 1.0, "mid": 0.5, "low": 0.0, "also best": 1.0, "t1": 0.5, "t2": 0.5, "x": 1.0, "y": 0.0}
    stats, scored_rows = run_rerank(plan, monkeypatch, rewards)

    lists = lists_of(plan)
    assert set(lists) == {"a", "dup"}
    assert summary(lists["a"]["positives"]) == [("best", 1.0, 1)]
    assert summary(lists["a"]["negatives"]) == [("mid", 0.5, 1), ("low", 0.0, 1)]   # "also best" is a tie
    assert summary(lists["dup"]["positives"] + lists["dup"]["negatives"]) == [("x", 1.0, 1), ("y", 0.0, 1)]

    scored = read_parquet_dir(plan.round.dir / "scored")
    assert scored.schema.equals(schema.SCORED)
    assert scored.to_pylist() == [{**row, "reward": rewards[row["response"]]} for row in rows]
    assert len(scored_rows) == len(rows)
    assert not list(plan.round.dir.glob("*.partial"))

    assert stats["prompts"] == 3 and stats["lists"] == 2 and stats["candidates"] == 9
    assert stats["all_tied_dropped"] == 1 and stats["no_negative_dropped"] == 0 and stats["all_invalid_dropped"] == 0
    assert stats["duplicates_dropped"] == 1 and stats["ties_with_lowest_positive"] == 1
    assert stats["invalid_rewards_dropped"] == 0 and stats["memory_candidates"] == 0
    assert plan.round.stage_stats("rerank")["lists"] == 2


def test_invalid_reward_stops_the_stage_naming_the_prompt_and_writes_nothing(tmp_path, monkeypatch):
    plan = make_plan(tmp_path, 1)
    generate(plan, {"fine": ["a", "b"], "broken": ["c", "d"]})
    with pytest.raises(PipelineError, match=r"prompt_id 'broken' sample_index 1 .*nan"):
        run_rerank(plan, monkeypatch, {"a": 1.0, "b": 0.0, "c": 0.5, "d": math.nan})
    assert not (plan.round.dir / "scored").exists()
    assert not list(plan.round.partial("rerank").iterdir())
    assert not plan.round.is_done("rerank")


def test_invalid_rewards_dropped_and_counted(tmp_path, monkeypatch):
    plan = make_plan(tmp_path, 1, "reward.on_invalid=drop")
    generate(plan, {"fine": ["a", "b", "n1"], "broken": ["c", "d"]})
    stats, _ = run_rerank(plan, monkeypatch, {"a": 1.0, "b": 0.0, "n1": math.nan, "c": math.inf, "d": math.nan})
    assert set(lists_of(plan)) == {"fine"}
    assert summary(lists_of(plan)["fine"]["negatives"]) == [("b", 0.0, 1)]
    assert stats["invalid_rewards_dropped"] == 3 and stats["all_invalid_dropped"] == 1
    assert stats["prompts"] == 2 and stats["lists"] == 1
    assert stats["reward_min"] == 0.0 and stats["reward_max"] == 1.0
    # the scored shard keeps what the reward model said, invalid values included
    stored = [row["reward"] for row in read_parquet_dir(plan.round.dir / "scored").to_pylist()]
    assert sum(not math.isfinite(r) for r in stored) == 3


def test_min_margin_drops_are_counted_by_the_stage(tmp_path, monkeypatch):
    plan = make_plan(tmp_path, 1, "lists.min_margin=0.5")
    generate(plan, {"close": ["a", "b"], "far": ["c", "d"]})
    stats, _ = run_rerank(plan, monkeypatch, {"a": 1.0, "b": 0.75, "c": 1.0, "d": 0.25})
    assert set(lists_of(plan)) == {"far"}
    assert stats["no_negative_dropped"] == 1
    assert stats["prompts"] == stats["lists"] + stats["all_tied_dropped"] + stats["no_negative_dropped"] \
        + stats["all_invalid_dropped"]


# --- memorization across rounds -------------------------------------------------------------

ROUNDS = [
    # round 1: one excellent answer; prompt "other" never comes back
    ({"q": ["great", "bad1"], "other": ["o1", "o2"]}, {"great": 1.0, "bad1": 0.0, "o1": 1.0, "o2": 0.0}),
    # round 2: the same text "great" again (scored 0.3 this time), and two new ones
    ({"q": ["meh", "great", "bad2"]}, {"meh": 0.5, "great": 0.3, "bad2": 0.1}),
    # round 3
    ({"q": ["ok3", "bad3"]}, {"ok3": 0.6, "bad3": 0.2}),
]


def run_three_rounds(tmp_path, monkeypatch, memory: str) -> list[tuple[SimpleNamespace, dict, list[dict]]]:
    results = []
    for number, (responses, rewards) in enumerate(ROUNDS, start=1):
        plan = make_plan(tmp_path, number, f"lists.memory={memory}")
        generate(plan, responses)
        stats, scored_rows = run_rerank(plan, monkeypatch, rewards)
        results.append((plan, stats, scored_rows))
    return results


def test_memory_none_uses_this_rounds_candidates_only(tmp_path, monkeypatch):
    (_, _, _), (plan2, stats2, _), (plan3, _, _) = run_three_rounds(tmp_path, monkeypatch, "none")
    row = lists_of(plan2)["q"]
    assert summary(row["positives"] + row["negatives"]) == [("meh", 0.5, 2), ("great", 0.3, 2), ("bad2", 0.1, 2)]
    assert {item["round"] for row in lists_of(plan3).values() for item in row["positives"] + row["negatives"]} == {3}
    assert stats2["memory_candidates"] == 0 and stats2["duplicates_dropped"] == 0


def test_memory_previous_reuses_the_previous_rounds_rewards(tmp_path, monkeypatch):
    (_, _, _), (plan2, stats2, scored2), (plan3, stats3, scored3) = run_three_rounds(tmp_path, monkeypatch,
                                                                                      "previous")
    # only this round's candidates go to the reward model
    assert [row["response"] for row in scored2] == ["meh", "great", "bad2"]
    assert [row["response"] for row in scored3] == ["ok3", "bad3"]
    # round 2: round 1's "great" with its round-1 reward and round; round 2's copy of it counted once
    row = lists_of(plan2)["q"]
    assert summary(row["positives"]) == [("great", 1.0, 1)]
    assert summary(row["negatives"]) == [("meh", 0.5, 2), ("bad2", 0.1, 2), ("bad1", 0.0, 1)]
    assert stats2["duplicates_dropped"] == 1
    assert stats2["memory_candidates"] == 2 and stats2["memory_items_in_lists"] == 2   # great and bad1 of round 1
    assert "other" not in lists_of(plan2)
    # round 3 looks back one round only: round 2's own candidates, with the rewards round 2 gave them
    row = lists_of(plan3)["q"]
    assert summary(row["positives"]) == [("ok3", 0.6, 3)]
    assert summary(row["negatives"]) == [("meh", 0.5, 2), ("great", 0.3, 2), ("bad3", 0.2, 3), ("bad2", 0.1, 2)]
    assert stats3["memory_candidates"] == 3 and stats3["duplicates_dropped"] == 0


def test_memory_all_reaches_every_earlier_round(tmp_path, monkeypatch):
    *_, (plan3, stats3, scored3) = run_three_rounds(tmp_path, monkeypatch, "all")
    assert [row["response"] for row in scored3] == ["ok3", "bad3"]
    row = lists_of(plan3)["q"]
    assert summary(row["positives"]) == [("great", 1.0, 1)]
    assert summary(row["negatives"]) == [("ok3", 0.6, 3), ("meh", 0.5, 2), ("bad3", 0.2, 3), ("bad2", 0.1, 2),
                                         ("bad1", 0.0, 1)]
    # round 2's "great" repeats round 1's: kept once, the earliest
    assert stats3["duplicates_dropped"] == 1 and stats3["memory_candidates"] == 4


def test_memory_needs_the_earlier_rounds_scored_shard(tmp_path, monkeypatch):
    first = make_plan(tmp_path, 1)
    generate(first, {"q": ["a", "b"]})
    run_rerank(first, monkeypatch, {"a": 1.0, "b": 0.0})
    shutil.rmtree(first.round.dir / "scored")   # as a round reranked before scored shards existed
    second = make_plan(tmp_path, 2, "lists.memory=previous")
    generate(second, {"q": ["c", "d"]})
    with pytest.raises(PipelineError) as info:
        run_rerank(second, monkeypatch, {"c": 1.0, "d": 0.0})
    message = str(info.value)
    assert "lists.memory=previous" in message and str(first.round.dir / "scored") in message
    assert "\n" not in message


# --- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("lists.strategy=best", "lists.strategy"),
    ("lists.num_positives=0", "lists.num_positives"),
    ("lists.num_negatives=0", "lists.num_negatives"),
    ("lists.min_margin=-0.1", "lists.min_margin"),
    ("lists.ties=keep", "lists.ties"),
    ("lists.memory=forever", "lists.memory"),
])
def test_bad_lists_keys_are_one_line_errors(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert key in str(info.value) and "\n" not in str(info.value)


def test_lists_defaults():
    lists = load_config(None).lists
    assert (lists.strategy, lists.num_positives, lists.num_negatives, lists.ties, lists.min_margin,
            lists.memory) == ("top_rest", 1, 3, "drop", 0.0, "none")


# --- scoring through Ray actors -----------------------------------------------------------

def test_score_candidates_shares_batches_across_actors_and_keeps_order():
    import ray

    from rewards import build_reward

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    try:
        texts = ["one two", "one two three four five", "a", "word " * 9, "x y z", "", "fits here", "too many words now"]
        rows = [candidate_row(f"p{i}", 0, text, 1) for i, text in enumerate(texts)]
        config = load_config(None, ["reward.batch_size=3", "reward.num_actors=2"]).reward
        rewards = reward_scorers.score_candidates(rows, config)
        expected = build_reward("ifeval").score([reward_scorers.to_sample(row) for row in rows])
        assert rewards == expected
        assert sorted(set(rewards)) == [0.0, 1.0]
        assert reward_scorers.score_candidates([], config) == []
    finally:
        if started:
            ray.shutdown()


def test_a_dead_reward_actor_is_replaced_and_its_batches_sent_again(monkeypatch, caplog):
    import ray

    from core.retries import WorkerRetries

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    starts = []
    real_start = reward_scorers.RewardActors.start

    def start(self):
        actor = real_start(self)
        if not starts:
            ray.kill(actor)  # the first actor is dead before it answers any batch
        starts.append(actor)
        return actor

    try:
        rows = [candidate_row(f"p{i}", 0, text, 1) for i, text in enumerate(["a", "b c", "d e f", "g h i j"])]
        config = load_config(None, ["reward.batch_size=1", "reward.num_actors=2"]).reward
        retries = WorkerRetries("rerank", "reward_actor", 2)
        clean = reward_scorers.score_candidates(rows, config)
        monkeypatch.setattr(reward_scorers.RewardActors, "start", start)
        assert reward_scorers.score_candidates(rows, config, retries) == clean
        assert retries.stats() == {"reward_actor_retries": 1} and len(starts) == 3
        assert "rerank: the reward actor 0 died; starting another (retry 1 of 2)" in caplog.text
    finally:
        if started:
            ray.shutdown()
