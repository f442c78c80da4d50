"""The evaluate stage's metrics on hand-made rows, and round 0's answers made once and then reused."""

import json
import math
import random

import pyarrow as pa
import pytest

from core import schema
from core.errors import PipelineError
from core.layout import RunLayout, read_parquet_dir, shard_name, write_parquet
from core.prompts import Prompt
from pipeline.settings import load_config
from pipeline import driver
from stages import evaluate
from stages.evaluate import check_baseline, eval_metrics, pass_rate, win_rate

MAX_WORDS_3 = {"constraints": [{"kind": "max_words", "limit": 3}]}
LOWER_AND_SHORT = {"constraints": [{"kind": "max_words", "limit": 3}, {"kind": "lowercase"}]}


def row(prompt_id: str, reward: float, response: str = "ok", metadata: dict | None = None, tokens: int = 1) -> dict:
    return {"prompt_id": prompt_id, "reward": reward, "response": response, "num_tokens": tokens,
            "metadata": json.dumps(metadata if metadata is not None else MAX_WORDS_3)}


# --- win rate -------------------------------------------------------------------

def test_win_loss_and_tie_count_one_zero_and_half():
    baseline = [row("a", 0.5), row("b", 0.5), row("c", 0.5), row("d", 0.0)]
    current = [row("a", 1.0), row("b", 0.5), row("c", 0.0), row("d", 0.25)]
    assert win_rate(current, baseline) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_win_rate_matches_rows_by_prompt_id_not_position():
    baseline = [row(f"p{i}", i / 10) for i in range(10)]
    current = [row(f"p{i}", i / 10 + (0.05 if i < 3 else 0.0)) for i in range(10)]
    expected = win_rate(current, baseline)
    random.Random(0).shuffle(baseline)
    assert win_rate(current, baseline) == expected == pytest.approx((3 * 1 + 7 * 0.5) / 10)


def test_a_round_against_itself_is_one_half():
    rows = [row("a", 0.0), row("b", 1.0), row("c", 0.3)]
    assert win_rate(rows, rows) == 0.5


def test_baseline_prompts_this_round_did_not_ask_are_ignored():
    assert win_rate([row("a", 1.0)], [row("a", 0.0), row("z", 1.0)]) == 1.0


def test_a_prompt_missing_from_the_baseline_is_an_error():
    with pytest.raises(PipelineError, match="'b'.*no baseline"):
        win_rate([row("a", 1.0), row("b", 1.0)], [row("a", 0.0)])


@pytest.mark.parametrize("side", ["current", "baseline"])
def test_duplicate_prompt_ids_are_an_error(side):
    once, twice = [row("a", 1.0)], [row("a", 1.0), row("a", 0.0)]
    current, baseline = (twice, once) if side == "current" else (once, twice)
    with pytest.raises(PipelineError, match="two responses for prompt_id 'a'"):
        win_rate(current, baseline)


def test_pairs_with_a_non_finite_reward_are_left_out():
    baseline = [row("a", 0.0), row("b", math.nan), row("c", 1.0)]
    current = [row("a", 1.0), row("b", 1.0), row("c", math.nan)]
    assert win_rate(current, baseline) == 1.0
    assert win_rate([row("b", 1.0)], baseline) is None


# --- pass rate ------------------------------------------------------------------

def test_pass_rate_checks_the_constraints_not_the_reward():
    rows = [
        row("a", 0.0, "three short words", LOWER_AND_SHORT),     # meets both, whatever the reward says
        row("b", 1.0, "Three Short Words", LOWER_AND_SHORT),     # not lowercase
        row("c", 1.0, "far too many words here", MAX_WORDS_3),  # too long
        row("d", 0.0, "fine", MAX_WORDS_3),
    ]
    assert pass_rate(rows) == 0.5


def test_a_blank_answer_meets_no_constraint():
    assert pass_rate([row("a", 1.0, "   ", MAX_WORDS_3)]) == 0.0


def test_prompts_without_constraints_are_not_counted():
    rows = [row("a", 1.0, "fine", MAX_WORDS_3), row("b", 1.0, "anything at all", {}),
            row("c", 1.0, "x", {"constraints": []})]
    assert pass_rate(rows) == 1.0
    assert pass_rate(rows[1:]) is None


def test_eval_metrics_means_and_invalid_rewards():
    baseline = [row("a", 0.5), row("b", 0.5), row("c", 0.5)]
    rows = [row("a", 1.0, tokens=4), row("b", 0.0, tokens=8), row("c", math.nan, tokens=6)]
    metrics = eval_metrics(rows, baseline)
    assert metrics["eval_prompts"] == 3
    assert metrics["reward_mean"] == pytest.approx(0.5)
    assert metrics["invalid_rewards"] == 1
    assert metrics["win_rate"] == pytest.approx(0.5)
    assert metrics["response_tokens_mean"] == pytest.approx(6.0)
    assert set(evaluate.EVAL_KEYS) <= set(metrics)


def test_intervals_against_round_0_are_paired_by_prompt():
    # Round 0 fails every prompt; this round passes 30 of 40: +0.75 in pass rate, all wins or ties.
    baseline = [row(f"p{i}", 0.0, "far too many words here") for i in range(40)]
    current = [row(f"p{i}", 1.0 if i < 30 else 0.0, "fine" if i < 30 else "far too many words here")
               for i in range(40)]
    intervals = evaluate.intervals_vs_round_0(current, list(reversed(baseline)))
    passed = intervals["pass_rate"]
    assert passed["value"] == 0.75 and passed["baseline"] == 0.0 and passed["prompts"] == 40
    assert passed["difference"] == pytest.approx(0.75)
    assert 0.55 < passed["low"] < 0.75 < passed["high"] < 0.9
    assert intervals["reward_mean"]["difference"] == pytest.approx(0.75)
    win = intervals["win_rate"]
    assert win["value"] == pytest.approx(0.875) and win["baseline"] == 0.5
    assert win["difference"] == pytest.approx(0.375) and win["low"] > 0


def test_a_round_against_itself_has_no_difference():
    rows = [row(f"p{i}", i % 3 / 2, "fine" if i % 2 else "far too many words") for i in range(20)]
    for interval in evaluate.intervals_vs_round_0(rows, rows).values():
        assert interval["difference"] == interval["low"] == interval["high"] == 0.0


def test_intervals_leave_out_what_cannot_be_compared():
    baseline = [row("a", math.nan, "fine"), row("b", 0.0, "fine", {})]
    current = [row("a", 1.0, "fine"), row("b", 1.0, "fine", {})]
    intervals = evaluate.intervals_vs_round_0(current, baseline)
    assert set(intervals) == {"reward_mean", "win_rate", "pass_rate"}
    assert intervals["reward_mean"]["prompts"] == 1 and intervals["pass_rate"]["prompts"] == 1
    assert evaluate.intervals_vs_round_0([row("a", math.nan, "x", {})], [row("a", 0.0, "x", {})]) == {}


def test_pass_rate_by_kind_counts_each_constraint():
    rows = [row("a", 0.0, "three short words", LOWER_AND_SHORT),
            row("b", 0.0, "Three Short Words", LOWER_AND_SHORT),
            row("c", 0.0, "far too many words here", MAX_WORDS_3),
            row("d", 0.0, "x", {})]
    assert evaluate.pass_rate_by_kind(rows) == {"lowercase": 0.5, "max_words": pytest.approx(2 / 3)}
    assert evaluate.pass_count_by_kind(rows) == {"lowercase": [1, 2], "max_words": [2, 3]}
    # The eval shard keeps each constraint's result, in the prompt's order.
    assert [evaluate.constraints_met(r) for r in rows] == [[True, True], [True, False], [False], None]


# --- round 0 --------------------------------------------------------------------

def prompts(n: int) -> list[Prompt]:
    return [Prompt(f"h{i}", [{"role": "user", "content": f"Question {i}?"}], MAX_WORDS_3) for i in range(n)]


@pytest.fixture
def config():
    return load_config("configs/smoke.yaml")


def fake_respond(calls: list):
    """Stands in for vLLM: answers 'word' * (round + 1), so later rounds answer longer."""
    def respond(heldout, policy, round_number, config, out_dir, engines=None, reward_gpus=0.0):
        calls.append((policy, round_number))
        outputs = [[{"text": " ".join(["word"] * (round_number + 1)), "num_tokens": round_number + 1,
                     "finish_reason": "stop", "token_ids": [7] * round_number + [2]}]
                   for _ in heldout]
        rows = evaluate.eval_rows(heldout, outputs, round_number, policy)
        for r in rows:
            r["reward"] = 1.0 if pass_rate([r]) else 0.0
        write_parquet(pa.Table.from_pylist(rows, schema=schema.EVAL), out_dir / shard_name(0))
        return rows, {"policy": policy, "temperature": config.evaluate.temperature,
                      "max_tokens": config.evaluate.max_tokens}
    return respond


def plan_for(tmp_path, config, number: int, heldout: list[Prompt]) -> driver.RoundPlan:
    run = RunLayout(tmp_path / "run")
    return driver.RoundPlan(config, run, run.round(number), base_model="/models/base", policy_in="/models/base",
                            reference="/models/base", prompts=[], heldout=heldout, dropped_too_long=[])


def evaluate_round(plan: driver.RoundPlan) -> dict:
    """The evaluate stage as the driver runs it: round 0 through the stage path first, once."""
    baseline = driver.baseline_plan(plan)
    if plan.heldout and not baseline.round.is_done("evaluate"):
        driver.run_one_stage(baseline, "evaluate", lambda *args, **kwargs: None)
        driver.write_baseline_metrics(baseline)
    return evaluate.run_stage(plan, plan.round.begin_stage("evaluate"))


def test_round_0_is_made_once_then_reused(tmp_path, config, monkeypatch):
    calls = []
    monkeypatch.setattr(evaluate, "respond", fake_respond(calls))
    heldout = prompts(3)
    for number in (1, 2, 3):
        plan = plan_for(tmp_path, config, number, heldout)
        stats = evaluate_round(plan)
        # Rounds 1 and 2 answer with 2 and 3 words (within 3): a tie with round 0; round 3 goes over.
        assert stats["win_rate"] == (0.5 if number < 3 else 0.0)
    assert calls == [("/models/base", 0), (str(plan.run.round(1).policy), 1),
                     (str(plan.run.round(2).policy), 2), (str(plan.run.round(3).policy), 3)]
    round0 = plan.run.round(0)
    assert round0.is_done("evaluate")
    assert not round0.partial("evaluate").exists()
    metrics = json.loads(round0.metrics.read_text())
    assert metrics["round"] == 0 and metrics["policy"] == "/models/base"
    assert metrics["eval"]["win_rate"] == 0.5
    assert metrics["eval"]["eval_prompts"] == 3
    assert [r["round"] for r in read_parquet_dir(round0.eval).to_pylist()] == [0, 0, 0]


def test_evaluation_off_makes_no_round_0(tmp_path, config, monkeypatch):
    calls = []
    monkeypatch.setattr(evaluate, "respond", fake_respond(calls))
    plan = plan_for(tmp_path, config, 1, [])
    assert evaluate_round(plan) == {"eval_prompts": 0}
    assert read_parquet_dir(plan.round.partial("evaluate")).num_rows == 0
    assert calls == [] and not plan.run.round(0).dir.exists()
    check_baseline(plan.run, [], config)  # nothing to check against


def make_round_0(tmp_path, config, monkeypatch, heldout):
    monkeypatch.setattr(evaluate, "respond", fake_respond([]))
    evaluate_round(plan_for(tmp_path, config, 1, heldout))
    return RunLayout(tmp_path / "run")


def test_check_baseline_accepts_a_covering_round_0(tmp_path, config, monkeypatch):
    run = make_round_0(tmp_path, config, monkeypatch, prompts(4))
    check_baseline(run, prompts(4), config)
    check_baseline(run, prompts(2), config)  # fewer prompts: a subset is still comparable
    check_baseline(RunLayout(tmp_path / "other"), prompts(4), config)  # no round 0 yet: made later


def test_check_baseline_refuses_a_round_0_without_this_rounds_prompts(tmp_path, config, monkeypatch):
    run = make_round_0(tmp_path, config, monkeypatch, prompts(2))
    with pytest.raises(PipelineError, match=r"cover 2 of .* 4 held-out prompts.*'h2'.*eval_size.*round_000"):
        check_baseline(run, prompts(4), config)


@pytest.mark.parametrize("key, value", [("temperature", 0.7), ("max_tokens", 5)])
def test_check_baseline_refuses_other_decoding_settings(tmp_path, config, monkeypatch, key, value):
    run = make_round_0(tmp_path, config, monkeypatch, prompts(2))
    changed = load_config("configs/smoke.yaml", [f"evaluate.{key}={value}"])
    with pytest.raises(PipelineError, match=rf"'evaluate.{key}' is {value!r}.*round_000"):
        check_baseline(run, prompts(2), changed)
