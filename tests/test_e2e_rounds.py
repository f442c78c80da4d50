"""Two smoke rounds end to end: real vLLM, real Ray, real Ray Train, through the CLI.

The rounds run once per test session (conftest.py's `smoke_run`, about five
minutes); each test then checks one part of the contracts in docs/contracts.md on what
they left behind.
"""

import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from core.layout import STAGES
from pipeline.report import read_training_log
from tests import wandb_records
from tests.conftest import REPO_ROOT, TRACK_ALL, run_cli
from tests.test_tracking import mlflow_run, tensorboard_scalars

pytestmark = pytest.mark.e2e

SMOKE = yaml.safe_load((REPO_ROOT / "configs" / "smoke.yaml").read_text())


@pytest.fixture(scope="module")
def run_dir(smoke_run) -> Path:
    return smoke_run


def read(directory: Path) -> list[dict]:
    return pq.read_table(directory).to_pylist()


def weights(policy: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(policy.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("number", [1, 2])
def test_round_layout(run_dir, number):
    round_dir = run_dir / f"round_{number:03d}"
    assert (run_dir / "config.yaml").is_file()
    for name in ("candidates", "lists", "train", "eval"):
        assert (round_dir / name / "part-00000.parquet").is_file(), name
    assert (round_dir / "policy" / "config.json").is_file()
    assert list((round_dir / "policy").glob("*.safetensors"))
    assert sorted(p.name for p in (round_dir / "_done").iterdir()) == sorted(STAGES)
    assert not list(round_dir.glob("*.partial")), "a stage left its partial output behind"
    assert not list(round_dir.rglob(".*.tmp")), "a temporary file was left behind"


@pytest.mark.parametrize("number", [1, 2])
def test_candidates_contract(run_dir, tiny_model, number):
    table = pq.read_table(run_dir / f"round_{number:03d}" / "candidates")
    schema = table.schema
    assert schema.field("prompt_id").type == pa.string()
    assert schema.field("response").type == pa.string()
    assert pa.types.is_integer(schema.field("sample_index").type)
    assert pa.types.is_integer(schema.field("round").type)
    assert pa.types.is_floating(schema.field("temperature").type)
    assert pa.types.is_integer(schema.field("num_tokens").type)
    assert schema.field("finish_reason").type == pa.string()
    assert schema.field("prompt").type == pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    rows = table.to_pylist()
    k, m = SMOKE["generate"]["num_samples"], SMOKE["prompts"]["per_round"]
    assert len(rows) == k * m
    by_prompt = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_id"], []).append(row["sample_index"])
        assert row["round"] == number
        assert row["temperature"] == SMOKE["generate"]["temperature"]
        assert 0 < row["num_tokens"] <= SMOKE["generate"]["max_tokens"]
        assert row["prompt"][-1]["role"] == "user"
    assert all(sorted(indices) == list(range(k)) for indices in by_prompt.values())
    expected_policy = str(tiny_model.resolve()) if number == 1 else str(run_dir / "round_001" / "policy")
    assert {row["policy"] for row in rows} == {expected_policy}


def test_rounds_draw_different_prompts(run_dir):
    first = {r["prompt_id"] for r in read(run_dir / "round_001" / "candidates")}
    second = {r["prompt_id"] for r in read(run_dir / "round_002" / "candidates")}
    assert first and second and not first & second


@pytest.mark.parametrize("number", [1, 2])
def test_lists_contract(run_dir, number):
    round_dir = run_dir / f"round_{number:03d}"
    lists = read(round_dir / "lists")
    candidates = read(round_dir / "candidates")
    assert lists, "smoke prompts are built so that some candidates differ in reward"
    stats = json.loads((round_dir / "_done" / "rerank").read_text())
    assert stats["lists"] == len(lists)
    assert stats["lists"] + stats["all_tied_dropped"] == len({c["prompt_id"] for c in candidates})
    responses = {(c["prompt_id"], c["sample_index"]): c["response"] for c in candidates}
    for row in lists:
        positives, negatives = row["positives"], row["negatives"]
        assert positives and negatives
        assert min(p["reward"] for p in positives) >= max(n["reward"] for n in negatives)
        for items in (positives, negatives):
            rewards = [item["reward"] for item in items]
            assert rewards == sorted(rewards, reverse=True)
            for item in items:
                assert 0.0 <= item["reward"] <= 1.0
                assert item["round"] == number
                assert responses[(row["prompt_id"], item["sample_index"])] == item["response"]
        # top_rest with ties dropped: one positive, and as negatives every candidate scored below it.
        scored = [c["reward"] for c in read(round_dir / "scored") if c["prompt_id"] == row["prompt_id"]]
        assert len(scored) == SMOKE["generate"]["num_samples"]
        assert len(positives) == 1 and positives[0]["reward"] == max(scored)
        assert len(negatives) == sum(r < positives[0]["reward"] for r in scored)


@pytest.mark.parametrize("number", [1, 2])
def test_train_shard_has_reference_logprobs(run_dir, tiny_model, number):
    round_dir = run_dir / f"round_{number:03d}"
    rows = read(round_dir / "train")
    assert len(rows) == len(read(round_dir / "lists"))
    expected_reference = str(tiny_model.resolve()) if number == 1 else str(run_dir / "round_001" / "policy")
    # The reference is the round's starting policy: the train workers scored it (reference.in_train_workers).
    assert json.loads((round_dir / "_done" / "reference").read_text())["in_train_workers"] is True
    for row in rows:
        assert row["reference"] == expected_reference
        for item in row["positives"] + row["negatives"]:
            assert math.isfinite(item["ref_logp"]) and item["ref_logp"] < 0


def test_checkpoints_change_every_round(run_dir, tiny_model):
    base = weights(tiny_model)
    first = weights(run_dir / "round_001" / "policy")
    second = weights(run_dir / "round_002" / "policy")
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k].float(), base[k].float()) for k in first if k in base)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    # Saved in fp32 so a round's small update survives.
    assert all(t.dtype == torch.float32 for t in second.values())


@pytest.mark.parametrize("number", [1, 2])
def test_eval_and_metrics(run_dir, number):
    round_dir = run_dir / f"round_{number:03d}"
    rows = read(round_dir / "eval")
    assert len(rows) == SMOKE["prompts"]["eval_size"]
    assert {r["policy"] for r in rows} == {str(round_dir / "policy")}
    assert all(0.0 <= r["reward"] <= 1.0 and isinstance(r["response"], str) for r in rows)
    metrics = json.loads((round_dir / "metrics.json").read_text())
    assert metrics["round"] == number
    assert metrics["eval"]["reward_mean"] == pytest.approx(sum(r["reward"] for r in rows) / len(rows))
    assert set(metrics["stage_seconds"]) == set(STAGES)
    # Each stage's time breakdown (core/timing.py): rerank's work on the smoke config can round to 0.00 s.
    assert set(metrics["stages"]) == set(STAGES)
    for stage, stats in metrics["stages"].items():
        if stage == "rerank":
            assert stats["work_seconds"] >= 0, stage
        else:
            assert stats["work_seconds"] > 0, stage
    assert metrics["round_seconds"] > 0
    # One wall time: the round's own, the same in pipeline.log and (round 0 apart) in metrics.json.
    assert 0 < metrics["wall_seconds"] <= metrics["round_seconds"]
    assert f"round {number} finished in {metrics['wall_seconds']:.1f} s" in (run_dir / "pipeline.log").read_text()
    assert metrics["code"]["commit"] and metrics["code"]["version"]
    assert all(len(r["response_token_ids"]) == r["num_tokens"] and r["finish_reason"] in ("stop", "length")
               for r in rows)
    assert all(len(r["constraints_met"]) == len(json.loads(r["metadata"])["constraints"]) for r in rows)
    assert metrics["eval"]["truncated_rate"] == pytest.approx(
        sum(r["finish_reason"] == "length" for r in rows) / len(rows))
    # The train stage's timings file is read into its stats and removed, not left in the checkpoint.
    assert not (round_dir / "policy" / "_timings.json").exists()
    assert metrics["train"]["steps"] >= 1
    assert all(v > 0 for v in metrics["stage_peak_memory_gib"].values())
    assert 0.0 <= metrics["eval"]["win_rate"] <= 1.0
    assert 0.0 <= metrics["eval"]["pass_rate"] <= 1.0
    assert metrics["eval"]["response_tokens_mean"] == pytest.approx(sum(r["num_tokens"] for r in rows) / len(rows))
    # Recomputed here from both rounds' shards: 1 per prompt won against round 0, 0.5 per tie.
    base = {r["prompt_id"]: r["reward"] for r in read(run_dir / "round_000" / "eval")}
    wins = [1.0 if r["reward"] > base[r["prompt_id"]] else 0.5 if r["reward"] == base[r["prompt_id"]] else 0.0
            for r in rows]
    assert metrics["eval"]["win_rate"] == pytest.approx(sum(wins) / len(wins))


def test_round_0_is_the_base_model_evaluated_once(run_dir, tiny_model):
    round_dir = run_dir / "round_000"
    rows = read(round_dir / "eval")
    assert len(rows) == SMOKE["prompts"]["eval_size"]
    assert {r["policy"] for r in rows} == {str(tiny_model.resolve())}
    assert {r["round"] for r in rows} == {0}
    assert {r["prompt_id"] for r in rows} == {r["prompt_id"] for r in read(run_dir / "round_001" / "eval")}
    assert [p.name for p in (round_dir / "_done").iterdir()] == ["evaluate"]
    metrics = json.loads((round_dir / "metrics.json").read_text())
    assert metrics["round"] == 0 and metrics["eval"]["win_rate"] == 0.5
    assert metrics["eval"]["reward_mean"] == pytest.approx(sum(r["reward"] for r in rows) / len(rows))
    log = (run_dir / "pipeline.log").read_text()
    assert log.count("round 0: evaluate started") == 1


def test_the_console_shows_the_pipeline_and_the_logs_keep_the_rest(run_dir):
    """Two smoke rounds print a line per stage and little else; vLLM, Ray and the workers write to logs/."""
    lines = (run_dir.parent / "console.txt").read_text().splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    finished = [line for line in lines if " finished in " in line]
    assert len(finished) == 1 + 2 * len(STAGES) + 2, finished  # round 0, every stage, each round
    # Each round ends with one short human line; the JSON stays in metrics.json.
    summaries = [line for line in lines if re.match(r"round [12] done in \d+ s: pass rate ", line)]
    assert len(summaries) == 2 and all(len(line) < 250 and "metrics.json" in line for line in summaries), lines
    assert not [line for line in lines if "vLLM" in line or "(pid=" in line or "WARNING" in line], lines
    logs = run_dir / "logs"
    assert sorted(p.name for p in (logs / "round_000").iterdir()) == ["evaluate.log"]
    for number in (1, 2):
        # The smoke run reports to every tracker: their output is kept apart as well.
        assert sorted(p.stem for p in (logs / f"round_00{number}").iterdir()) == sorted([*STAGES, "ray", "tracking"])
    # The engines started in round 0's evaluate and were kept (generate.keep_engines): round 1's generate
    # only reset their prefix cache.
    assert "vllm" in (logs / "round_000" / "evaluate.log").read_text().lower()
    assert "reset prefix cache" in (logs / "round_001" / "generate.log").read_text()
    assert "TrainController" in (logs / "round_001" / "train.log").read_text()


def test_pipeline_log_has_every_stage_with_its_time(run_dir):
    log = (run_dir / "pipeline.log").read_text()
    for number in (1, 2):
        for stage in STAGES:
            assert re.search(rf"round {number}: {stage} finished in [0-9.]+ s", log), (number, stage)


def test_report_over_the_run(run_dir):
    result = run_cli("report", str(run_dir), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = [line.split("|")[1].strip() for line in (run_dir / "report.md").read_text().splitlines()
              if re.match(r"\| \d", line)]
    assert rounds == ["0", "1", "2"]
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_tracker_received_the_run_once(run_dir):
    """Training steps numbered across both rounds, round 0-2's evaluation, no step twice after a rerun."""
    result = run_cli("rounds", "2", "--config", "configs/smoke.yaml", "--run", run_dir.name,
                     "--output", str(run_dir.parent), TRACK_ALL, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tracking:" not in result.stderr, result.stderr[-3000:]
    steps = list(range(1, sum(len(read_log(run_dir / f"round_00{n}")) for n in (1, 2)) + 1))
    losses = [record["loss"] for n in (1, 2) for record in read_log(run_dir / f"round_00{n}")]
    pass_rates = [json.loads((run_dir / f"round_00{n}" / "metrics.json").read_text())["eval"]["pass_rate"]
                  for n in (1, 2)]

    scalars, _ = tensorboard_scalars(run_dir)
    assert [step for step, _ in scalars["train/loss"]] == steps
    assert [value for _, value in scalars["train/loss"]] == pytest.approx(losses, rel=1e-6)
    assert [step for step, _ in scalars["eval/pass_rate"]] == [0, 1, 2]
    assert [value for _, value in scalars["eval/pass_rate"]][1:] == pytest.approx(pass_rates)

    client, tracked = mlflow_run(run_dir)
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "train/grad_norm")] == steps
    assert tracked.data.params["train.objective"] == SMOKE["train"]["objective"]

    rows = wandb_records.history(run_dir)
    assert [row["train/step"] for row in rows if "train/step" in row] == steps
    assert [row["round"] for row in rows if "eval/pass_rate" in row] == [0, 1, 2]


def read_log(round_dir: Path) -> list[dict]:
    return read_training_log(round_dir / "policy" / "training_log.jsonl")


def test_finished_round_is_not_redone(run_dir):
    markers = {p: p.stat().st_mtime_ns for p in (run_dir / "round_002" / "_done").iterdir()}
    result = run_cli("round", "2", "--config", "configs/smoke.yaml", "--run", run_dir.name,
                     "--output", str(run_dir.parent), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already finished" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in markers} == markers


def test_interrupted_stage_is_redone_from_its_partial_output(run_dir):
    """A stage without its done marker runs again; its finished shards are reused, not appended to."""
    round_dir = run_dir / "round_002"
    before = read(round_dir / "lists")
    (round_dir / "_done" / "rerank").unlink()  # later stages keep their markers: only rerank reruns
    result = run_cli("round", "2", "--config", "configs/smoke.yaml", "--run", run_dir.name,
                     "--output", str(run_dir.parent), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rerank finished" in result.stderr
    assert "generate already done" in result.stderr
    assert read(round_dir / "lists") == before
    assert len(list((round_dir / "lists").glob("part-*.parquet"))) == 1


def test_every_policy_carries_a_model_card(run_dir):
    import yaml

    for number in (1, 2):
        card = (run_dir / f"round_00{number}" / "policy" / "README.md").read_text()
        front = yaml.safe_load(card.split("---")[1])
        assert front["base_model"] == SMOKE["model"]["name"] and "larpo" in front["tags"]
        assert f"round {number}" in card and "strict pass rate" in card and "95% paired bootstrap" in card
        assert "smoke_train.jsonl" in card
