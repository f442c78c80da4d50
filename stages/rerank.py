"""Rerank: score every candidate with the reward model and build ranked lists.

The stage writes two things:
  lists/part-00000.parquet    one row per prompt: positives and negatives, each
                              best-first (schema.LISTS); the stage's output.
  scored/part-00000.parquet   every candidate of this round with its reward, as the
                              reward model returned it, NaN included (schema.SCORED).

Why the scored shard: with `lists.memory`, a prompt's candidate pool also holds
earlier rounds' responses to the same prompt_id, with the rewards they got then;
they are read back from those rounds' scored shards, never scored again, and
keep their `round`. Both are the stage's declared outputs (core/layout.py,
STAGE_REGISTRY): written into `.partial/` directories that the driver renames
before it writes `_done/rerank`, so the marker vouches for both, and an earlier
round's scored shard is read only once that round's rerank is done.

A prompt's pool: this round's candidates with a finite reward plus, with memory,
earlier rounds' ones; a response seen twice for the same prompt (same text) is
kept once, the earliest (round, then sample_index), and counted. The pool sorted
best-first (equal rewards: earlier round, then lower sample_index) becomes a list:
  positives: the best `lists.num_positives`, never one with the pool's lowest
             reward (someone has to be a negative);
  eligible negatives: the rest, at least `lists.min_margin` below the lowest
             positive and, with `lists.ties: drop` (the default), not tied with
             it: a tie is no preference, and pushing down a response as good as
             a positive would teach the policy noise;
  negatives: the strategy's pick among the eligible ones (LIST_STRATEGIES).
So every positive's reward is >= every negative's (> with ties: drop).
A prompt without a list is counted in the stage's statistics by reason:
all_tied (every candidate has the same reward), no_negative (none eligible:
min_margin), all_invalid (no candidate with a finite reward, reward.on_invalid: drop).
"""

from __future__ import annotations

import logging
import math
import random
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from core import schema, timing
from core.errors import PipelineError
from core.gpu_layout import layout_of
from core.layout import EARLIER_ROUNDS, RunLayout, read_parquet_dir, shard_name, write_parquet
from core.retries import WorkerRetries
from core.seeds import derive_seed
from pools.reward_scorers import score_candidates

log = logging.getLogger("pipeline.rerank")

# What a list item keeps of its candidate row.
ITEM_FIELDS = ("response", "reward", "sample_index", "round", "num_tokens", "temperature", "finish_reason",
               "response_token_ids")
# Rewards are often fractions: 2/3 - 1/3 must count as a margin of 1/3.
MARGIN_TOLERANCE = 1e-9


def screen_rewards(scored: list[dict[str, Any]], on_invalid: str) -> tuple[list[dict[str, Any]], int]:
    """Rows whose reward is finite, and how many were dropped; `error` stops at the first invalid one."""
    valid = [row for row in scored if math.isfinite(row["reward"])]
    if on_invalid == "error" and len(valid) < len(scored):
        bad = next(row for row in scored if not math.isfinite(row["reward"]))
        raise PipelineError(f"reward of prompt_id {bad['prompt_id']!r} sample_index {bad['sample_index']} "
                            f"(round {bad['round']}) is {bad['reward']}; set reward.on_invalid=drop to drop "
                            "such candidates")
    return valid, len(scored) - len(valid)


def reward_summary(rewards: list[float]) -> dict[str, float]:
    if not rewards:
        return {}
    ordered = sorted(rewards)
    return {
        "reward_mean": round(sum(ordered) / len(ordered), 4),
        "reward_min": ordered[0],
        "reward_median": ordered[len(ordered) // 2],
        "reward_max": ordered[-1],
    }


# --- memory: earlier rounds' scored candidates ------------------------------------


def earlier_scored(run: RunLayout, number: int, memory: str, prompt_ids: set[str]) -> list[dict[str, Any]]:
    """Earlier rounds' candidates for these prompts with their stored, finite rewards."""
    rows: list[dict[str, Any]] = []
    for earlier in EARLIER_ROUNDS[memory](number):
        layout = run.round(earlier)
        directory = layout.scored
        if not layout.is_done("rerank") or not directory.is_dir():
            raise PipelineError(f"lists.memory={memory} needs round {earlier}'s rewards in {directory}, which its "
                                "rerank stage did not write; use lists.memory=none for this run")
        table = read_parquet_dir(directory)
        table = table.filter(pc.is_in(table["prompt_id"], value_set=pa.array(sorted(prompt_ids), pa.string())))
        rows += [row for row in table.to_pylist() if math.isfinite(row["reward"])]
    return rows


def candidate_pool(current: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> tuple[list[dict], int]:
    """This round's candidates plus earlier ones for the same prompts, each response once (the earliest).

    Returns the pool, in input order (this round's first), and how many duplicates were left out.
    """
    prompt_ids = {row["prompt_id"] for row in current}
    rows = current + [row for row in earlier if row["prompt_id"] in prompt_ids]
    earliest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["prompt_id"], row["response"])
        if key not in earliest or (row["round"], row["sample_index"]) < (earliest[key]["round"],
                                                                         earliest[key]["sample_index"]):
            earliest[key] = row
    pool = [row for row in rows if earliest[(row["prompt_id"], row["response"])] is row]
    return pool, len(rows) - len(pool)


# --- lists ----------------------------------------------------------------------
# A strategy picks `count` negatives among the eligible ones (best-first) and
# returns them best-first; the positives are the same for every strategy.

def lowest_negatives(eligible: list[dict], count: int, rng: random.Random) -> list[dict]:
    return eligible[-count:]


def all_negatives(eligible: list[dict], count: int, rng: random.Random) -> list[dict]:
    return eligible


def hardest_negatives(eligible: list[dict], count: int, rng: random.Random) -> list[dict]:
    return eligible[:count]


def random_negatives(eligible: list[dict], count: int, rng: random.Random) -> list[dict]:
    """`count` of the eligible negatives drawn uniformly without replacement (all if fewer), kept best-first."""
    chosen = sorted(rng.sample(range(len(eligible)), min(count, len(eligible))))
    return [eligible[i] for i in chosen]


LIST_STRATEGIES: dict[str, Callable[[list[dict], int, random.Random], list[dict]]] = {
    "top_bottom": lowest_negatives,   # the n lowest: the paper's contrastive top-1 vs bottom-3 of 4
    "top_rest": all_negatives,        # every eligible candidate
    "hardest": hardest_negatives,     # the n highest: the hardest negatives
    "random": random_negatives,       # the baseline: n at random
}

# May a candidate whose reward equals the lowest positive's be a negative?
TIE_RULES: dict[str, Callable[[float, float], bool]] = {
    "drop": lambda reward, lowest_positive: reward < lowest_positive,
    "allow": lambda reward, lowest_positive: True,
}


def best_first(row: dict[str, Any]) -> tuple:
    return (-row["reward"], row["round"], row["sample_index"])


def is_truncated(item: dict[str, Any]) -> bool:
    return item.get("finish_reason") == "length"


# May a candidate be a positive? (lists.truncated)
POSITIVE_RULES: dict[str, Callable[[dict], bool]] = {
    "keep": lambda item: True,
    "negative_only": lambda item: not is_truncated(item),
}


def split_pool(items: list[dict], config, rng: random.Random) -> tuple[list[dict], list[dict], str | None]:
    """One prompt's positives and negatives from its pool (sorted best-first), or why it has no list."""
    floor = items[-1]["reward"]
    if items[0]["reward"] == floor:
        return [], [], "all_tied"
    may_lead = POSITIVE_RULES[config.truncated]
    positives = [item for item in items if item["reward"] > floor and may_lead(item)][:config.num_positives]
    if not positives:
        return [], [], "no_finished_positive"
    items = [item for item in items if item["reward"] < positives[-1]["reward"] or item in positives
             or item["reward"] == positives[-1]["reward"] and may_lead(item)]
    lowest_positive = positives[-1]["reward"]
    eligible = [item for item in items[len(positives):]
                if lowest_positive - item["reward"] >= config.min_margin - MARGIN_TOLERANCE
                and TIE_RULES[config.ties](item["reward"], lowest_positive)]
    if not eligible:
        return positives, [], "no_negative"
    return positives, LIST_STRATEGIES[config.strategy](eligible, config.num_negatives, rng), None


def build_lists(pool: list[dict[str, Any]], config, seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Group scored candidates by prompt and split each group into positives and negatives.

    `config` is a ListsConfig. `seed` (with the prompt_id) seeds the random
    strategy, so lists do not depend on the order of `pool`.
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in pool:
        groups[row["prompt_id"]].append(row)
    counts = {"prompts": len(groups), "lists": 0, "all_tied_dropped": 0, "no_negative_dropped": 0,
              "no_finished_positive_dropped": 0, "positives": 0, "negatives": 0, "ties_with_lowest_positive": 0,
              "truncated_positives": 0, "truncated_negatives": 0}
    lists = []
    for prompt_id, rows in groups.items():
        # .get: earlier rounds' scored shards may predate finish_reason's and the ids' columns.
        items = [{key: row.get(key) for key in ITEM_FIELDS} for row in sorted(rows, key=best_first)]
        positives, negatives, reason = split_pool(items, config, random.Random(f"{seed}/{prompt_id}"))
        if reason:
            counts[f"{reason}_dropped"] += 1
            continue
        counts["ties_with_lowest_positive"] += sum(item["reward"] == positives[-1]["reward"]
                                                   for item in items[len(positives):])
        counts["positives"] += len(positives)
        counts["negatives"] += len(negatives)
        counts["truncated_positives"] += sum(map(is_truncated, positives))
        counts["truncated_negatives"] += sum(map(is_truncated, negatives))
        # The prompt as this round asked it (an earlier round's copy comes later in the group).
        lists.append({"prompt_id": prompt_id, "prompt": rows[0]["prompt"], "positives": positives,
                      "negatives": negatives, "metadata": rows[0]["metadata"]})
    counts["lists"] = len(lists)
    return lists, counts


# --- the stage ------------------------------------------------------------------

def reward_counters(tally: dict[str, int]) -> dict[str, int]:
    """The rewards' own counters (a judge's judge_calls, judge_unparsed...), named by the rewards so
    that they are told apart in the stage's statistics; `comparisons` keeps its own key and line."""
    return {key: value for key, value in sorted(tally.items()) if key != "comparisons"}


def run_stage(plan, out_dir: Path) -> dict[str, Any]:
    config = plan.config
    number = plan.round.number
    with timing.timed("io"):
        candidates = read_parquet_dir(plan.round.candidates).to_pylist()
    retries = WorkerRetries("rerank", "reward_actor", config.worker_retries)
    tally: dict[str, int] = {}
    rewards = score_candidates(candidates, config.reward, retries, layout_of(plan).reward_actor, tally)
    if tally.get("comparisons"):
        # Into the stage's log (stderr is captured there): a pairwise reranker's cost is its comparisons.
        print(f"the reward made {tally['comparisons']} pairwise comparisons for {len(candidates)} candidates",
              file=sys.stderr, flush=True)
    counters = reward_counters(tally)
    if counters:
        print(f"the reward counted for {len(candidates)} candidates: "
              + ", ".join(f"{key} {value}" for key, value in counters.items()), file=sys.stderr, flush=True)
    scored = [{**row, "reward": reward} for row, reward in zip(candidates, rewards, strict=True)]
    valid, invalid = screen_rewards(scored, config.reward.on_invalid)
    prompt_ids = {row["prompt_id"] for row in candidates}
    with timing.timed("io"):
        earlier = earlier_scored(plan.run, number, config.lists.memory, prompt_ids)
    if config.lists.memory != "none" and number > 1 and not earlier:
        log.warning("round %d: lists.memory=%s found no earlier answer to any of this round's prompts (each "
                    "round draws new prompts until the set is used up): it changes nothing here; to train on "
                    "earlier rounds' lists, set train.replay", number, config.lists.memory)
    with timing.timed("work"):
        pool, duplicates = candidate_pool(valid, earlier)
        lists, counts = build_lists(pool, config.lists, seed=derive_seed(config.seed, "lists", number))
    with timing.timed("io"):
        write_parquet(pa.Table.from_pylist(lists, schema=schema.LISTS), out_dir / shard_name(0))
        write_parquet(pa.Table.from_pylist(scored, schema=schema.SCORED), plan.round.partial("rerank", "scored")
                      / shard_name(0))
    items = [item for row in lists for item in row["positives"] + row["negatives"]]
    return {
        **counts,
        # prompts == lists + all_tied_dropped + no_negative_dropped + no_finished_positive_dropped
        #            + all_invalid_dropped
        "prompts": len(prompt_ids),
        "all_invalid_dropped": len(prompt_ids) - counts["prompts"],
        "candidates": len(candidates),
        "invalid_rewards_dropped": invalid,
        "duplicates_dropped": duplicates,
        "memory_candidates": sum(row["round"] != number for row in pool),
        "memory_items_in_lists": sum(item["round"] != number for item in items),
        **reward_summary([row["reward"] for row in valid]),
        **retries.stats(),
        **({"reward_comparisons": tally["comparisons"]} if tally.get("comparisons") else {}),
        **counters,
    }
