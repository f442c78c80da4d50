"""stages/rerank.py: building ranked lists from scored candidates (pure functions only)."""

import dataclasses
import json
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import schema
from core.config import ListsConfig
from core.errors import PipelineError
from core.layout import EARLIER_ROUNDS, read_parquet_dir, shard_name, write_parquet
from stages.rerank import (
    LIST_STRATEGIES,
    TIE_RULES,
    build_lists,
    candidate_pool,
    reward_summary,
    screen_rewards,
)

ITEM_KEYS = {"response", "reward", "sample_index", "round", "num_tokens", "temperature", "finish_reason",
             "response_token_ids"}
STRATEGIES = sorted(LIST_STRATEGIES)


def candidate(prompt_id: str, sample_index: int, reward: float, round_number: int = 1,
              response: str | None = None) -> dict:
    return {
        "prompt_id": prompt_id,
        "prompt": [{"role": "user", "content": f"question {prompt_id}"}],
        "response": response if response is not None else f"{prompt_id}/r{round_number}/s{sample_index}",
        "sample_index": sample_index,
        "round": round_number,
        "policy": "base",
        "temperature": 0.8,
        "num_tokens": 10 + sample_index,
        "finish_reason": "stop",
        "response_token_ids": [sample_index, round_number, 2],
        "metadata": json.dumps({"constraints": [], "pid": prompt_id}),
        "reward": reward,
    }


def lists_config(strategy: str = "top_rest", **changes) -> ListsConfig:
    return dataclasses.replace(ListsConfig(), strategy=strategy, **changes)


def random_scored(rng: random.Random, num_prompts: int, k: int) -> list[dict]:
    rows = []
    for p in range(num_prompts):
        style = rng.choice(["float", "few_values", "all_tied", "top_tied", "fractions"])
        if style == "float":
            rewards = [rng.uniform(-3, 3) for _ in range(k)]
        elif style == "few_values":
            rewards = [float(rng.choice([0.0, 0.5, 1.0])) for _ in range(k)]
        elif style == "all_tied":
            rewards = [float(rng.choice([0.0, 1.0]))] * k
        elif style == "fractions":
            rewards = [rng.choice([0.0, 1 / 3, 2 / 3, 1.0]) for _ in range(k)]
        else:
            rewards = [1.0, 1.0] + [rng.choice([0.0, 1.0]) for _ in range(k - 2)]
        rows += [candidate(f"p{p}", i, r) for i, r in enumerate(rewards)]
    rng.shuffle(rows)
    return rows


def rewards_of(items: list[dict]) -> list[float]:
    return [i["reward"] for i in items]


def order_key(item: dict) -> tuple:
    return (-item["reward"], item["round"], item["sample_index"])


def expected_split(source: list[dict], config: ListsConfig) -> tuple[list[dict], list[dict]] | None:
    """What the docstring promises, computed independently: (positives, eligible negatives) or None (dropped)."""
    ordered = sorted(source, key=order_key)
    floor = min(r["reward"] for r in source)
    if all(r["reward"] == floor for r in source):
        return None
    positives = [r for r in ordered if r["reward"] > floor][:config.num_positives]
    low = positives[-1]["reward"]
    eligible = [r for r in ordered[len(positives):]
                if low - r["reward"] >= config.min_margin - 1e-9
                and (config.ties == "allow" or r["reward"] != low)]
    return (positives, eligible) if eligible else None


def by_prompt_id(row: dict) -> str:
    return row["prompt_id"]


def ids(items: list[dict]) -> list[tuple[int, int]]:
    return [(i["round"], i["sample_index"]) for i in items]


# --- every strategy, random rewards ------------------------------------------------

@pytest.mark.parametrize("ties", sorted(TIE_RULES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_list_invariants_on_random_rewards(strategy, ties):
    for seed in range(60):
        rng = random.Random(seed)
        k = rng.randint(2, 8)
        config = lists_config(strategy, ties=ties, num_positives=rng.randint(1, 3), num_negatives=rng.randint(1, 4),
                              min_margin=rng.choice([0.0, 0.0, 1 / 3, 0.5, 2.0]))
        scored = random_scored(rng, rng.randint(1, 10), k)
        lists, counts = build_lists(scored, config, seed=seed)

        by_prompt: dict[str, list[dict]] = {}
        for row in scored:
            by_prompt.setdefault(row["prompt_id"], []).append(row)
        expected = {pid: expected_split(rows, config) for pid, rows in by_prompt.items()}
        tied = {pid for pid, rows in by_prompt.items() if len({r["reward"] for r in rows}) == 1}
        no_negative = {pid for pid, split in expected.items() if split is None} - tied

        assert {row["prompt_id"] for row in lists} == set(by_prompt) - tied - no_negative
        assert len(lists) == counts["lists"]
        assert counts["prompts"] == len(by_prompt)
        assert counts["all_tied_dropped"] == len(tied)
        assert counts["no_negative_dropped"] == len(no_negative)
        assert counts["positives"] == sum(len(row["positives"]) for row in lists)
        assert counts["negatives"] == sum(len(row["negatives"]) for row in lists)

        for row in lists:
            positives, negatives = row["positives"], row["negatives"]
            source = by_prompt[row["prompt_id"]]
            want_positives, eligible = expected[row["prompt_id"]]
            assert positives and negatives
            # the contract: every positive at least every negative, both best-first
            assert min(rewards_of(positives)) >= max(rewards_of(negatives))
            for items in (positives, negatives):
                assert rewards_of(items) == sorted(rewards_of(items), reverse=True)
                assert items == sorted(items, key=order_key)
            # positives: the best num_positives, never at the pool's lowest reward
            assert ids(positives) == ids(want_positives)
            assert len(positives) <= config.num_positives
            assert min(rewards_of(positives)) > min(r["reward"] for r in source)
            # ties and margin
            low = positives[-1]["reward"]
            for n in negatives:
                assert low - n["reward"] >= config.min_margin - 1e-9
                if ties == "drop":
                    assert n["reward"] < low
            # what each strategy picks among the eligible negatives
            picks = {
                "top_rest": ids(eligible),
                "top_bottom": ids(eligible[-config.num_negatives:]),
                "hardest": ids(eligible[:config.num_negatives]),
            }
            if strategy in picks:
                assert ids(negatives) == picks[strategy]
            else:
                assert len(negatives) == min(config.num_negatives, len(eligible))
                assert set(ids(negatives)) <= set(ids(eligible))
            # each item once, with its candidate's own fields
            assert len(set(ids(positives + negatives))) == len(positives) + len(negatives)
            for item in positives + negatives:
                assert set(item) == ITEM_KEYS
                original = next(r for r in source if r["sample_index"] == item["sample_index"])
                assert {key: original[key] for key in ITEM_KEYS} == item
            assert row["prompt"] == source[0]["prompt"]
            assert row["metadata"] == source[0]["metadata"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_result_does_not_depend_on_input_order(strategy):
    for seed in range(30):
        rng = random.Random(1000 + seed)
        scored = random_scored(rng, 6, 6)
        config = lists_config(strategy, num_negatives=2)
        lists, counts = build_lists(scored, config, seed=7)
        shuffled = list(scored)
        rng.shuffle(shuffled)
        lists2, counts2 = build_lists(shuffled, config, seed=7)
        assert counts2 == counts
        assert sorted(lists2, key=by_prompt_id) == sorted(lists, key=by_prompt_id)


# --- each strategy on one hand-checked pool ---------------------------------------------

POOL = [0.9, 0.1, 0.5, 0.7, 0.3, 0.0]   # sample i has reward POOL[i]; best-first: 0, 3, 2, 4, 1, 5


@pytest.mark.parametrize("strategy, positives, negatives", [
    ("top_bottom", [0], [1, 5]),
    ("top_rest", [0], [3, 2, 4, 1, 5]),
    ("hardest", [0], [3, 2]),
])
def test_strategies_pick(strategy, positives, negatives):
    rows = [candidate("q", i, r) for i, r in enumerate(POOL)]
    [row], counts = build_lists(rows, lists_config(strategy, num_positives=1, num_negatives=2))
    assert [i["sample_index"] for i in row["positives"]] == positives
    assert [i["sample_index"] for i in row["negatives"]] == negatives
    assert counts["positives"] == 1 and counts["negatives"] == len(negatives)


def test_lambdarank_style_top_two_against_bottom_two():
    rows = [candidate("q", i, r) for i, r in enumerate(POOL)]
    [row], _ = build_lists(rows, lists_config("top_bottom", num_positives=2, num_negatives=2))
    assert rewards_of(row["positives"]) == [0.9, 0.7]
    assert rewards_of(row["negatives"]) == [0.1, 0.0]


def test_random_strategy_draws_uniformly_among_eligible_and_keeps_best_first():
    rows = [candidate("q", i, r) for i, r in enumerate(POOL)]
    config = lists_config("random", num_negatives=2)
    seen = []
    for seed in range(300):
        [row], _ = build_lists(rows, config, seed=seed)
        assert [i["sample_index"] for i in row["positives"]] == [0]
        negatives = [i["sample_index"] for i in row["negatives"]]
        assert len(negatives) == 2 and set(negatives) <= {1, 2, 3, 4, 5}
        assert rewards_of(row["negatives"]) == sorted(rewards_of(row["negatives"]), reverse=True)
        seen += negatives
        # the same seed gives the same list
        assert build_lists(rows, config, seed=seed)[0] == [row]
    # each of the 5 eligible negatives is drawn 2/5 of the time: about 120 of 300
    assert all(80 <= seen.count(i) <= 160 for i in range(1, 6)), {i: seen.count(i) for i in range(1, 6)}


def test_random_strategy_takes_every_eligible_negative_when_fewer_than_asked():
    rows = [candidate("q", i, r) for i, r in enumerate([1.0, 0.5, 0.0])]
    [row], _ = build_lists(rows, lists_config("random", num_negatives=5))
    assert [i["sample_index"] for i in row["negatives"]] == [1, 2]


# --- ties --------------------------------------------------------------------------

def test_default_ties_rule_never_uses_a_candidate_tied_with_the_best_as_a_negative():
    rows = [candidate("q", i, r) for i, r in enumerate([0.5, 1.0, 0.0, 1.0])]
    [row], counts = build_lists(rows, ListsConfig())
    assert ListsConfig().ties == "drop"
    assert [i["sample_index"] for i in row["positives"]] == [1]
    assert [i["sample_index"] for i in row["negatives"]] == [0, 2]
    assert counts["ties_with_lowest_positive"] == 1


def test_allow_ties_keeps_a_tied_candidate_as_the_hardest_negative():
    rows = [candidate("q", i, r) for i, r in enumerate([0.5, 1.0, 0.0, 1.0])]
    [row], counts = build_lists(rows, lists_config(ties="allow"))
    assert [i["sample_index"] for i in row["negatives"]] == [3, 0, 2]
    assert row["negatives"][0]["reward"] == row["positives"][0]["reward"]
    assert counts["ties_with_lowest_positive"] == 1


def test_ties_keep_round_then_sample_order():
    rows = [candidate("q", 3, 1.0), candidate("q", 0, 0.0), candidate("q", 1, 1.0),
            candidate("q", 2, 0.0), candidate("q", 0, 1.0, round_number=2)]
    random.Random(0).shuffle(rows)
    [row], _ = build_lists(rows, lists_config(ties="allow"))
    assert ids(row["positives"] + row["negatives"]) == [(1, 1), (1, 3), (2, 0), (1, 0), (1, 2)]
    [row], _ = build_lists(rows, lists_config(ties="drop", num_positives=2))
    assert ids(row["positives"]) == [(1, 1), (1, 3)]
    assert ids(row["negatives"]) == [(1, 0), (1, 2)]


def test_positives_stop_above_the_pool_floor():
    # A single winner among equals: top-2 cannot take a loser as a positive, or nothing would be left below it.
    rows = [candidate("q", i, r) for i, r in enumerate([0.0, 1.0, 0.0, 0.0])]
    [row], _ = build_lists(rows, lists_config("top_bottom", num_positives=2, num_negatives=2))
    assert [i["sample_index"] for i in row["positives"]] == [1]
    assert [i["sample_index"] for i in row["negatives"]] == [2, 3]


def test_all_tied_prompts_are_dropped_and_counted():
    rows = ([candidate("tied", i, 0.5) for i in range(4)]
            + [candidate("ok", i, float(i)) for i in range(4)]
            + [candidate("tied-zero", i, 0.0) for i in range(3)]
            + [candidate("single", 0, 1.0)])
    lists, counts = build_lists(rows, ListsConfig())
    assert [row["prompt_id"] for row in lists] == ["ok"]
    assert counts["prompts"] == 4 and counts["lists"] == 1
    assert counts["all_tied_dropped"] == 3 and counts["no_negative_dropped"] == 0


# --- minimum margin ----------------------------------------------------------------------

def test_min_margin_filters_negatives_and_drops_prompts_left_without_one():
    rows = ([candidate("wide", i, r) for i, r in enumerate([1.0, 0.8, 0.4, 0.0])]
            + [candidate("narrow", i, r) for i, r in enumerate([1.0, 0.9, 0.8])])
    lists, counts = build_lists(rows, lists_config("hardest", num_negatives=1, min_margin=0.5))
    [row] = lists
    assert row["prompt_id"] == "wide"
    assert rewards_of(row["negatives"]) == [0.4]   # 0.8 is only 0.2 below the positive
    assert counts["no_negative_dropped"] == 1 and counts["lists"] == 1


def test_min_margin_counts_fraction_rewards_exactly_at_the_margin():
    rows = [candidate("q", i, r) for i, r in enumerate([2 / 3, 1 / 3, 0.0])]
    [row], _ = build_lists(rows, lists_config("top_rest", min_margin=1 / 3))
    assert rewards_of(row["negatives"]) == [1 / 3, 0.0]


def test_no_candidates():
    lists, counts = build_lists([], ListsConfig())
    assert lists == [] and counts["prompts"] == 0 and counts["lists"] == 0


def test_unknown_strategy():
    with pytest.raises(KeyError):
        build_lists([candidate("q", 0, 1.0), candidate("q", 1, 0.0)], lists_config("bogus"))


# --- memory: the candidate pool -------------------------------------------------------------

def test_pool_adds_earlier_rounds_for_the_same_prompts_only():
    current = [candidate("a", i, 0.2 * i, round_number=3) for i in range(3)]
    earlier = [candidate("a", 0, 0.9, round_number=1), candidate("b", 0, 1.0, round_number=1),
               candidate("a", 1, 0.1, round_number=2)]
    pool, duplicates = candidate_pool(current, earlier)
    assert duplicates == 0
    assert ids(pool) == [(3, 0), (3, 1), (3, 2), (1, 0), (2, 1)]
    [row], _ = build_lists(pool, lists_config("top_rest"))
    # the earlier reward is reused as stored, and the item keeps its round
    assert row["positives"][0] == {"response": "a/r1/s0", "reward": 0.9, "sample_index": 0, "round": 1,
                                   "num_tokens": 10, "temperature": 0.8, "finish_reason": "stop",
                                   "response_token_ids": [0, 1, 2]}
    assert [i["round"] for i in row["negatives"]] == [3, 3, 2, 3]


def test_pool_keeps_identical_responses_once_the_earliest():
    current = [candidate("a", 0, 0.3, round_number=2, response="same"),
               candidate("a", 1, 0.0, round_number=2, response="other"),
               candidate("a", 2, 0.3, round_number=2, response="same")]
    earlier = [candidate("a", 3, 0.8, round_number=1, response="same"),
               candidate("a", 1, 0.5, round_number=1, response="same"),
               candidate("b", 0, 0.5, round_number=1, response="same")]
    pool, duplicates = candidate_pool(current, earlier)
    assert duplicates == 3
    assert sorted((r["response"], r["round"], r["sample_index"]) for r in pool) == [("other", 2, 1), ("same", 1, 1)]
    assert next(r for r in pool if r["response"] == "same")["reward"] == 0.5


def test_pool_without_memory_still_counts_duplicates_within_a_round():
    current = [candidate("a", i, 0.5, response="same") for i in range(3)] + [candidate("a", 3, 0.0)]
    pool, duplicates = candidate_pool(current, [])
    assert duplicates == 2 and ids(pool) == [(1, 0), (1, 3)]


@pytest.mark.parametrize("memory, number, rounds", [
    ("none", 3, []), ("previous", 1, []), ("previous", 3, [2]), ("all", 1, []), ("all", 4, [1, 2, 3]),
])
def test_memory_rounds(memory, number, rounds):
    assert EARLIER_ROUNDS[memory](number) == rounds


# --- invalid rewards -----------------------------------------------------------------------

def test_invalid_reward_is_an_error_naming_the_candidate():
    rows = [candidate("a", 0, 1.0), candidate("b/7", 3, math.nan), candidate("c", 0, math.inf)]
    with pytest.raises(PipelineError) as info:
        screen_rewards(rows, "error")
    message = str(info.value)
    assert "'b/7'" in message and "sample_index 3" in message and "nan" in message
    assert "reward.on_invalid=drop" in message and "\n" not in message


def test_invalid_rewards_are_dropped_and_counted():
    rows = [candidate("a", 0, 1.0), candidate("a", 1, math.nan), candidate("a", 2, -math.inf),
            candidate("a", 3, 0.0)]
    valid, dropped = screen_rewards(rows, "drop")
    assert dropped == 2 and [r["sample_index"] for r in valid] == [0, 3]
    assert screen_rewards(valid, "error") == (valid, 0)


# --- shards ------------------------------------------------------------------------------

def test_lists_round_trip_through_parquet(tmp_path):
    scored = random_scored(random.Random(7), 10, 4)
    lists, _ = build_lists(scored, ListsConfig())
    assert lists
    write_parquet(pa.Table.from_pylist(lists, schema=schema.LISTS), tmp_path / shard_name(0))
    read = read_parquet_dir(tmp_path)
    assert read.schema.equals(schema.LISTS)
    assert read.to_pylist() == lists
    for row in pq.read_table(tmp_path / shard_name(0)).to_pylist():
        assert isinstance(row["negatives"][0]["reward"], float)
        assert min(rewards_of(row["positives"])) >= max(rewards_of(row["negatives"]))


def test_empty_lists_shard_keeps_schema(tmp_path):
    write_parquet(pa.Table.from_pylist([], schema=schema.LISTS), tmp_path / shard_name(0))
    read = read_parquet_dir(tmp_path)
    assert read.num_rows == 0 and read.schema.equals(schema.LISTS)


def test_contract_columns_are_kept():
    for name in ("prompt_id", "prompt", "response", "sample_index", "round", "policy", "temperature",
                 "num_tokens", "finish_reason"):
        assert name in schema.CANDIDATES.names and name in schema.SCORED.names
    assert schema.SCORED.names == schema.CANDIDATES.names + ["reward"]
    item = schema.LISTS.field("positives").type.value_type
    assert {"response", "reward", "round"} <= {item.field(i).name for i in range(item.num_fields)}


# --- reward_summary ------------------------------------------------------------

def test_reward_summary_odd():
    assert reward_summary([3.0, 1.0, 2.0]) == {"reward_mean": 2.0, "reward_min": 1.0,
                                              "reward_median": 2.0, "reward_max": 3.0}


def test_reward_summary_even_and_rounding():
    summary = reward_summary([0.0, 1.0, 1.0, 0.0, 0.0, 1.0 / 3.0])
    assert summary["reward_min"] == 0.0
    assert summary["reward_max"] == 1.0
    assert summary["reward_mean"] == round((2 + 1 / 3) / 6, 4) == 0.3889
    assert 0.0 <= summary["reward_median"] <= 1.0 / 3.0


def test_reward_summary_single_empty_and_does_not_mutate():
    rewards = [0.5, -1.0]
    summary = reward_summary(rewards)
    assert rewards == [0.5, -1.0]
    assert summary["reward_min"] == -1.0 and summary["reward_max"] == 0.5
    assert summary["reward_mean"] == -0.25
    assert reward_summary([0.25]) == {"reward_mean": 0.25, "reward_min": 0.25,
                                     "reward_median": 0.25, "reward_max": 0.25}
    assert reward_summary([]) == {}


# --- truncated answers (lists.truncated) ---------------------------------------------

def truncated(row: dict) -> dict:
    return {**row, "finish_reason": "length"}


def test_truncated_answers_are_ranked_like_others_by_default_and_counted():
    rows = [truncated(candidate("q", 0, 1.0)), candidate("q", 1, 0.5), truncated(candidate("q", 2, 0.0))]
    [row], counts = build_lists(rows, lists_config("top_rest"))
    assert rewards_of(row["positives"]) == [1.0] and rewards_of(row["negatives"]) == [0.5, 0.0]
    assert counts["truncated_positives"] == 1 and counts["truncated_negatives"] == 1


def test_negative_only_never_makes_a_truncated_answer_a_positive():
    rows = ([truncated(candidate("q", 0, 1.0)), candidate("q", 1, 0.5), candidate("q", 2, 0.2),
             truncated(candidate("q", 3, 0.0))]
            # Its only finished answer is at the floor: no positive can lead, so no list.
            + [truncated(candidate("r", 0, 1.0)), candidate("r", 1, 0.0)])
    lists, counts = build_lists(rows, lists_config("top_rest", truncated="negative_only"))
    [row] = lists
    assert row["prompt_id"] == "q"
    # The truncated 1.0 is above the positive: it can be neither, and is left out.
    assert rewards_of(row["positives"]) == [0.5] and rewards_of(row["negatives"]) == [0.2, 0.0]
    assert counts["no_finished_positive_dropped"] == 1
    assert counts["truncated_positives"] == 0 and counts["truncated_negatives"] == 1
    assert all(p["reward"] >= n["reward"] for p in row["positives"] for n in row["negatives"])
