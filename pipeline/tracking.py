"""Experiment trackers (TensorBoard, MLflow, W&B), fed from the files a round wrote.

The driver calls `Tracking.train_finished` when a round's train stage is done
and `Tracking.round_finished` when the round is. Both read the round's own
files (the training log, metrics.json), so a resumed round logs what a
straight one would. `runs/<run>/tracking.json` records what each tracker has
received and its run id: every round and every resume continues one tracker
run, and no step is logged twice. A tracker that fails is dropped with one
warning, and the round goes on without it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from core.layout import RunLayout, atomic_write_json
from core.timing import round_wall_seconds
from pipeline.report import INTERVAL_KEYS, read_training_log, write_report

log = logging.getLogger("pipeline.tracking")

# The training log's per-step keys that go to the trackers, as train/<key>.
TRAIN_KEYS = ("loss", "ranking_accuracy", "margin", "grad_norm", "learning_rate", "tokens_per_second")
# Rerank's counts of lists kept and prompts dropped, by cause (stages/rerank.py).
LIST_KEYS = ("lists", "positives", "negatives", "all_tied_dropped", "all_invalid_dropped",
             "no_negative_dropped", "duplicates_dropped", "invalid_rewards_dropped")


def step_metrics(run: RunLayout, number: int) -> list[tuple[int, dict[str, float]]]:
    """Round `number`'s optimizer steps as (step of the whole run, train/<key> values)."""
    offset = sum(len(read_training_log(run.round(n).policy / "training_log.jsonl")) for n in range(1, number))
    records = read_training_log(run.round(number).policy / "training_log.jsonl")
    return [(offset + record["step"], {f"train/{key}": float(record[key]) for key in TRAIN_KEYS if key in record})
            for record in records]


def round_values(metrics: dict[str, Any]) -> dict[str, float]:
    """A round's metrics.json as flat tracker values: evaluation with its intervals, lists, wall times."""
    evaluation = metrics.get("eval") or {}
    values = {f"eval/{key}": evaluation[key] for key in (*INTERVAL_KEYS, "response_tokens_mean")
              if isinstance(evaluation.get(key), (int, float))}
    for key, interval in (evaluation.get("vs_round_0") or {}).items():
        values[f"eval/{key}_vs_round_0"] = interval["difference"]
        values[f"eval/{key}_vs_round_0_low"] = interval["low"]
        values[f"eval/{key}_vs_round_0_high"] = interval["high"]
    for kind, rate in (evaluation.get("pass_rate_by_kind") or {}).items():
        values[f"eval/pass_rate_by_kind/{kind}"] = rate
    stages = metrics.get("stages") or {}
    rerank = stages.get("rerank") or {}
    values.update({f"lists/{key}": rerank[key] for key in LIST_KEYS if key in rerank})
    reference = stages.get("reference") or {}
    values.update({f"lists/{key}": reference[key] for key in ("lists_current", "lists_replayed") if key in reference})
    values["lists/prompts_dropped_too_long"] = metrics.get("prompts_dropped_too_long", 0)
    values.update({f"seconds/{stage}": seconds for stage, seconds in (metrics.get("stage_seconds") or {}).items()})
    if (seconds := round_wall_seconds(metrics)) is not None:
        values["seconds/round"] = seconds
    return {key: float(value) for key, value in values.items()}


def baseline_values(metrics: dict[str, Any]) -> dict[str, float]:
    """Round 0 (the base model) as read from round 1's intervals, whose baseline it is."""
    intervals = (metrics.get("eval") or {}).get("vs_round_0") or {}
    return {f"eval/{key}": float(interval["baseline"]) for key, interval in intervals.items()}


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved config as `section.key` parameters (lists and mappings as JSON)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "components":
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


class TensorBoardTracker:
    """Event files under runs/<run>/tensorboard/; a resume appends a new event file there."""

    def __init__(self, run_dir: Path, run_name: str, state: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log_params(self, params: dict[str, str]) -> None:
        lines = "\n".join(f"| {key} | {value} |" for key, value in params.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + lines, 0)

    def log_steps(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in steps:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def log_round(self, number: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, number)

    def log_artifacts(self, number: int, metrics_path: Path, report_png: Path | None) -> None:
        self.writer.add_text("metrics.json", "```\n" + metrics_path.read_text() + "\n```", number)
        if report_png is not None:
            from matplotlib.image import imread

            self.writer.add_image("report", imread(report_png)[..., :3], number, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite store in runs/<run>/mlflow/."""

    def __init__(self, run_dir: Path, run_name: str, state: dict[str, Any]):
        from mlflow.tracking import MlflowClient

        local = run_dir.resolve() / "mlflow"
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            local.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{local / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "larpo")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (local / "artifacts").as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run_id = state.get("run_id")
        if run_id and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            state.clear()  # a new tracker run has received nothing yet
        state["run_id"] = self.run_id = run_id

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # an id from another store: start a new run there
            return False

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def _log(self, points: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, value, stamp, step) for key, value, step in points]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_steps(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        self._log([(key, value, step) for step, values in steps for key, value in values.items()])

    def log_round(self, number: int, values: dict[str, float]) -> None:
        self._log([(key, value, number) for key, value in values.items()])

    def log_artifacts(self, number: int, metrics_path: Path, report_png: Path | None) -> None:
        self.client.log_artifact(self.run_id, str(metrics_path), artifact_path=f"round_{number:03d}")
        if report_png is not None:
            self.client.log_artifact(self.run_id, str(report_png))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def wandb_mode() -> str:
    """`WANDB_MODE` when set; otherwise online only where the user is logged in."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        from wandb.sdk.lib.wbauth import wbnetrc

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        return "online" if wbnetrc.read_netrc_auth(host=host) else "offline"
    except Exception:
        return "offline"


class WandbTracker:
    """Files under runs/<run>/wandb/; custom x-axes (train/step, round), so a resume never rewinds a step."""

    def __init__(self, run_dir: Path, run_name: str, state: dict[str, Any]):
        import wandb

        state.setdefault("run_id", f"{run_name}-{uuid.uuid4().hex[:8]}")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "larpo"), name=run_name, id=state["run_id"],
            resume="allow", dir=str(run_dir.resolve()), mode=wandb_mode(),
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")
        self.run.define_metric("round")
        for prefix in ("eval", "lists", "seconds"):
            self.run.define_metric(f"{prefix}/*", step_metric="round")

    def log_params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_steps(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in steps:
            self.run.log({"train/step": step, **values})

    def log_round(self, number: int, values: dict[str, float]) -> None:
        self.run.log({"round": number, **values})

    def log_artifacts(self, number: int, metrics_path: Path, report_png: Path | None) -> None:
        import wandb

        self.run.save(str(metrics_path), base_path=str(metrics_path.parent.parent), policy="now")
        if report_png is not None:
            self.run.log({"round": number, "report": wandb.Image(str(report_png))})

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


class Tracking:
    """The trackers of one command; `open_tracking` starts them, each on first use."""

    def __init__(self, run: RunLayout, names: list[str], config: dict[str, Any]):
        self.run = run
        self.names = list(names)
        self.params = flat_config(config)
        self.trackers: dict[str, Any] = {}
        self.state_path = run.dir / "tracking.json"

    def _state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def _each(self, action) -> None:
        """Run `action(name, tracker, state)` for every live tracker; a failure drops that tracker."""
        state = self._state()
        for name in list(self.names):
            entry = state.setdefault(name, {})
            try:
                if name not in self.trackers:
                    self.trackers[name] = TRACKERS[name](self.run.dir, self.run.dir.name, entry)
                if not entry.get("params"):
                    self.trackers[name].log_params(self.params)
                    entry["params"] = True
                action(self.trackers[name], entry)
            except Exception as exc:
                log.warning("tracking: %s failed (%s: %s); the run goes on without it",
                            name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self.names.remove(name)
                self.trackers.pop(name, None)
            atomic_write_json(self.state_path, state)

    def train_finished(self, number: int) -> None:
        steps = step_metrics(self.run, number)

        def log_train(tracker, entry: dict[str, Any]) -> None:
            if number not in entry.setdefault("train_rounds", []):
                tracker.log_steps(steps)
                entry["train_rounds"].append(number)
        self._each(log_train)

    def round_finished(self, number: int) -> None:
        self.train_finished(number)
        metrics_path = self.run.round(number).metrics
        metrics = json.loads(metrics_path.read_text())
        report_png = self._report()

        def log_round(tracker, entry: dict[str, Any]) -> None:
            done = entry.setdefault("rounds", [])
            if 0 not in done:
                tracker.log_round(0, baseline_values(metrics))
                done.append(0)
            if number not in done:
                tracker.log_round(number, round_values(metrics))
                tracker.log_artifacts(number, metrics_path, report_png)
                done.append(number)
        self._each(log_round)

    def _report(self) -> Path | None:
        try:
            write_report(self.run.dir)
            return self.run.dir / "report.png"
        except Exception as exc:
            log.warning("tracking: the report could not be drawn (%s); logged without it", exc)
            return None

    def close(self) -> None:
        for name, tracker in self.trackers.items():
            try:
                tracker.close()
            except Exception as exc:
                log.warning("tracking: %s did not close cleanly (%s)", name, exc)
        self.trackers.clear()
