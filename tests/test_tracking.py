"""Trackers read back with each library's own reader: TensorBoard's event accumulator,
MLflow's client on the local store, W&B's offline run files (tests/wandb_records.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from core.config import TRACKER_NAMES
from core.layout import RunLayout
from pipeline.settings import load_config
from pipeline.tracking import TRACKERS, Tracking, flat_config, round_values, step_metrics
from tests import wandb_records

STEPS_PER_ROUND = 3


def interval(value: float, baseline: float) -> dict[str, float]:
    return {"value": value, "baseline": baseline, "difference": value - baseline,
            "low": value - baseline - 0.05, "high": value - baseline + 0.05, "prompts": 8}


def write_round(run_dir: Path, number: int) -> None:
    """A finished round's files as the stages write them: metrics.json and the training log."""
    round_dir = run_dir / f"round_{number:03d}"
    (round_dir / "policy").mkdir(parents=True)
    with (round_dir / "policy" / "training_log.jsonl").open("w") as f:
        for step in range(1, STEPS_PER_ROUND + 1):
            f.write(json.dumps({"step": step, "loss": 1.0 / (number * 10 + step), "ranking_accuracy": 0.5,
                                "margin": 0.1 * step, "grad_norm": 2.0, "learning_rate": 1e-5,
                                "tokens_per_second": 100.0, "seconds": 1.0}) + "\n")
    pass_rate = 0.25 + 0.1 * number
    metrics = {
        "round": number, "prompts_dropped_too_long": 1, "round_seconds": 12.5,
        "eval": {"pass_rate": pass_rate, "reward_mean": 0.5, "win_rate": 0.6, "response_tokens_mean": 40.0,
                 "vs_round_0": {"pass_rate": interval(pass_rate, 0.25), "reward_mean": interval(0.5, 0.4),
                                "win_rate": interval(0.6, 0.5)},
                 "pass_rate_by_kind": {"postscript": 0.75}},
        "train": {"loss_mean": 1.0}, "stage_seconds": {"generate": 3.0, "train": 5.0},
        "stages": {"rerank": {"lists": 7, "all_tied_dropped": 1}, "reference": {"lists_current": 7}},
    }
    (round_dir / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def run(tmp_path, monkeypatch) -> RunLayout:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "tracked"
    run_dir.mkdir()
    return RunLayout.at(tmp_path, "tracked")


def tracking(run: RunLayout, names=TRACKER_NAMES) -> Tracking:
    return Tracking(run, list(names), {"seed": 0, "train": {"learning_rate": 1e-5}, "tracking": list(names)})


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # purge_orphaned_data off: a step written twice (by a resume) must show up twice.
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0},
                              purge_orphaned_data=False)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}, events


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("larpo").experiment_id])
    assert len(runs) == 1, "one tracker run per pipeline run"
    return client, runs[0]


def test_tracker_names_match_the_registry():
    assert set(TRACKER_NAMES) == set(TRACKERS)


def test_step_metrics_number_steps_across_rounds(run):
    write_round(run.dir, 1)
    write_round(run.dir, 2)
    steps = step_metrics(run, 2)
    assert [step for step, _ in steps] == [4, 5, 6]
    assert set(steps[0][1]) == {"train/loss", "train/ranking_accuracy", "train/margin", "train/grad_norm",
                                "train/learning_rate", "train/tokens_per_second"}


def test_round_values_carry_intervals_lists_and_times():
    write = {}
    metrics = {"eval": {"pass_rate": 0.4, "vs_round_0": {"pass_rate": interval(0.4, 0.25)},
                        "pass_rate_by_kind": {"title": 1.0}},
               "stages": {"rerank": {"lists": 7, "all_tied_dropped": 2}}, "stage_seconds": {"train": 5.0},
               "prompts_dropped_too_long": 0}
    write.update(round_values(metrics))
    assert write["eval/pass_rate_vs_round_0"] == pytest.approx(0.15)
    assert write["eval/pass_rate_vs_round_0_low"] == pytest.approx(0.10)
    assert write["eval/pass_rate_vs_round_0_high"] == pytest.approx(0.20)
    assert write["eval/pass_rate_by_kind/title"] == 1.0
    assert write["lists/lists"] == 7 and write["lists/all_tied_dropped"] == 2
    assert write["seconds/train"] == 5.0


def test_flat_config_names_nested_keys():
    assert flat_config({"seed": 0, "train": {"beta": 0.1}, "reward": {"composite": {"components": {"a": 1.0}}}}) == \
        {"seed": "0", "train.beta": "0.1", "reward.composite.components": '{"a": 1.0}'}


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(Exception, match="config key 'tracking'"):
        load_config("configs/smoke.yaml", ["tracking=[tensorbord]"])


def test_rounds_and_a_resume_reach_every_tracker_once(run):
    write_round(run.dir, 1)
    first = tracking(run)
    first.train_finished(1)
    first.close()  # the command died after round 1's train stage
    resumed = tracking(run)
    resumed.round_finished(1)  # the resumed command finishes round 1 ...
    write_round(run.dir, 2)
    resumed.train_finished(2)
    resumed.round_finished(2)  # ... and runs round 2
    resumed.round_finished(2)  # a finished round asked for again logs nothing new
    resumed.close()
    expected_steps = list(range(1, 2 * STEPS_PER_ROUND + 1))

    scalars, events = tensorboard_scalars(run.dir)
    assert [step for step, _ in scalars["train/loss"]] == expected_steps
    assert scalars["train/loss"][3][1] == pytest.approx(1.0 / 21)
    assert [step for step, _ in scalars["eval/pass_rate"]] == [0, 1, 2]
    assert [value for _, value in scalars["eval/pass_rate"]] == pytest.approx([0.25, 0.35, 0.45])
    assert [value for _, value in scalars["eval/pass_rate_vs_round_0_low"]] == pytest.approx([0.05, 0.15])
    assert [e.step for e in events.Images("report")] == [1, 2]
    assert {"metrics.json/text_summary", "config/text_summary"} <= set(events.Tags()["tensors"])

    client, tracked = mlflow_run(run.dir)
    assert tracked.info.run_name == "tracked"
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "train/loss")] == expected_steps
    assert sorted(m.step for m in client.get_metric_history(tracked.info.run_id, "eval/pass_rate")) == [0, 1, 2]
    assert tracked.data.params["train.learning_rate"] == "1e-05"
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert {"report.png", "round_001", "round_002"} <= artifacts
    assert [a.path for a in client.list_artifacts(tracked.info.run_id, "round_002")] == ["round_002/metrics.json"]

    rows = wandb_records.history(run.dir)
    assert [row["train/step"] for row in rows if "train/step" in row] == expected_steps
    assert [row["round"] for row in rows if "eval/pass_rate" in row] == [0, 1, 2]
    assert [row["eval/pass_rate_vs_round_0_high"] for row in rows if "eval/pass_rate_vs_round_0_high" in row] == \
        pytest.approx([0.15, 0.25])
    assert wandb_records.config(run.dir)["train.learning_rate"] == "1e-05"
    ids = {path.name for path in (run.dir / "wandb").glob("offline-run-*/run-*.wandb")}
    assert len(ids) == 1, f"one W&B run id across the resume, got {ids}"
    saved = {path.relative_to(path.parents[2]).as_posix() for path in (run.dir / "wandb").glob("*/files/*/metrics.json")}
    assert saved == {"files/round_001/metrics.json", "files/round_002/metrics.json"}
    assert [(row["round"], row["report/_type"]) for row in rows if "report/_type" in row] == \
        [(1, "image-file"), (2, "image-file")]


def test_a_failing_tracker_warns_once_and_the_others_go_on(run, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "no-such-scheme://nowhere")
    write_round(run.dir, 1)
    tracker = tracking(run, ["mlflow", "tensorboard"])
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        tracker.round_finished(1)
        write_round(run.dir, 2)
        tracker.round_finished(2)
    tracker.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("tracking: mlflow failed"), warnings
    scalars, _ = tensorboard_scalars(run.dir)
    assert [step for step, _ in scalars["eval/pass_rate"]] == [0, 1, 2]
