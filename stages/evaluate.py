"""Evaluate: one response per held-out prompt from the new policy, scored by the reward.

Round 0 is the base model. Its held-out responses live where any round's do:
`round_000/eval/part-00000.parquet`, with `round_000/metrics.json` and
`round_000/_done/evaluate` (round 0 has no other stage). The evaluate stage of
the first round that needs them writes them, through the same `.partial` and
`_done` protocol as every stage, and later rounds reuse them, so every round's
win rate is against the same answers. A round 0 that does not cover this
round's held-out prompts, or that was decoded with other settings, is refused
at planning time (`check_baseline`): delete `round_000/` to have it redone.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline import schema, timing
from pipeline.errors import PipelineError
from pipeline.layout import RunLayout, atomic_write_json, read_parquet_dir, shard_name, write_parquet
from pipeline.prompts import Prompt
from rewards.constraints import check_all
from stages.generate import SamplingSpec, generate_shards
from stages.rerank import score_candidates

log = logging.getLogger("pipeline.evaluate")

# What a round's metrics.json carries under "eval" (None where evaluation was off).
EVAL_KEYS = ("eval_prompts", "reward_mean", "win_rate", "pass_rate", "response_tokens_mean")
# Decoding settings that must match round 0's for a win rate to mean anything.
SETTINGS = ("temperature", "max_tokens")


def eval_rows(prompts: list[Prompt], outputs: list[list[dict]], round_number: int, policy: str) -> list[dict]:
    return [{"prompt_id": p.prompt_id, "prompt": p.messages, "response": out[0]["text"], "reward": None,
             "num_tokens": out[0]["num_tokens"], "round": round_number, "policy": policy,
             "metadata": json.dumps(p.metadata, sort_keys=True)}
            for p, out in zip(prompts, outputs, strict=True)]


def win_rate(current: list[dict], baseline: list[dict]) -> float | None:
    """Mean over `current`'s prompts of 1 (reward above the baseline's), 0.5 (equal) or 0 (below).

    Rows are matched by prompt_id. A current prompt without a baseline row is
    an error rather than left out: skipping it would quietly change which
    prompts the rate is over. Baseline rows for other prompts are ignored. A
    pair where either reward is not finite (reward.on_invalid=drop) cannot be
    compared and is left out; None when no pair can be.
    """
    base: dict[str, float] = {}
    for row in baseline:
        if row["prompt_id"] in base:
            raise PipelineError(f"baseline has two responses for prompt_id {row['prompt_id']!r}")
        base[row["prompt_id"]] = row["reward"]
    seen: set[str] = set()
    wins, compared = 0.0, 0
    for row in current:
        prompt_id = row["prompt_id"]
        if prompt_id in seen:
            raise PipelineError(f"evaluation has two responses for prompt_id {prompt_id!r}")
        seen.add(prompt_id)
        if prompt_id not in base:
            raise PipelineError(f"prompt_id {prompt_id!r} has no baseline (round 0) response")
        ours, theirs = row["reward"], base[prompt_id]
        if not (math.isfinite(ours) and math.isfinite(theirs)):
            continue
        compared += 1
        wins += 1.0 if ours > theirs else 0.5 if ours == theirs else 0.0
    return wins / compared if compared else None


def pass_rate(rows: list[dict]) -> float | None:
    """Share of responses meeting every constraint of their prompt's metadata.

    Checked against the constraints themselves rather than read off the reward,
    so it stays right when the reward is a classifier or a mix. Prompts without
    constraints are not counted; None when no prompt has any.
    """
    checked = passed = 0
    for row in rows:
        metadata = row["metadata"]
        constraints = (json.loads(metadata) if isinstance(metadata, str) else metadata or {}).get("constraints")
        if constraints is None or len(constraints) == 0:
            continue
        checked += 1
        passed += all(check_all(row["response"], constraints))
    return passed / checked if checked else None


def eval_metrics(rows: list[dict], baseline: list[dict]) -> dict[str, Any]:
    """The metrics of EVAL_KEYS; rewards that are not finite are left out of the reward mean and counted."""
    n = len(rows)
    rewards = [r["reward"] for r in rows if math.isfinite(r["reward"])]
    return {"eval_prompts": n, "reward_mean": sum(rewards) / len(rewards) if rewards else None,
            "invalid_rewards": n - len(rewards), "win_rate": win_rate(rows, baseline),
            "pass_rate": pass_rate(rows), "response_tokens_mean": sum(r["num_tokens"] for r in rows) / n}


def respond(prompts: list[Prompt], policy: str, round_number: int, config, out_dir: Path
            ) -> tuple[list[dict], dict[str, Any]]:
    """Generate one answer per prompt with `policy`, score it, write `out_dir/part-00000.parquet`."""
    spec = SamplingSpec(1, config.evaluate.temperature, 1.0, config.evaluate.max_tokens)
    samples_dir = out_dir / "samples"

    def make_table(chunk: list[Prompt], outputs: list[list[dict]]) -> pa.Table:
        return pa.Table.from_pylist(eval_rows(chunk, outputs, round_number, policy), schema=schema.EVAL)

    # The same engine seed every round: only the policy differs between rounds' answers.
    stats = generate_shards(prompts, policy, spec, config, samples_dir, config.seed, make_table)
    with timing.timed("io"):
        rows = read_parquet_dir(samples_dir).to_pylist()
    for row, reward in zip(rows, score_candidates(rows, config.reward), strict=True):
        if not math.isfinite(reward) and config.reward.on_invalid == "error":
            raise PipelineError(f"reward of held-out prompt_id {row['prompt_id']!r} (round {round_number}) is "
                                f"{reward}; set reward.on_invalid=drop to leave such answers out of the metrics")
        row["reward"] = reward
    with timing.timed("io"):
        write_parquet(pa.Table.from_pylist(rows, schema=schema.EVAL), out_dir / shard_name(0))
        shutil.rmtree(samples_dir)
    return rows, {**stats, "policy": policy, **{key: getattr(config.evaluate, key) for key in SETTINGS}}


def ensure_baseline(plan) -> list[dict]:
    """Round 0's scored held-out answers: read them, or generate them from the base model once."""
    baseline = plan.run.round(0)
    if not baseline.is_done("evaluate"):
        log.info("round 0: evaluating the base model %s on %d held-out prompts", plan.base_model,
                 len(plan.heldout))
        start = time.perf_counter()
        # Round 0's own breakdown for its stats; it also counts in the evaluate stage that made it.
        timings = timing.Timings()
        with timings.active():
            rows, stats = respond(plan.heldout, plan.base_model, 0, plan.config, baseline.begin_stage("evaluate"))
        timing.add(timings.seconds)
        stats = {**eval_metrics(rows, rows), **stats, "wall_seconds": round(time.perf_counter() - start, 2),
                 **timings.stats()}
        # metrics.json before the marker: a crash between the two redoes round 0, never leaves it half-made.
        atomic_write_json(baseline.metrics, {
            "round": 0, "policy": plan.base_model, "eval": {k: stats.get(k) for k in EVAL_KEYS},
            "stage_seconds": {"evaluate": stats["wall_seconds"]}, "stages": {"evaluate": stats},
        })
        baseline.finish_stage("evaluate", stats)
        log.info("round 0: base model evaluated in %.1f s", stats["wall_seconds"])
    with timing.timed("io"):
        return read_parquet_dir(baseline.eval).to_pylist()


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
    made_baseline = not plan.run.round(0).is_done("evaluate")
    baseline = ensure_baseline(plan)
    rows, stats = respond(plan.heldout, str(plan.round.policy), plan.round.number, plan.config, out_dir)
    # A run's first evaluate stage also evaluates the base model, once: say how much of its wall time that was.
    once = {"baseline_seconds": plan.run.round(0).stage_stats("evaluate")["wall_seconds"]} if made_baseline else {}
    return {**eval_metrics(rows, baseline), **stats, **once}
