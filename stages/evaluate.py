"""Evaluate: one response per held-out prompt from the new policy, scored by the reward.

Round 0 is the base model. Its held-out responses live where any round's do:
`round_000/eval/part-00000.parquet`, with `round_000/metrics.json` and
`round_000/_done/evaluate` (round 0 has no other stage). The driver runs this
stage on round 0, through the same `.partial` and `_done` protocol as every
stage, before the first round that evaluates, and later rounds reuse its
answers, so every round's win rate is against the same answers. A round 0
that does not cover this round's held-out prompts, or that was decoded with
other settings, is refused at planning time (`check_baseline`): delete
`round_000/` to have it redone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa

from core import schema, timing
from core.config import EvaluateConfig
from core.errors import PipelineError
from core.gpu_layout import layout_of
from core.layout import RunLayout, read_parquet_dir, shard_name, write_parquet
from core.prompts import Prompt
from core.retries import WorkerRetries
from core.seeds import derive_seed
from core.stats import paired_bootstrap
from pools.reward_scorers import score_candidates
from pools.vllm_engines import SamplingSpec
from rewards.base import needs_whole_prompts
from rewards.constraints import check_all
from stages.generate import generate_shards

log = logging.getLogger("pipeline.evaluate")

# What a round's metrics.json carries under "eval" (None where evaluation was off).
EVAL_KEYS = ("eval_prompts", "reward_mean", "win_rate", "pass_rate", "response_tokens_mean", "truncated_rate",
             "pass_count_by_kind",
             "vs_round_0", "pass_rate_by_kind")
# Decoding settings that must match round 0's for a win rate to mean anything: the
# evaluate knobs that define the run (core/config.py).
SETTINGS = tuple(f.name for f in dataclasses.fields(EvaluateConfig) if f.metadata["identity"])


def eval_rows(prompts: list[Prompt], outputs: list[list[dict]], round_number: int, policy: str) -> list[dict]:
    return [{"prompt_id": p.prompt_id, "prompt": p.messages, "response": out[0]["text"], "reward": None,
             "num_tokens": out[0]["num_tokens"], "round": round_number, "policy": policy,
             "metadata": json.dumps(p.metadata, sort_keys=True), "finish_reason": out[0]["finish_reason"],
             "response_token_ids": out[0]["token_ids"]}
            for p, out in zip(prompts, outputs, strict=True)]


def paired_rows(current: list[dict], baseline: list[dict]) -> list[tuple[dict, dict]]:
    """(current row, baseline row) for every current prompt, matched by prompt_id.

    A current prompt without a baseline row is an error rather than left out:
    skipping it would quietly change which prompts a rate is over. Baseline rows
    for other prompts are ignored.
    """
    base: dict[str, dict] = {}
    for row in baseline:
        if row["prompt_id"] in base:
            raise PipelineError(f"baseline has two responses for prompt_id {row['prompt_id']!r}")
        base[row["prompt_id"]] = row
    seen: set[str] = set()
    pairs = []
    for row in current:
        prompt_id = row["prompt_id"]
        if prompt_id in seen:
            raise PipelineError(f"evaluation has two responses for prompt_id {prompt_id!r}")
        seen.add(prompt_id)
        if prompt_id not in base:
            raise PipelineError(f"prompt_id {prompt_id!r} has no baseline (round 0) response")
        pairs.append((row, base[prompt_id]))
    return pairs


def win_score(ours: float, theirs: float) -> float | None:
    # A pair where either reward is not finite (reward.on_invalid=drop) cannot be compared.
    if not (math.isfinite(ours) and math.isfinite(theirs)):
        return None
    return 1.0 if ours > theirs else 0.5 if ours == theirs else 0.0


def win_rate(current: list[dict], baseline: list[dict]) -> float | None:
    """Mean over `current`'s prompts of 1 (reward above the baseline's), 0.5 (equal) or 0 (below).

    Pairs that cannot be compared are left out; None when no pair can be.
    """
    wins = [w for row, base in paired_rows(current, baseline) if (w := win_score(row["reward"], base["reward"])) is not None]
    return sum(wins) / len(wins) if wins else None


def constraints_of(row: dict) -> list:
    metadata = row["metadata"]
    constraints = (json.loads(metadata) if isinstance(metadata, str) else metadata or {}).get("constraints")
    return [] if constraints is None else list(constraints)


def strict_pass(row: dict) -> bool | None:
    """Does the response meet every constraint of its prompt? None for a prompt without any.

    Checked against the constraints themselves rather than read off the reward,
    so it stays right when the reward is graded, a classifier or a mix.
    """
    constraints = constraints_of(row)
    return all(check_all(row["response"], constraints)) if constraints else None


def pass_rate(rows: list[dict]) -> float | None:
    """Share of responses meeting every constraint of their prompt; None when no prompt has any."""
    passes = [p for row in rows if (p := strict_pass(row)) is not None]
    return sum(passes) / len(passes) if passes else None


def met_by_kind(rows: list[dict]) -> dict[str, list[bool]]:
    """For each constraint kind, whether each response of a prompt asking for it meets it."""
    met: dict[str, list[bool]] = {}
    for row in rows:
        constraints = constraints_of(row)
        for constraint, ok in zip(constraints, check_all(row["response"], constraints), strict=True):
            met.setdefault(str(constraint["kind"]), []).append(ok)
    return dict(sorted(met.items()))


def pass_rate_by_kind(rows: list[dict]) -> dict[str, float]:
    """For each constraint kind, the share of the prompts asking for it whose response meets it."""
    return {kind: sum(oks) / len(oks) for kind, oks in met_by_kind(rows).items()}


def pass_count_by_kind(rows: list[dict]) -> dict[str, list[int]]:
    """For each constraint kind, [responses meeting it, prompts asking for it]: the rates' denominators."""
    return {kind: [sum(oks), len(oks)] for kind, oks in met_by_kind(rows).items()}


def constraints_met(row: dict) -> list[bool] | None:
    """Each of the prompt's constraints, met or not, in the prompt's order; None without constraints."""
    constraints = constraints_of(row)
    return check_all(row["response"], constraints) if constraints else None


def intervals_vs_round_0(current: list[dict], baseline: list[dict]) -> dict[str, dict[str, float]]:
    """Each headline metric of `current` against round 0, with a 95% paired bootstrap interval.

    `value` is this round's metric, `baseline` round 0's on the same prompts (0.5 for
    the win rate, round 0 against itself), and `difference`, `low` and `high` bound
    their difference (stats.paired_bootstrap). A metric no pair can measure is left out.
    """
    # metric -> (this round's per-prompt value, round 0's) for the prompts it can measure.
    pairs: dict[str, list[tuple[float, float]]] = {"reward_mean": [], "pass_rate": [], "win_rate": []}
    for row, base in paired_rows(current, baseline):
        if (win := win_score(row["reward"], base["reward"])) is not None:
            pairs["reward_mean"].append((row["reward"], base["reward"]))
            pairs["win_rate"].append((win, 0.5))
        ours, theirs = strict_pass(row), strict_pass(base)
        if ours is not None and theirs is not None:
            pairs["pass_rate"].append((float(ours), float(theirs)))
    result = {}
    for key, values in pairs.items():
        if values:
            ours, theirs = zip(*values)
            result[key] = {"value": sum(ours) / len(ours), "baseline": sum(theirs) / len(theirs),
                           **paired_bootstrap([a - b for a, b in values]).as_dict(), "prompts": len(values)}
    return result


def eval_metrics(rows: list[dict], baseline: list[dict]) -> dict[str, Any]:
    """The metrics of EVAL_KEYS; rewards that are not finite are left out of the reward mean and counted."""
    n = len(rows)
    rewards = [r["reward"] for r in rows if math.isfinite(r["reward"])]
    return {"eval_prompts": n, "reward_mean": sum(rewards) / len(rewards) if rewards else None,
            "invalid_rewards": n - len(rewards), "win_rate": win_rate(rows, baseline),
            "pass_rate": pass_rate(rows), "response_tokens_mean": sum(r["num_tokens"] for r in rows) / n,
            # Answers cut at evaluate.max_tokens: they cannot meet end_phrase, postscript or quotation.
            "truncated_rate": sum(r.get("finish_reason") == "length" for r in rows) / n,
            "vs_round_0": intervals_vs_round_0(rows, baseline), "pass_rate_by_kind": pass_rate_by_kind(rows),
            "pass_count_by_kind": pass_count_by_kind(rows)}


def respond(prompts: list[Prompt], policy: str, round_number: int, config, out_dir: Path, engines=None,
            reward_gpus: float = 0.0, base_answers: dict[str, str] | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Generate one answer per prompt with `policy` (on the command's `engines` when given), score it
    on reward actors of `reward_gpus` GPUs each, write `out_dir/part-00000.parquet`.

    A reward that compares answers (a pairwise reranker) has nothing to compare one answer with: it
    scores each answer against round 0's to the same prompt (`base_answers`), so that its reward is
    the answer's margin over the base model's (round 0's own answers: 0, a tie with themselves)."""
    spec = SamplingSpec(1, config.evaluate.temperature, 1.0, config.evaluate.max_tokens)
    samples_dir = out_dir / "samples"

    def make_table(chunk: list[Prompt], outputs: list[list[dict]]) -> pa.Table:
        return pa.Table.from_pylist(eval_rows(chunk, outputs, round_number, policy), schema=schema.EVAL)

    stats = generate_shards(prompts, policy, spec, config, samples_dir,
                            derive_seed(config.seed, "evaluate", round_number), make_table, engines, stage="evaluate")
    with timing.timed("io"):
        rows = read_parquet_dir(samples_dir).to_pylist()
    retries = WorkerRetries("evaluate", "reward_actor", config.worker_retries)
    for row, reward in zip(rows, reward_rows(rows, config.reward, retries, reward_gpus, base_answers), strict=True):
        if not math.isfinite(reward) and config.reward.on_invalid == "error":
            raise PipelineError(f"reward of held-out prompt_id {row['prompt_id']!r} (round {round_number}) is "
                                f"{reward}; set reward.on_invalid=drop to leave such answers out of the metrics")
        row["reward"] = reward
        row["constraints_met"] = constraints_met(row)
    with timing.timed("io"):
        write_parquet(pa.Table.from_pylist(rows, schema=schema.EVAL), out_dir / shard_name(0))
        shutil.rmtree(samples_dir)
    return rows, {**stats, **retries.stats(), "policy": policy,
                  **{key: getattr(config.evaluate, key) for key in SETTINGS}}


def reward_rows(rows: list[dict], reward_config, retries: WorkerRetries, reward_gpus: float,
                base_answers: dict[str, str] | None) -> list[float]:
    """Each answer's reward; beside round 0's answer to its prompt when the reward compares answers."""
    if base_answers is None or not needs_whole_prompts(reward_config):
        # Round 0 with a comparing reward: each answer alone, nothing to beat, a reward of 0.
        return score_candidates(rows, reward_config, retries, reward_gpus)
    pairs = [[row, {**row, "response": base_answers.get(row["prompt_id"], row["response"])}] for row in rows]
    scores = score_candidates([r for pair in pairs for r in pair], reward_config, retries, reward_gpus)
    return scores[0::2]


def check_not_collapsed(rows: list[dict], baseline: list[dict], round_number: int, training_log: Path) -> None:
    """Stop a round whose policy answers every held-out prompt with nothing where the base model
    (round 0) answered: a policy that training broke without a NaN (huge but finite weights), which
    the next round would otherwise sample from. Some empty answers are a policy's own business, and a
    base model that answers nothing either (a random-weight test model) had nothing to collapse."""
    if rows and not any(row["response"].strip() for row in rows) \
            and any(row["response"].strip() for row in baseline):
        raise PipelineError(f"round {round_number}: training collapsed the policy: every one of the {len(rows)} "
                            f"held-out answers is empty; see {training_log} (and the trackers) for its loss and "
                            "ranking accuracy, and start a new run with a lower train.learning_rate")


def check_baseline(run: RunLayout, heldout: list[Prompt], config) -> None:
    """Refuse, before a round runs, a round 0 that this round's win rate could not be measured against."""
    baseline = run.round(0)
    if not heldout or not baseline.is_done("evaluate"):
        return
    stats = baseline.stage_stats("evaluate")
    redo = f"delete {baseline.dir} to have it redone with this config"
    for key in SETTINGS:
        ours = getattr(config.evaluate, key)
        if stats.get(key) != ours:
            raise PipelineError(f"config key 'evaluate.{key}' is {ours!r} but round 0's held-out answers were "
                                f"made with {stats.get(key)!r}; {redo}")
    try:
        have = set(read_parquet_dir(baseline.eval).column("prompt_id").to_pylist())
    except (OSError, pa.ArrowException) as exc:
        raise PipelineError(f"round 0's answers in {baseline.eval} cannot be read ({exc}); {redo}") from None
    missing = [p.prompt_id for p in heldout if p.prompt_id not in have]
    if missing:
        raise PipelineError(f"round 0's answers in {baseline.eval} cover {len(heldout) - len(missing)} of this "
                            f"round's {len(heldout)} held-out prompts (first missing: {missing[0]!r}; did "
                            f"prompts.eval_size grow?); {redo}")


def run_stage(plan, out_dir: Path) -> dict[str, Any]:
    if not plan.heldout:
        # prompts.eval_size 0 turns evaluation off: an empty shard keeps the layout whole.
        log.info("round %d: no held-out prompts (prompts.eval_size 0, or all too long): nothing evaluated",
                 plan.round.number)
        write_parquet(pa.Table.from_pylist([], schema=schema.EVAL), out_dir / shard_name(0))
        return {"eval_prompts": 0}
    number = plan.round.number
    policy = plan.base_model if number == 0 else str(plan.round.policy)
    compare = {}
    if number > 0 and needs_whole_prompts(plan.config.reward):
        with timing.timed("io"):
            compare["base_answers"] = {row["prompt_id"]: row["response"]
                                       for row in read_parquet_dir(plan.run.round(0).eval).to_pylist()}
    rows, stats = respond(plan.heldout, policy, number, plan.config, out_dir, plan.engines,
                          reward_gpus=layout_of(plan).reward_actor, **compare)
    if number == 0:
        return {**eval_metrics(rows, rows), **stats}
    with timing.timed("io"):
        baseline = read_parquet_dir(plan.run.round(0).eval).to_pylist()
    check_not_collapsed(rows, baseline, number, plan.round.policy / "training_log.jsonl")
    return {**eval_metrics(rows, baseline), **stats}
