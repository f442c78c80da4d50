"""stages/rerank.py: building ranked lists from scored candidates (pure functions only)."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.layout import read_parquet_dir, shard_name, write_parquet
from stages.rerank import build_lists, reward_summary

ITEM_KEYS = {"response", "reward", "sample_index", "round", "num_tokens"}


def candidate(prompt_id: str, sample_index: int, reward: float, round_number: int = 1) -> dict:
    return {
        "prompt_id": prompt_id,
        "prompt": [{"role": "user", "content": f"question {prompt_id}"}],
        "response": f"{prompt_id}/r{round_number}/s{sample_index}",
        "sample_index": sample_index,
        "round": round_number,
        "policy": "base",
        "temperature": 0.8,
        "num_tokens": 10 + sample_index,
        "finish_reason": "stop",
        "metadata": json.dumps({"constraints": [], "pid": prompt_id}),
        "reward": reward,
    }


def random_scored(rng: random.Random, num_prompts: int, k: int) -> list[dict]:
    rows = []
    for p in range(num_prompts):
        style = rng.choice(["float", "few_values", "all_tied", "top_tied"])
        if style == "float":
            rewards = [rng.uniform(-3, 3) for _ in range(k)]
        elif style == "few_values":
            rewards = [float(rng.choice([0.0, 0.5, 1.0])) for _ in range(k)]
        elif style == "all_tied":
            rewards = [float(rng.choice([0.0, 1.0]))] * k
        else:
            rewards = [1.0, 1.0] + [rng.choice([0.0, 1.0]) for _ in range(k - 2)]
        rows += [candidate(f"p{p}", i, r) for i, r in enumerate(rewards)]
    rng.shuffle(rows)
    return rows


def item_rewards(items: list[dict]) -> list[float]:
    return [i["reward"] for i in items]


@pytest.mark.parametrize("seed", range(200))
def test_top_rest_invariants_on_random_rewards(seed):
    rng = random.Random(seed)
    k = rng.randint(2, 8)
    scored = random_scored(rng, rng.randint(1, 12), k)
    lists, counts = build_lists(scored, "top_rest")

    by_prompt: dict[str, list[dict]] = {}
    for row in scored:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    tied = {pid for pid, rows in by_prompt.items() if len({r["reward"] for r in rows}) == 1}

    assert counts == {"prompts": len(by_prompt), "lists": len(by_prompt) - len(tied),
                      "all_tied_dropped": len(tied)}
    assert len(lists) == counts["lists"]
    assert {row["prompt_id"] for row in lists} == set(by_prompt) - tied
    assert len({row["prompt_id"] for row in lists}) == len(lists)

    for row in lists:
        positives, negatives = row["positives"], row["negatives"]
        source = by_prompt[row["prompt_id"]]
        assert len(positives) == 1 and len(negatives) == k - 1
        # every positive at least every negative
        assert min(item_rewards(positives)) >= max(item_rewards(negatives))
        # the positive is a best response; a strictly better one would be a bug
        assert positives[0]["reward"] == max(r["reward"] for r in source)
        # best-first
        for items in (positives, negatives):
            rewards = item_rewards(items)
            assert rewards == sorted(rewards, reverse=True)
        # every candidate appears exactly once, with its own fields
        items = positives + negatives
        assert sorted(i["sample_index"] for i in items) == list(range(k))
        for item in items:
            assert set(item) == ITEM_KEYS
            original = next(r for r in source if r["sample_index"] == item["sample_index"])
            assert item["response"] == original["response"]
            assert item["reward"] == original["reward"]
            assert item["num_tokens"] == original["num_tokens"]
            assert item["round"] == original["round"]
        assert row["prompt"] == source[0]["prompt"]
        assert row["metadata"] == source[0]["metadata"]


@pytest.mark.parametrize("seed", range(50))
def test_result_does_not_depend_on_input_order(seed):
    rng = random.Random(1000 + seed)
    scored = random_scored(rng, 6, 5)
    lists, counts = build_lists(scored, "top_rest")
    shuffled = list(scored)
    rng.shuffle(shuffled)
    lists2, counts2 = build_lists(shuffled, "top_rest")
    assert counts2 == counts
    key = lambda row: row["prompt_id"]  # noqa: E731
    assert sorted(lists2, key=key) == sorted(lists, key=key)


def test_ties_keep_round_then_sample_order():
    rows = [candidate("q", 3, 1.0), candidate("q", 0, 0.0), candidate("q", 1, 1.0),
            candidate("q", 2, 0.0), candidate("q", 0, 1.0, round_number=2)]
    random.Random(0).shuffle(rows)
    [row], counts = build_lists(rows, "top_rest")
    order = [(i["round"], i["sample_index"]) for i in row["positives"] + row["negatives"]]
    assert order == [(1, 1), (1, 3), (2, 0), (1, 0), (1, 2)]
    assert counts == {"prompts": 1, "lists": 1, "all_tied_dropped": 0}


def test_hardest_negative_first():
    rows = [candidate("q", i, r) for i, r in enumerate([0.1, 0.9, 0.5, 0.7])]
    [row], _ = build_lists(rows, "top_rest")
    assert row["positives"][0]["sample_index"] == 1
    assert [n["sample_index"] for n in row["negatives"]] == [3, 2, 0]
    assert row["negatives"][0]["reward"] == 0.7


def test_all_tied_prompts_are_dropped_and_counted():
    rows = ([candidate("tied", i, 0.5) for i in range(4)]
            + [candidate("ok", i, float(i)) for i in range(4)]
            + [candidate("tied-zero", i, 0.0) for i in range(3)])
    lists, counts = build_lists(rows, "top_rest")
    assert [row["prompt_id"] for row in lists] == ["ok"]
    assert counts == {"prompts": 3, "lists": 1, "all_tied_dropped": 2}


def test_no_candidates():
    assert build_lists([], "top_rest") == ([], {"prompts": 0, "lists": 0, "all_tied_dropped": 0})


def test_unknown_strategy():
    with pytest.raises(KeyError):
        build_lists([candidate("q", 0, 1.0), candidate("q", 1, 0.0)], "bogus")


def test_lists_round_trip_through_parquet(tmp_path):
    rng = random.Random(7)
    scored = random_scored(rng, 10, 4)
    lists, _ = build_lists(scored, "top_rest")
    assert lists
    write_parquet(pa.Table.from_pylist(lists, schema=schema.LISTS), tmp_path / shard_name(0))
    read = read_parquet_dir(tmp_path)
    assert read.schema.equals(schema.LISTS)
    assert read.to_pylist() == lists
    # what the contract promises, checked on the stored rows
    for row in pq.read_table(tmp_path / shard_name(0)).to_pylist():
        assert isinstance(row["negatives"][0]["reward"], float)
        assert min(item_rewards(row["positives"])) >= max(item_rewards(row["negatives"]))


def test_empty_lists_shard_keeps_schema(tmp_path):
    write_parquet(pa.Table.from_pylist([], schema=schema.LISTS), tmp_path / shard_name(0))
    read = read_parquet_dir(tmp_path)
    assert read.num_rows == 0 and read.schema.equals(schema.LISTS)


# --- reward_summary ------------------------------------------------------------

def test_reward_summary_odd():
    assert reward_summary([3.0, 1.0, 2.0]) == {"reward_mean": 2.0, "reward_min": 1.0,
                                              "reward_median": 2.0, "reward_max": 3.0}


def test_reward_summary_even_and_rounding():
    summary = reward_summary([0.0, 1.0, 1.0, 0.0, 0.0, 1.0 / 3.0])
    assert summary["reward_min"] == 0.0
    assert summary["reward_max"] == 1.0
    assert summary["reward_mean"] == round((2 + 1 / 3) / 6, 4) == 0.3889
    # an even count: one of (or between) the two middle values 0.0 and 1/3, not the mean
    assert 0.0 <= summary["reward_median"] <= 1.0 / 3.0


def test_reward_summary_single_and_does_not_mutate():
    rewards = [0.5, -1.0]
    summary = reward_summary(rewards)
    assert rewards == [0.5, -1.0]
    assert summary["reward_min"] == -1.0 and summary["reward_max"] == 0.5
    assert summary["reward_mean"] == -0.25
    assert reward_summary([0.25]) == {"reward_mean": 0.25, "reward_min": 0.25,
                                     "reward_median": 0.25, "reward_max": 0.25}
